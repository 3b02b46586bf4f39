"""The one base of every user-facing error.

A `Glm41vError` is an expected failure caused by the input (a file, a flag, a config field, a request): the CLI
prints it as one `error: ...` line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Glm41vError(Exception):
    """Base of every error that the CLI reports as one line (exit code 2)."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its message with whitespace folded (or its class name when it has none), with the
    file name of an OSError in front when the message does not already hold it."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg
