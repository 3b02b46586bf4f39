"""`glm41v plan`: compile the programs that would run on a Cloud TPU slice, with no TPU and no weights.

    glm41v plan --tpu v5e-8 [--model DIR | --config 9b] generate [--batch B] [--max-context N] [--image WxH]...
                [--dtype bfloat16] [--mesh data=D,fsdp=F,tensor=T] [--json]
    glm41v plan --tpu v5p-64 train --config train/configs/v5p_pod.yaml [--step-time S] [--json]
    glm41v plan --tpu v5e-1 generate --quantize int8|int4 [--quant-group-size N] [--quantize-skip lm_head,vision]

`--quantize` compiles the quantized programs (weight-only int8/int4, as `glm41v generate --quantize` runs them); a
--model that is a quantized converted directory is planned with its recorded scheme. A train plan takes it (or the
config's own `quantize:`) for the frozen base of a config with a `lora:` section (QLoRA: the LoRA step is compiled,
adapters and their optimizer state trained) and refuses it for full-weight training (which needs float weights).

Exit codes: 0 fits, 1 does not fit (the compiler's figures and what would fit are printed), 2 bad input (one
`error: ...` line: unknown TPU type, a mesh that does not use the slice's devices, a config that does not parse).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

from glm41v_train.config import load_config

from ..plan import BUILTIN_CONFIGS, model_config, parse_image_size, plan_generate, plan_train
from ..plan_report import format_report
from ..quant_checkpoint import QuantizedCheckpointError, checkpoint_quantization
from ..tpu_slices import PlanError, parse_tpu
from . import argtypes
from .common import add_quant_args, guarded, quant_kwargs


def _common(p: argparse.ArgumentParser, sub: bool, model_config_flag: str = "--config") -> None:
    """Flags accepted before and after the subcommand (after it they only override when given)."""
    d = (lambda v: argparse.SUPPRESS) if sub else (lambda v: v)
    p.add_argument("--tpu", default=d(None), metavar="TYPE",
                   help="Cloud TPU type: v5e-N (v5litepod-N), v6e-N (chips), v5p-N, v4-N (TensorCores)")
    p.add_argument("--model", default=d(None), metavar="DIR",
                   help="a checkpoint directory (or config.json): only its config.json is read")
    p.add_argument(model_config_flag, dest="model_config", default=d(None), metavar="NAME",
                   help=f"built-in model config instead of --model: {', '.join(BUILTIN_CONFIGS)} (default 9b)")
    p.add_argument("--mesh", default=d(None), help="device mesh 'data=D,fsdp=F,tensor=T' (one axis may be -1); "
                   "default: generate: tensor over as many devices as divide the heads (<= 8), fsdp over the rest, "
                   "as `glm41v generate`; train: the config's mesh")
    p.add_argument("--json", action="store_true", default=d(False), help="print one JSON object")


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="will it fit on a TPU slice, and how fast can it be (compiles for the "
                                           "TPU here, no TPU or weights needed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, sub=False)
    sub = p.add_subparsers(dest="plan_kind", required=True)
    g = sub.add_parser("generate", help="the Engine's prefill and decode programs")
    _common(g, sub=True)
    g.add_argument("--batch", type=argtypes.positive_int, default=1, help="rows decoded together (default 1)")
    g.add_argument("--max-context", type=argtypes.positive_int, default=8192,
                   help="KV-cache slots: prompt + new tokens (default 8192)")
    g.add_argument("--max-new-tokens", type=argtypes.positive_int, default=1024,
                   help="new tokens; the prompt fills the rest of --max-context (default 1024)")
    g.add_argument("--image", action="append", default=[], metavar="WxH",
                   help="an image of this size in pixels in the prompt (resized as the processor does; repeatable)")
    g.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights and activations")
    g.add_argument("--attention", choices=("auto", "xla", "pallas"), default="auto", help="attention backend")
    g.add_argument("--chunk-size", type=argtypes.int_in(1, 4096), default=16,
                   help="decode steps per device call (default 16)")
    g.add_argument("--prefill-chunk", type=argtypes.int_in(0, 65536), default=None,
                   help="run a longer prompt through the decoder in chunks of at most this many tokens, in one "
                        "program (default: the platform's, 2048 on TPU; 0: one piece)")
    add_quant_args(g, "weight-only quantization of the planned weights")
    t = sub.add_parser("train", help="the train step of a training config (full SFT, or LoRA with a lora: section)")
    _common(t, sub=True, model_config_flag="--model-config")
    t.add_argument("--config", dest="train_config", required=True, metavar="YAML", help="the training config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.seq_len=8192 (repeatable)")
    t.add_argument("--step-time", type=argtypes.float_in(0, lo_open=True), default=None, metavar="S",
                   help="a measured step time in seconds: print the MFU it means")
    t.add_argument("--no-flops-count", action="store_true",
                   help="skip the unrolled 1- and 2-layer compiles that count the compiled FLOPs per layer")
    add_quant_args(t, "the frozen base of a LoRA config (QLoRA; or the config's quantize: field); refused for "
                      "full-weight training, which needs float weights")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `plan` subcommand: 0 fits, 1 does not fit, 2 bad input."""
    if not os.environ.get("JAX_PLATFORMS"):
        # plan only compiles for the topology: the host runs on the CPU and never takes a local TPU (or its lock)
        jax.config.update("jax_platforms", "cpu")
    return guarded(_plan, args)


def _plan(args: argparse.Namespace) -> int:
    if not args.tpu:
        raise PlanError("--tpu is required, e.g. --tpu v5e-8")
    if args.model and args.model_config:
        raise PlanError("give --model DIR or a built-in config name (--config), not both")
    tpu = parse_tpu(args.tpu)
    cfg = model_config(args.model, args.model_config)
    quant = quant_kwargs(args)
    stored = checkpoint_quantization(args.model) if args.model and os.path.isdir(args.model) else {}
    if stored and quant:
        raise QuantizedCheckpointError(f"{args.model}: is already quantized ({stored['quantize']}); plan it without "
                                       "--quantize")
    quant = quant or stored
    if args.plan_kind == "generate":
        report = plan_generate(cfg, tpu, batch=args.batch, max_context=args.max_context,
                               max_new_tokens=args.max_new_tokens, images=[parse_image_size(s) for s in args.image],
                               dtype=args.dtype, mesh=args.mesh, attention=args.attention, chunk_size=args.chunk_size,
                               quantize=quant, prefill_chunk=args.prefill_chunk)
    else:
        tcfg = load_config(args.train_config, args.overrides)
        report = plan_train(tcfg, cfg, tpu, mesh=args.mesh, step_time=args.step_time,
                            count_flops=not args.no_flops_count, quantize=quant)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0 if report["fits"] else 1
