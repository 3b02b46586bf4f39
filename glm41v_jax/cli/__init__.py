"""`glm41v` console command: one module per subcommand, each with `register(subparsers)`.

The subcommands of this package (generate, chat, verify, plan) are listed below. The converter's and the trainer's
(convert, export, train, loss) live in their own packages, which import this one, so this package does not import them:
they are registered through the `glm41v.commands` entry-point group of pyproject.toml, read from the installed
package's metadata (`pip install -e .` writes it). Another package can add a subcommand the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib.metadata import EntryPoint, distributions
from typing import Any

from . import chat, generate, plan, verify
from .common import OneLineErrorParser

COMMANDS_GROUP = "glm41v.commands"
BUILTIN: tuple[Callable[[Any], Any], ...] = (verify.register, generate.register, chat.register, plan.register)


def command_entry_points() -> list[EntryPoint]:
    """The installed `glm41v.commands` entry points, one per name (the first found wins), sorted by name. Each
    names a `register(subparsers)` function.

    Every distribution's metadata is read, not only the first of each name (as `importlib.metadata.entry_points`
    does): an editable install can leave an older `glm41v_jax.egg-info` in the source folder, found first from there
    (`python -m ...` puts the current folder on sys.path), which would hide the commands added since."""
    found: dict[str, EntryPoint] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == COMMANDS_GROUP:
                found.setdefault(ep.name, ep)
    return [found[name] for name in sorted(found)]


def build_parser() -> argparse.ArgumentParser:
    """The `glm41v` parser: the built-in subcommands, then those registered by entry point."""
    parser = OneLineErrorParser(prog="glm41v",
                                description="GLM-4.1V-9B-Thinking in JAX: convert, export, verify, generate, chat, "
                                            "train, loss, plan.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in BUILTIN:
        register(sub)
    for ep in command_entry_points():
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `glm41v ARGV...`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args) or 0)
