"""`glm41v verify DIR [--json]`: check a converted directory against the checksums recorded when it was converted.

Every array is read back in its stored dtype (about 256 MiB at a time) and its CRC-32 compared with the format
file's; the size of every file under params/ and the CRC-32 of the side files (config, tokenizer, templates) are
checked too. Exit codes, like `cmp`:
  0  everything matches;
  1  damage found: one `DAMAGED name: reason` line per array or file on stdout, one `error:` summary on stderr;
  2  nothing could be verified: not a converted directory, a broken format file, or a directory converted before
     checksums were recorded (its arrays are still read, and an unreadable one gives 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ..loading import verify_converted
from .common import CliError, guarded


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `verify` subcommand to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "verify", help="check a converted directory against the checksums recorded at conversion",
        description="Read every array of a directory written by `glm41v convert` and compare it with the CRC-32 "
                    "recorded at conversion; check the data files' sizes and the side files too. Exit 0: all good; "
                    "1: damage found (named on stdout); 2: nothing to verify against or not a converted directory.")
    p.add_argument("directory", help="the converted directory (the DST of `glm41v convert`)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the findings on stdout")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `verify` subcommand: 0 all good, 1 damage found, 2 nothing to verify against (or bad input)."""
    return guarded(_verify, args)


def _verify(args: argparse.Namespace) -> int:
    if not args.directory.strip():
        raise CliError("the directory path is empty")
    report = verify_converted(args.directory)
    d = report.directory
    if args.json:
        print(json.dumps(dict(dataclasses.asdict(report), ok=report.ok, seconds=round(report.seconds, 3))))
    else:
        for name, why in report.damaged.items():
            print(f"DAMAGED {name}: {why}")
    if report.damaged:
        print(f"error: {d}: verification failed, {report.summary()}; convert again", file=sys.stderr)
        return 1
    if not report.has_checksums:
        print(f"error: {d}: no checksums were recorded when it was written (converted by an older "
              f"version, or the final weights of a multi-host training run); all {report.arrays} arrays read back "
              "without error, but bit flips cannot be detected; convert again to record them", file=sys.stderr)
        return 2
    if not args.json:
        print(f"OK {d}: {report.arrays} arrays ({report.bytes / 2**20:.1f} MiB) match the checksums recorded at "
              f"conversion ({report.seconds:.1f} s)")
    return 0
