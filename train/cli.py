"""`glm41v train` and `glm41v loss`.

    glm41v train --config train.yaml [--set key.sub=value ...] [key.sub=value ...]
                 [--coordinator HOST:PORT --num-processes N --process-id I] [--distributed auto|on|off]
                 [--print-config]
    glm41v loss --model M [--adapter DIR] --data D.jsonl [--data more.jsonl] [--seq-len N] [--batch-size B]
                [--max-patches P] [--no-packing] [--no-loss-on-thinking] [--on-error skip|raise] [--mesh SPEC|none]
                [--dtype float32|bfloat16] [--json]

`glm41v loss` reads every record of the file(s) once, in file order (no shuffle, no repeat), under the training
label convention (assistant content + one <|endoftext|>; train/README.md), and prints the token-weighted mean loss
over all label tokens: with `--json` one line `{"loss", "tokens", "samples", "skipped", "batches"}`. Packed or not,
the result is the same (each sample's loss is counted once, weighted by its label tokens). Records that cannot be
used are skipped and counted (`--on-error raise` stops at the first instead).

Expected failures (a bad config field, a missing or corrupt checkpoint, bad data with --on-error raise) print one
`error: ...` line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import yaml

from glm41v_jax import tiny
from glm41v_jax.cli import argtypes
from glm41v_jax.cli.common import CliError, guarded
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.loading import resolve_model_dir
from glm41v_jax.sharding import make_mesh

from .config import load_config
from .optim import OptimConfig
from .params import load_params
from .step import StepConfig, TrainStep

# The modules that read training data need the train extra (grain, tensorboardX, tensorflow-datasets): they are
# imported inside the commands, so that registering `train` and `loss` (on every `glm41v` call) works without it.
TRAIN_EXTRA = {"grain", "tensorboardX", "tensorflow_datasets", "array_record"}
TINY = "tiny"  # `model: tiny` = the embedded tiny random checkpoint (smoke runs)
INT_MAX = 2**31 - 1


def _model_dir(model: str) -> str:
    return tiny.materialize_tiny_checkpoint() if model == TINY else resolve_model_dir(model)


# ---------------------------------------------------------------------------------------------------------------
# train


def register_train(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="supervised fine-tuning from a YAML config (checkpoints, resume, multi-host)",
        description="Supervised fine-tuning of GLM-4.1V from a YAML config (see train/README.md and "
                    "train/configs/). Resumes from the latest checkpoint in output_dir by default.")
    p.add_argument("--config", required=True, metavar="YAML", help="the training config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.peak_lr=2e-5 (value read as YAML; repeatable)")
    p.add_argument("more_overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, as with --set")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="jax.distributed coordinator (process 0's address), with --num-processes and --process-id")
    p.add_argument("--num-processes", type=argtypes.positive_int, default=None,
                   help="number of processes (hosts) in the run")
    p.add_argument("--process-id", type=argtypes.count, default=None, help="this process's index in [0, num-processes)")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="jax.distributed.initialize() without flags: auto (on Cloud TPU VMs), on, off")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run_train)
    return p


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides) + list(args.more_overrides))
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if cfg.model == TINY:
        cfg = dataclasses.replace(cfg, model=_model_dir(TINY))
    from .loop import train  # the train extra (grain)

    summary = train(cfg, coordinator=args.coordinator, num_processes=args.num_processes,
                    process_id=args.process_id, distributed=args.distributed)
    if jax.process_index() == 0:
        print(json.dumps(summary), flush=True)
    return 0


def run_train(args: argparse.Namespace) -> int:
    return _guarded(_train, args)


# ---------------------------------------------------------------------------------------------------------------
# loss


def register_loss(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "loss", help="mean token loss of a model over a JSONL file (training label convention)",
        description="Token-weighted mean loss of a model over every record of SFT JSONL file(s), once each.")
    p.add_argument("--model", required=True, help="HF checkpoint dir, converted dir (e.g. a training run's final/), "
                                                  "hub id, or 'tiny'")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (a LoRA run's final/) on top of --model (float or quantized: the "
                        "adapters run unmerged, as in training); an adapter of another base is refused")
    p.add_argument("--data", action="append", required=True, metavar="JSONL", help="SFT JSONL file (repeatable)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row; longer samples are truncated at a "
                                                             "whole turn or skipped, as in training (default 4096)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per batch (default 1)")
    p.add_argument("--max-patches", type=int, default=None,
                   help="vision patches per batch (default: seq-len x merge^2, as many as a row can use)")
    p.add_argument("--no-packing", action="store_true", help="one sample per row (the loss is the same)")
    p.add_argument("--no-loss-on-thinking", action="store_true",
                   help="leave the <think>...</think> part of assistant turns out of the loss")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="bad records: skip and count (default) or stop with an error")
    p.add_argument("--mesh", default=None, help="device mesh 'data=D,fsdp=F,tensor=T' (default: every device on "
                                                "fsdp); 'none': one device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="activation dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=run_loss)
    return p


def _loss(args: argparse.Namespace) -> int:
    from .data import DataConfig, make_iterator  # the train extra (grain)
    from .evaluate import LossEvaluator  # the train extra (grain)

    for flag, value, top in (("--seq-len", args.seq_len, INT_MAX), ("--batch-size", args.batch_size, 65536),
                             ("--max-patches", args.max_patches, INT_MAX)):
        if value is not None and not 1 <= value <= top:
            raise CliError(f"{flag} {value}: expected an integer in [1, {top}]")
    model_dir = _model_dir(args.model)
    cfg = Glm4vConfig.from_file(os.path.join(model_dir, "config.json"))
    m2 = cfg.vision.spatial_merge_size ** 2
    max_patches = args.max_patches or args.seq_len * m2
    for path in args.data:
        if os.path.isdir(path):
            raise CliError(f"--data {path}: is a directory, expected a JSONL file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
    # every field was checked above or by argparse (choices): a ValueError here would be a bug
    dcfg = DataConfig(jsonl=tuple(args.data), seq_len=args.seq_len, batch_size=args.batch_size,
                      max_patches=max_patches, packing=not args.no_packing, shuffle=False, num_epochs=1,
                      on_error=args.on_error, loss_on_thinking=not args.no_loss_on_thinking)
    if args.mesh == "none":
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    else:
        mesh = make_mesh(args.mesh)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    sc = StepConfig(compute_dtype=dtype, remat_policy="none")
    if args.adapter is None:
        ts = TrainStep(cfg, OptimConfig(), mesh, sc)
        params = load_params(model_dir, ts)
    else:
        params, ts = _adapter_step(args.adapter, model_dir, args.model, cfg, mesh, sc)
    it = make_iterator(dcfg, model_dir, 0, 1, cfg)
    total, count, batches = LossEvaluator(ts, max_patches).run(params, it)
    stats = dict(it.stats)
    it.close()
    samples = int(stats.get("samples", 0))
    if samples == 0 or count == 0:
        raise CliError(f"no usable sample in {', '.join(args.data)} ({stats.get('skipped', 0)} skipped)")
    if int(stats["label_tokens"]) != int(count):
        raise AssertionError(f"label tokens {count} != the packer's count {stats['label_tokens']}")
    out = {"loss": total / count, "tokens": int(count), "samples": samples, "skipped": int(stats.get("skipped", 0)),
           "batches": batches}
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        print(f"loss {out['loss']:.6f} over {out['tokens']} label tokens in {samples} samples "
              f"({out['skipped']} skipped, {batches} batches)")
    return 0


def _adapter_step(adapter: str, model_dir: str, model: str, cfg: Glm4vConfig, mesh: Any, sc: StepConfig
                  ) -> tuple[Any, TrainStep]:
    """(the adapters placed, the LoRA step holding the base) for `glm41v loss --adapter`; LoraError for an adapter
    of another base."""
    from glm41v_jax.lora import check_base, load_adapters, read_adapter_config
    from glm41v_jax.quant_checkpoint import checkpoint_quantization

    from .lora_step import LoraTrainStep

    _, lora = read_adapter_config(adapter)  # a bad adapter directory fails before the weights are read
    ts = LoraTrainStep(cfg, OptimConfig(), mesh, sc, lora, checkpoint_quantization(model_dir))
    adapters, _, meta = load_adapters(adapter, ts.cfg)
    ts.load_base(model_dir)
    check_base(meta, ts.identity(), adapter, model)
    return ts.place_params(adapters), ts


def run_loss(args: argparse.Namespace) -> int:
    return _guarded(_loss, args)


# ---------------------------------------------------------------------------------------------------------------


def _guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """glm41v_jax.cli.common.guarded, with a missing train extra said as such instead of a ModuleNotFoundError."""

    def call(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
                raise
            raise CliError(f"glm41v {a.command} needs the train extra: pip install -e '.[train]' (no module named "
                           f"{e.name!r})") from None

    return guarded(call, args)


def register(subparsers: Any) -> None:
    """Both commands (`train`, `loss`) on a `glm41v` subparsers object."""
    register_train(subparsers)
    register_loss(subparsers)
