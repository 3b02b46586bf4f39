"""`glm41v` console command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm41v",
                                     description="GLM-4.1V-9B-Thinking in JAX: convert, generate, chat, train, loss.")
    sub = parser.add_subparsers(dest="command", required=True)
    from glm41v_convert.main import register as register_convert
    from glm41v_train.cli import register as register_train

    from .chat_cli import register as register_chat
    from .generate_cli import register as register_generate

    register_convert(sub)
    register_generate(sub)
    register_chat(sub)
    register_train(sub)  # train, loss
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
