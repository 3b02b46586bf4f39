"""`glm41v convert SRC DST [--dtype bfloat16|float32] [--quantize int8|int4 [--quant-group-size N]
[--quantize-skip lm_head,vision]]`: the converter's command line.

Every expected failure (bad checkpoint, bad config, missing file, bad dtype or --flush-gb, an unknown scheme, int4
groups that do not divide a layer's input width, a source that is already converted or quantized, existing DST, a
conversion to the same DST already running, a full disk) prints exactly one `error: ...` line on stderr and returns
exit code 2; no traceback. Ctrl-C removes the partial output and returns 130, SIGTERM the same with 143.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Any

from glm41v_jax.cli.argtypes import float_in
from glm41v_jax.cli.common import OneLineErrorParser, add_quant_args, guarded, print_error, quant_kwargs
from glm41v_jax.loading import CheckpointError

from .hf_to_orbax import ConversionTerminated, convert


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "convert",
        help="convert an HF safetensors checkpoint to an Orbax checkpoint (streamed, atomic)",
        description="Convert an HF GLM-4.1V checkpoint (directory or hub id) into a directory that "
        "glm41v_jax.loading.load restores onto any mesh. Tensors are streamed one at a time.",
    )
    p.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors) or hub id")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: keep the stored dtype)")
    p.add_argument("--flush-gb", type=float_in(0, 1024, lo_open=True), default=0.5,
                   help="host buffer per Orbax partial save, GiB (default 0.5); peak memory scales with it")
    add_quant_args(p, "quantize the weights while converting (weight-only; the scheme is recorded, so loading needs "
                      "no flag)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the stored chunks (slower, ~10%% smaller)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `convert` subcommand: 0 converted, 2 bad input (one `error:` line), 130 Ctrl-C, 143 SIGTERM."""
    return guarded(_convert, args)


def _convert(args: argparse.Namespace) -> int:
    try:
        if not (math.isfinite(args.flush_gb) and args.flush_gb > 0):
            raise CheckpointError(f"--flush-gb must be a positive number of GiB (e.g. 0.5), got {args.flush_gb}")
        dst = convert(args.src, args.dst, dtype=args.dtype, progress=args.progress,
                      flush_bytes=max(1, int(args.flush_gb * 2**30)), compress=args.compress,
                      **quant_kwargs(args))
    except ConversionTerminated:
        print_error("terminated (SIGTERM); partial output removed")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print_error("interrupted; partial output removed")
        return 130
    print(f"converted {args.src} -> {dst}", file=sys.stderr)
    return 0


def register_export(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `export` subcommand (glm41v_convert.export) to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="export a converted directory as an HF safetensors checkpoint (optionally with a LoRA adapter merged), "
             "or a LoRA adapter as a PEFT adapter",
        description="Write SRC (a converted directory: `glm41v convert`'s output or a training run's final weights) "
        "as an HF checkpoint directory that transformers and vLLM load: model-0000k-of-0000n.safetensors shards, "
        "model.safetensors.index.json, config.json and the tokenizer/processor files. Streamed, atomic.",
    )
    p.add_argument("src", help="converted directory")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: keep the stored dtype)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (a LoRA run's final/) trained on SRC; with --merge or --peft")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true",
                      help="fold the adapter into the exported weights (fp32, rounded once to --dtype)")
    mode.add_argument("--peft", action="store_true",
                      help="write only the adapter, as PEFT's adapter_model.safetensors + adapter_config.json")
    p.add_argument("--dequantize", action="store_true",
                   help="allow a quantized SRC: its weights are written as codes * scale in floats (a warning says so)")
    p.add_argument("--shard-gb", type=float_in(0, 1024, lo_open=True), default=5.0,
                   help="largest shard, GB (10^9 bytes; default 5, as save_pretrained)")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """The `export` subcommand: 0 exported, 2 bad input (one `error:` line), 130 Ctrl-C, 143 SIGTERM."""
    return guarded(_export, args)


def _export(args: argparse.Namespace) -> int:
    from .export import export

    try:
        dst = export(args.src, args.dst, dtype=args.dtype, adapter=args.adapter, merge=args.merge, peft=args.peft,
                     dequantize=args.dequantize, shard_bytes=max(1, int(args.shard_gb * 10**9)))
    except ConversionTerminated:
        print_error("terminated (SIGTERM); partial output removed")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print_error("interrupted; partial output removed")
        return 130
    print(f"exported {args.src} -> {dst}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m glm41v_convert.main SRC DST`)."""
    parser = OneLineErrorParser(prog="glm41v")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:  # --help (0) or a usage error (2, printed as one line)
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
