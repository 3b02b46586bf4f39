"""Integrity of converted checkpoints: paths, per-array checksums, the file list, and readable storage errors.

What is special here:
  * `abs_path` is the one place where a user's path becomes what Orbax/TensorStore get: `~` expanded, made
    absolute against the current directory (Orbax refuses relative paths), trailing slashes dropped.
  * Checksums: `array_crc32` is zlib's CRC-32 of an array's raw bytes (C order, stored dtype, the Flax layout). The
    converter computes it as each array streams past (zlib releases the GIL; a few percent of a conversion,
    BENCHMARKS.md "Checksums and `glm41v verify`") and records it per array in the format file; `glm41v verify`
    and `load(..., verify=True)` read every array back and compare.
  * The file list: the size of every file under `params/`, recorded at conversion. Checking it costs one `stat` per
    file, so every load does it: a deleted or truncated data file is named before TensorStore reads anything.
  * `storage_error` turns a TensorStore/Orbax failure (a `ValueError` whose message starts with a status code such
    as `DATA_LOSS:` or `RESOURCE_EXHAUSTED:`, with the whole storage spec dumped after it) into one short sentence
    naming the array and the OS error; anything else is not a storage error and stays a bug.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

CHECKSUM_ALGORITHM = "crc32"
_STATUS = re.compile(r"\b(DATA_LOSS|NOT_FOUND|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|INVALID_ARGUMENT|OUT_OF_RANGE|"
                     r"PERMISSION_DENIED|UNAVAILABLE|ABORTED|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|ALREADY_EXISTS|"
                     r"UNIMPLEMENTED|CANCELLED): ")
_ARRAY_KEY = re.compile(r'"([^"/\s]+)/(?:c/|\.zarray|zarr\.json)')
_SPEC_PATH = re.compile(r"'path': '([^'/]+)/'")
_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def abs_path(path: str | os.PathLike) -> str:
    """`~` expanded and made absolute (no trailing slash): the form every path takes before Orbax sees it."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def array_crc32(arr: Any) -> str:
    """CRC-32 of an array's raw bytes (C order, its own dtype) as 8 hex digits."""
    a = np.ascontiguousarray(np.asarray(arr)).reshape(-1)
    return f"{zlib.crc32(a.view(np.uint8)) if a.size else 0:08x}"  # a uint8 view: bf16 has no buffer format


def file_sizes(directory: str) -> dict[str, int]:
    """{path relative to `directory`'s parent: size} of every file under `directory` (sorted, '/'-separated)."""
    base = os.path.dirname(directory)
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            out[os.path.relpath(path, base).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def damaged_files(directory: str, recorded: Mapping[str, int]) -> dict[str, str]:
    """{file: what is wrong} for the recorded files (relative to `directory`) that are missing or not of their
    recorded size."""
    bad = {}
    for rel, size in recorded.items():
        path = os.path.join(directory, *rel.split("/"))
        try:
            got = os.stat(path).st_size
        except FileNotFoundError:
            bad[rel] = "missing"
            continue
        except OSError as e:
            bad[rel] = f"unreadable: {e.strerror}"
            continue
        if not os.path.isfile(path):
            bad[rel] = "not a file"
        elif got != size:
            bad[rel] = f"{'truncated' if got < size else 'grown'} to {got} bytes, {size} written"
    return bad


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def storage_error(e: BaseException) -> tuple[str | None, str] | None:
    """(array name or None, one short sentence) when `e` (or its cause) is a TensorStore storage failure, else None.

    The sentence keeps the status code, what failed and the OS error, and drops the storage spec TensorStore
    appends (hundreds of lines)."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno is not None:
            return None, f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        msg = str(err)
        m = _STATUS.search(msg)
        if not isinstance(err, (ValueError, RuntimeError)) or m is None:
            continue
        array = None
        key = _ARRAY_KEY.search(msg) or _SPEC_PATH.search(msg)
        if key is not None:
            array = key.group(1).replace(".", "/")
        text = msg[m.start():]
        text = re.sub(r' in (?:OCDBT database at local file )?"[^"]*"', "", text)  # the array is named apart
        text = re.split(r"\s*(?:\[source locations=|\[tensorstore_spec=|<TensorStore\(|\{\s*'|"
                        r"while (?:reading|writing) \{)", text)[0]
        text = re.sub(r"\s*\[os_error_code='\d+'\]", "", text)
        text = " ".join(text.split())
        os_code = _OS_ERROR.search(msg)
        if os_code is not None:
            reason = os.strerror(int(os_code.group(1)))
            if reason not in text:
                text += f" ({reason})"
        if len(text) > 400:
            text = text[:397] + "..."
        return array, text
    return None


def is_no_space(e: BaseException) -> bool:
    """A write failed because the disk (or quota) is full."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        m = _OS_ERROR.search(str(err))
        if m is not None and int(m.group(1)) in (errno.ENOSPC, errno.EDQUOT):
            return True
    return False


class _DropThreadTracebacks(logging.Filter):
    """Drops Orbax's ERROR records that carry a traceback from its background threads: the same exception reaches
    the caller, which reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


class _DropUnretrievedStorageErrors(logging.Filter):
    """asyncio's "Task exception was never retrieved" for the other reads of a failed Orbax restore: their storage
    error is the one already reported. The task is garbage-collected whenever the collector runs, possibly long after
    the restore failed, so the filter stays installed for the process; it drops nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "never retrieved" not in str(record.msg):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and storage_error(exc) is not None:
            return False
        return f"{os.sep}orbax{os.sep}" not in record.getMessage()


def is_failed_restore_noise(u: Any) -> bool:
    """A `sys.unraisablehook` report left by a failed Orbax restore: a read callback finding the event loop closed,
    or one of Orbax's own read coroutines finalised after its restore was abandoned ("Exception ignored in:
    <coroutine object _read_array_index_and_device_put>")."""
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
        return True
    code = getattr(u.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


_installed: list[Any] = []


def install_restore_noise_filters() -> None:
    """Once per process: when a restore fails, Orbax closes its event loop while TensorStore still completes the
    other reads, whose callbacks then raise 'Event loop is closed' (printed through sys.unraisablehook, possibly
    after the caller has reported the error) and leave unretrieved task exceptions. Drop exactly those."""
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if not is_failed_restore_noise(u):
            previous(u)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropUnretrievedStorageErrors())
    _installed.append(hook)


@contextmanager
def quiet_storage_threads() -> Iterator[None]:
    """While active, Orbax's background threads do not log their exceptions' tracebacks (absl logger); the noise a
    failed restore leaves behind (closed event loop callbacks) is dropped from then on (process-wide, narrowly)."""
    log = logging.getLogger("absl")
    f = _DropThreadTracebacks()
    log.addFilter(f)
    install_restore_noise_filters()
    try:
        yield
    finally:
        log.removeFilter(f)


__all__ = ["CHECKSUM_ALGORITHM", "abs_path", "array_crc32", "damaged_files", "file_sizes",
           "install_restore_noise_filters", "is_failed_restore_noise", "is_no_space",
           "quiet_storage_threads", "storage_error"]
