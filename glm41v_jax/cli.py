"""`glm41v` console command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error printed as one `error: ...` line (exit code 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {' '.join(message.split())} ('{self.prog} --help' lists the options)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="glm41v",
                                description="GLM-4.1V-9B-Thinking in JAX: convert, verify, generate, chat, train, "
                                            "loss.")
    sub = parser.add_subparsers(dest="command", required=True)
    from glm41v_convert.main import register as register_convert
    from glm41v_train.cli import register as register_train

    from .chat_cli import register as register_chat
    from .generate_cli import register as register_generate
    from .plan_cli import register as register_plan
    from .verify import register as register_verify

    register_convert(sub)
    register_verify(sub)
    register_generate(sub)
    register_chat(sub)
    register_train(sub)  # train, loss
    register_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
