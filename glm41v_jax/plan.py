"""`glm41v plan`: will it fit on a Cloud TPU slice, and how fast can it be, before anyone pays for one.

The real TPU compiler (libtpu, from `pip install 'glm41v-jax[tpu]'`) runs on any machine: the devices of a TPU
topology come from `jax.experimental.topologies.get_topology_desc`, and the programs are lowered with abstract
inputs (ShapeDtypeStructs with shardings: no weights, no TPU) and compiled for those devices. The programs are the
ones that run, not copies:

  * generation: an `Engine` without params (`Engine(None, cfg, mesh=...)`) whose `warmup` compiles its prefill and
    decode programs for one bucket (batch, prompt, new tokens, images);
  * training: `TrainStep(...).jitted(batch)`, the step `glm41v train` runs, with the abstract params and optimizer
    state of `train/loop.py` (`abstract_state`) and a batch of the config's static shapes.

A multi-host slice (v5p-16 and up, v5e/v6e above 8 chips) is compiled for all its devices at once, as one program.

Figures (per chip: per jax device, which is a chip except on v4, where each of the 2 TensorCores is a device):
  * memory, from `compiled.memory_analysis()`: the compiler's peak of the largest program (`memory_figures`);
    the parameter, optimizer-state and KV-cache parts are the shard sizes of those arrays under their shardings;
  * FLOPs and HBM bytes: analytic (model FLOPs as in `glm41v_train.metrics.FlopCounter`; decode bytes = the text
    weights and the KV cache read once), next to the compiler's `cost_analysis()`. The compiler counts a loop body
    once: the decode program's `while_loop` body is one decode step (so its figure is per step), and a scanned
    train step counts one layer; the train step's compiled FLOPs per decoder layer are therefore taken from the
    unrolled step at 1 and 2 decoder layers (their difference);
  * roofline: decode tokens/s when each step reads its minimum bytes at the chip's HBM bandwidth; prefill and train
    step seconds at the chip's peak bf16 FLOP/s, and the MFU a measured step time means (`--step-time`);
  * efficiency: decode: minimum bytes / the compiled step's bytes accessed; train: model FLOPs of a decoder layer /
    its compiled FLOPs (the remat recompute shows here: ~0.75 with full remat).

A plan that does not fit (the compiler's RESOURCE_EXHAUSTED, or a total above HBM) exits 1 with the compiler's
figures and what would fit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from glm41v_train.metrics import FlopCounter

from .buckets import bucket_length, cache_length, format_bytes
from .config import Glm4vConfig, dtype_flag
from .engine import Engine
from .errors import Glm41vError
from .model import init_cache
from .pipeline import auto_mesh_spec
from .processing.image import ImageProcessor
from .requests import synthetic_inputs
from .sharding import make_mesh
from .tpu_cost import calibrated_bytes, decode_minimum_bytes

GiB = 1 << 30
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "configs")
BUILTIN_CONFIGS = {"9b": "glm41v_9b.json", "glm41v-9b": "glm41v_9b.json", "glm-4.1v-9b-thinking": "glm41v_9b.json"}
FRAME_PATCHES = 1024  # train plans: vision attention FLOPs assume images of 32 x 32 patches (448 x 448 px)


class PlanError(Glm41vError, ValueError):
    """A bad plan request (TPU name, mesh, sizes, config); the message says what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Cloud TPU types.


@dataclasses.dataclass(frozen=True)
class Family:
    hbm_bytes: int  # per chip (what the runtime lets programs allocate)
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    counts_cores: bool  # the type name counts TensorCores (2 per chip), not chips
    shapes: Mapping[int, str] = dataclasses.field(hash=False)  # chips -> topology shape


_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}

# Google's published per-chip figures (cloud.google.com/tpu/docs/v5e, v6e, v5p, v4).
FAMILIES: dict[str, Family] = {
    "v5e": Family(16 * GiB, 197e12, 819e9, False, _SHAPES_2D),
    "v6e": Family(32 * GiB, 918e12, 1640e9, False, _SHAPES_2D),
    "v5p": Family(95 * GiB, 459e12, 2765e9, True, _SHAPES_3D),
    "v4": Family(32 * GiB, 275e12, 1228e9, True, _SHAPES_3D),
}
_ALIASES = {"v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e", "v5p": "v5p", "v4": "v4"}


@dataclasses.dataclass(frozen=True)
class TpuType:
    name: str  # as Google spells it, e.g. "v5e-8", "v5p-64"
    family: str
    chips: int
    hosts: int
    topology: str  # get_topology_desc's name, e.g. "v5e:2x4"
    chips_per_host_bounds: tuple[int, int, int] | None  # one-host shapes only
    spec: Family

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "chips": self.chips, "hosts": self.hosts,
                "topology": self.topology, "hbm_bytes_per_chip": self.spec.hbm_bytes,
                "peak_bf16_flops_per_chip": self.spec.peak_flops, "hbm_bandwidth_per_chip": self.spec.hbm_bandwidth}


def parse_tpu(name: str) -> TpuType:
    """'v5e-8' / 'v5litepod-8' / 'v6e-4' (chips), 'v5p-64' / 'v4-32' (TensorCores, 2 per chip) -> TpuType."""
    m = re.fullmatch(r"\s*(v5litepod|v5e|v6e|v5p|v4)-(\d+)\s*", str(name).lower())
    if m is None:
        raise PlanError(f"--tpu: unknown TPU type {name!r}; expected v5e-N (or v5litepod-N), v6e-N, v5p-N or v4-N, "
                        "e.g. v5e-8, v5p-64")
    family = _ALIASES[m.group(1)]
    spec = FAMILIES[family]
    count = int(m.group(2))
    chips = count // 2 if spec.counts_cores else count
    valid = sorted(c * 2 if spec.counts_cores else c for c in spec.shapes)
    if (spec.counts_cores and count % 2) or chips not in spec.shapes:
        raise PlanError(f"--tpu: {name!r} is not a {family} slice; valid sizes: "
                        f"{', '.join(f'{family}-{v}' for v in valid)}")
    shape = spec.shapes[chips]
    dims = tuple(int(d) for d in shape.split("x"))
    one_host = chips <= (8 if family in ("v5e", "v6e") else 4)
    bounds = (tuple(dims) + (1,) * (3 - len(dims))) if one_host else None
    return TpuType(f"{family}-{count}", family, chips, 1 if one_host else chips // 4, f"{family}:{shape}", bounds,
                   spec)


def topology_devices(tpu: TpuType) -> tuple[Any, ...]:
    """The jax devices of the slice, for compiling only (the real TPU compiler; no TPU needed)."""
    return _topology(tpu.name, tpu.topology, tpu.chips_per_host_bounds)


@functools.lru_cache(maxsize=16)
def _topology(name: str, topology: str, bounds: tuple[int, int, int] | None) -> tuple[Any, ...]:
    # Several processes may load libtpu at once here (it only compiles); without this flag the second one fails
    # on libtpu's lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Not on a TPU VM: tell libtpu so instead of letting it query the metadata server and log errors.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    from jax.experimental import topologies  # only plan needs the TPU plugin

    kw = {} if bounds is None else {"chips_per_host_bounds": bounds}
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
    except Exception as e:  # noqa: BLE001 - no libtpu, or a libtpu that does not know the shape
        raise PlanError(f"cannot build the {name} topology ({topology}) with the TPU compiler: "
                        f"{' '.join(str(e).split())[:300]} (install libtpu: pip install 'glm41v-jax[tpu]')") from None
    return tuple(topo.devices)


# ---------------------------------------------------------------------------------------------------------------
# Model configs.


def model_config(model: str | os.PathLike | None = None, config: str | None = None) -> Glm4vConfig:
    """`--model DIR` (its config.json; no weights are read) or a built-in `--config` name (default '9b')."""
    if model is not None:
        return Glm4vConfig.from_file(model)
    key = (config or "9b").lower()
    if key not in BUILTIN_CONFIGS:
        raise PlanError(f"--config: unknown built-in model {config!r}; expected one of {', '.join(BUILTIN_CONFIGS)} "
                        "(or --model DIR with a config.json)")
    return Glm4vConfig.from_file(os.path.join(CONFIG_DIR, BUILTIN_CONFIGS[key]))


def parse_image_size(text: str) -> tuple[int, int]:
    """'WxH' (pixels) -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise PlanError(f"--image: expected WIDTHxHEIGHT in pixels, e.g. 1280x720, got {text!r}")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------------------
# Compiler figures.


def shard_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs or arrays) under its shardings (or `shardings`)."""
    leaves = jax.tree.leaves(tree)
    shs = [getattr(x, "sharding", None) for x in leaves] if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for x, s in zip(leaves, shs, strict=True):
        shape = tuple(x.shape) if s is None else tuple(s.shard_shape(tuple(x.shape)))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def memory_figures(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled program (memory_analysis). `total_bytes` is the compiler's peak (what it checks
    against HBM) where it reports one: the temporaries may reuse donated argument buffers, so arguments + outputs -
    aliased + temporaries can exceed the real peak (by GiBs for a train step). `live_bytes`: peak - arguments,
    what the program needs beyond its inputs."""
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, k, 0) or 0)  # noqa: E731
    arg, out, alias, temp = (get("argument_size_in_bytes"), get("output_size_in_bytes"), get("alias_size_in_bytes"),
                             get("temp_size_in_bytes"))
    peak = get("peak_memory_in_bytes") or arg + out - alias + temp
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "code_bytes": get("generated_code_size_in_bytes"), "peak_bytes": peak, "total_bytes": peak,
            "live_bytes": max(peak - arg, 0)}


def cost_figures(compiled: Any) -> dict[str, float]:
    """The compiler's per-device FLOPs and HBM bytes accessed (cost_analysis; a loop body is counted once)."""
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom(message: str) -> dict[str, Any] | None:
    """The figures of a TPU compiler RESOURCE_EXHAUSTED error: {"required_bytes", "available_bytes", "message"}
    (None when the message is not an out-of-memory one)."""
    text = " ".join(str(message).split())
    if "RESOURCE_EXHAUSTED" not in text and "exceeds available HBM" not in text:
        return None
    m = re.search(r"([\d.]+)\s*([KMGT]?)(?:i?B)?\)?\s*exceeds available HBM \(([\d.]+)\s*([KMGT]?)(?:i?B)?\)", text)
    out: dict[str, Any] = {"message": text[:400], "required_bytes": None, "available_bytes": None}
    if m:
        out["required_bytes"] = int(float(m.group(1)) * _UNITS[m.group(2)])
        out["available_bytes"] = int(float(m.group(3)) * _UNITS[m.group(4)])
    return out


def _compile_oom(e: BaseException) -> dict[str, Any] | None:
    return parse_oom(str(e)) if isinstance(e, (jax.errors.JaxRuntimeError, RuntimeError)) else None


def _next_size(tpu: TpuType, need_per_chip: float) -> str | None:
    """The smallest larger slice of the family whose HBM holds the same bytes spread over more chips (to 90%)."""
    spec = tpu.spec
    total = need_per_chip * tpu.chips
    for chips in sorted(spec.shapes):
        if chips > tpu.chips and total / chips <= 0.9 * spec.hbm_bytes:
            return f"{tpu.family}-{chips * 2 if spec.counts_cores else chips}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Plans.


def _devices_and_mesh(tpu: TpuType, spec: str | None, default: str | None) -> tuple[tuple[Any, ...], Any, str]:
    devices = topology_devices(tpu)
    spec = spec if spec else default
    try:
        mesh = make_mesh(spec, devices)
    except Glm41vError as e:
        raise PlanError(f"--mesh: {str(e).removeprefix('--mesh: ')} ({tpu.name} has {len(devices)} devices)") from None
    return devices, mesh, ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"


def _per_device(tpu: TpuType, n_devices: int) -> tuple[float, float, float]:
    """(HBM bytes, peak FLOP/s, HBM bytes/s) per jax device (a chip; half a chip on v4)."""
    share = tpu.chips / n_devices
    return tpu.spec.hbm_bytes * share, tpu.spec.peak_flops * share, tpu.spec.hbm_bandwidth * share


def plan_generate(cfg: Glm4vConfig, tpu: TpuType, *, batch: int = 1, max_context: int = 8192,
                  max_new_tokens: int = 1024, images: Sequence[tuple[int, int]] = (), dtype: str = "bfloat16",
                  mesh: str | None = None, attention: str = "auto", chunk_size: int = 16,
                  kernel_layout: str | None = None) -> dict[str, Any]:
    """Compile the Engine's prefill and decode for one bucket: `batch` rows, `max_new_tokens` new tokens after the
    longest prompt whose KV cache (prompt bucket + new tokens, rounded up) fits in `max_context` slots (8192 and
    1024: a 7168-token prompt); images ((width, height) in pixels, resized as the processor does) are part of it.
    `kernel_layout` None: the Engine's own choice for the slice's platform."""

    if batch < 1:
        raise PlanError(f"--batch must be >= 1, got {batch}")
    if not 1 <= max_new_tokens < max_context:
        raise PlanError(f"--max-new-tokens must be in [1, --max-context), got {max_new_tokens} with --max-context "
                        f"{max_context}")
    if max_context > cfg.text.max_position_embeddings:
        raise PlanError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                        f"{cfg.text.max_position_embeddings}")
    if dtype not in ("bfloat16", "float32"):
        raise PlanError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
    devices, mesh_obj, mesh_desc = _devices_and_mesh(tpu, mesh, auto_mesh_spec(cfg.text.num_attention_heads,
                                                                                 len(topology_devices(tpu))))
    hbm, peak, bw = _per_device(tpu, len(devices))
    rcfg = cfg.with_runtime(**dtype_flag(dtype), attention_impl=attention, scan_layers=False)
    eng = Engine(None, rcfg, mesh=mesh_obj, chunk_size=chunk_size, max_context=max_context,
                 kernel_layout=kernel_layout)
    proc = ImageProcessor()
    sizes = [tuple(proc.target_size(h, w)) for w, h in images]
    prompt = max_context - max_new_tokens  # the longest prompt whose bucketed cache stays within max_context
    while prompt > 1 and cache_length(bucket_length(prompt), max_new_tokens) > max_context:
        prompt -= 1
    bucket = {"batch": batch, "prompt_tokens": prompt, "max_new_tokens": max_new_tokens, "images": sizes}
    prep = eng.prepare(synthetic_inputs(eng.cfg, **bucket), max_new_tokens)
    n_prompt, slots = prep.prompt_len, prep.max_len

    # Analytic per-device figures.
    params_b = shard_bytes(eng.params)
    cache = jax.eval_shape(lambda: init_cache(eng.cfg, batch, slots))
    kv_b = shard_bytes(cache, eng.cache_shardings(cache))
    decode_min = decode_minimum_bytes(eng.params, cache, eng.cache_shardings(cache), batch)["minimum_bytes"]
    patches = sum((h // cfg.vision.patch_size) * (w // cfg.vision.patch_size) for h, w in sizes)  # one frame each
    counter = FlopCounter(eng.cfg, eng.params, freeze=("vision", "projector", "decoder"))  # forward only
    prefill_flops = counter.step_flops({"tokens": batch * n_prompt, "attn_s2": batch * n_prompt * (n_prompt + 1),
                                        "patches": patches,
                                        "frame_n2": sum(((h // cfg.vision.patch_size) * (w // cfg.vision.patch_size))
                                                        ** 2 for h, w in sizes)})
    if not cfg.tie_word_embeddings:  # prefill computes the logits of the last slot only
        prefill_flops -= 2.0 * cfg.text.vocab_size * cfg.text.hidden_size * batch * (n_prompt - 1)
    decode_flops = counter.step_flops({"tokens": batch, "attn_s2": 2 * batch * slots, "patches": 0, "frame_n2": 0})

    report: dict[str, Any] = {
        "kind": "generate", "tpu": tpu.name, "topology": tpu.topology, "chips": tpu.chips, "hosts": tpu.hosts,
        "devices": len(devices), "mesh": mesh_desc, "model": _model_desc(cfg), "dtype": dtype,
        "attention_impl": attention, "kernel_layout": eng.cfg.runtime.kernel_layout,
        "bucket": {"batch": batch, "prompt_tokens": n_prompt, "max_new_tokens": max_new_tokens, "cache_slots": slots,
                   "images": [list(s) for s in sizes], "vision_patches": patches},
        "per_chip": {"params_bytes": params_b, "opt_state_bytes": 0, "kv_cache_bytes": kv_b, "temp_bytes": 0,
                     "total_bytes": params_b + kv_b, "hbm_bytes": int(hbm)},
        "programs": [],
    }
    report["analytic"] = {"prefill_flops": prefill_flops, "prefill_flops_per_chip": prefill_flops / len(devices),
                          "decode_flops_per_step": decode_flops,
                          "decode_min_bytes_per_chip": decode_min,
                          "note": "prefill: 2*N*tokens (logits of the last slot only) + causal attention + vision; "
                                  "decode minimum: text weights (embedding table excluded: B rows gathered) and the "
                                  "KV cache, read once per step"}
    report["roofline"] = {
        "decode_tokens_per_s_bound": batch * bw / decode_min,
        "decode_step_s_bound": decode_min / bw,
        "prefill_s_at_peak": prefill_flops / (peak * len(devices)),
        "prefill_tokens_per_s_at_peak": batch * n_prompt * peak * len(devices) / prefill_flops,
    }
    try:
        eng.warmup([bucket])
    except Exception as e:  # the compiler's RESOURCE_EXHAUSTED; anything else is a bug and is re-raised
        oom = _compile_oom(e)
        if oom is None:
            raise
        failed = "prefill" if not eng.programs() else "decode"
        _record_programs(report, eng.programs())
        return _not_fit(report, oom, failed, _generate_advice(tpu, batch, kv_b, params_b, hbm, oom, mesh_obj,
                                                              cfg.text.num_key_value_heads))
    _record_programs(report, eng.programs())
    progs = {p["name"]: p for p in report["programs"]}
    dec = progs["decode"]
    dec_hbm = dec["hbm_bytes"]
    report["roofline"]["decode_tokens_per_s_at_compiled_bytes"] = batch * bw / dec_hbm if dec_hbm else None
    report["efficiency"] = {
        "decode_bytes_ratio": decode_min / dec_hbm if dec_hbm else None,
        "decode_bytes_ratio_uncalibrated": decode_min / dec["bytes_accessed"] if dec["bytes_accessed"] else None,
        "prefill_flops_ratio": (prefill_flops / len(devices)) / progs["prefill"]["flops"]
        if progs["prefill"]["flops"] else None,
        "note": "decode: minimum bytes / the HBM bytes of one step of the compiled decode loop (tpu_cost."
                "calibrated_bytes; the compiler's own 'bytes accessed' also counts on-chip copies: the "
                "uncalibrated ratio); prefill: model FLOPs / compiled FLOPs"}
    return _finish(report, hbm)


def _record_programs(report: dict[str, Any], programs: Sequence[tuple[str, Any, float]]) -> None:
    for name, exe, seconds in programs:
        report["programs"].append({"name": name, "compile_s": round(seconds, 2), **cost_figures(exe),
                                   "hbm_bytes": calibrated_bytes(exe), "memory": memory_figures(exe)})


def _finish(report: dict[str, Any], hbm: float) -> dict[str, Any]:
    pc = report["per_chip"]
    progs = report["programs"]
    if progs:
        # Resident: every weight (a program's own arguments leave out what it does not read, e.g. the vision tower
        # in decode), the optimizer state and the KV cache, plus what the largest program needs beyond its inputs.
        resident = pc["params_bytes"] + pc["opt_state_bytes"] + pc["kv_cache_bytes"]
        pc["temp_bytes"] = max(p["memory"]["live_bytes"] for p in progs)
        pc["total_bytes"] = max(max(resident + p["memory"]["live_bytes"], p["memory"]["total_bytes"]) for p in progs)
    report["fits"] = pc["total_bytes"] <= hbm
    if not report["fits"]:
        report["advice"] = [f"the compiled total {format_bytes(pc['total_bytes'])} per chip exceeds "
                            f"{format_bytes(hbm)} of HBM"]
    return report


def _not_fit(report: dict[str, Any], oom: Mapping[str, Any], program: str, advice: list[str]) -> dict[str, Any]:
    report["fits"] = False
    report["compile_error"] = {"program": program, **oom}
    if oom.get("required_bytes"):
        report["per_chip"]["total_bytes"] = max(report["per_chip"]["total_bytes"], oom["required_bytes"])
    report.setdefault("roofline", {})  # the analytic bounds, as if it fitted
    report["efficiency"] = {"decode_bytes_ratio" if report["kind"] == "generate" else "flops_ratio": None}
    report["advice"] = advice
    return report


def _generate_advice(tpu: TpuType, batch: int, kv_b: float, params_b: float, hbm: float,
                     oom: Mapping[str, Any], mesh: Any, kv_heads: int) -> list[str]:
    need = max(oom.get("required_bytes") or 0, params_b + kv_b)
    out = []
    bigger = _next_size(tpu, need)
    if bigger:
        out.append(f"more chips: {bigger} (the weights and the cache shard over the tensor/fsdp axes)")
    free = 0.9 * hbm - params_b
    if free > 0 and kv_b > 0:
        rows = int(batch * free / max(need - params_b, 1))
        out.append(f"a smaller batch or context: the weights alone take {format_bytes(params_b)} of "
                   f"{format_bytes(hbm)}; at least ~{max(rows, 1)} row(s) of this context fit beside them (the "
                   "compiler's total scaled linearly with the batch)")
        tensor = mesh.shape["tensor"]
        if tensor > kv_heads and batch > 1:
            out.append(f"a mesh that splits the batch: {kv_heads} KV heads cannot be split {tensor} ways, so "
                       f"each chip holds 1/{kv_heads} of the KV cache instead of 1/{tensor}; e.g. --mesh "
                       f"fsdp={mesh.devices.size // kv_heads},tensor={kv_heads}")
    else:
        out.append(f"the weights alone ({format_bytes(params_b)} per chip) exceed the chip's {format_bytes(hbm)}: "
                   "a smaller batch or context cannot help")
    out.append(f"int8 weights (not implemented yet) would take about {format_bytes(params_b / 2)} per chip")
    return out


def _model_desc(cfg: Glm4vConfig) -> str:
    t, v = cfg.text, cfg.vision
    return (f"text {t.num_hidden_layers}x{t.hidden_size} ({t.num_attention_heads}/{t.num_key_value_heads} heads, "
            f"vocab {t.vocab_size}), vision {v.depth}x{v.hidden_size}")


def plan_train(train_config: Any, cfg: Glm4vConfig, tpu: TpuType, *, mesh: str | None = None,
               step_time: float | None = None, count_flops: bool = True) -> dict[str, Any]:
    """Compile the train step of a `glm41v_train.config.TrainConfig` for the slice (every host's batch: the
    config's `data.batch_size` rows of `data.seq_len` tokens and `data.max_patches` patches)."""
    # The training modules need the train extra (pyyaml, grain): imported here, not at the top.
    from glm41v_train.assembly import global_shapes
    from glm41v_train.packing import assemble_batch
    from glm41v_train.params import abstract_state
    from glm41v_train.step import TrainStep, stack_batches

    if step_time is not None and not step_time > 0:
        raise PlanError(f"--step-time must be > 0 seconds, got {step_time}")
    devices, mesh_obj, mesh_desc = _devices_and_mesh(tpu, mesh, train_config.mesh)
    hbm, peak, bw = _per_device(tpu, len(devices))
    dc, sc, oc = train_config.data, train_config.step, train_config.optim
    n_batch = mesh_obj.shape["data"] * mesh_obj.shape["fsdp"]
    rows = dc.batch_size * tpu.hosts
    if n_batch % tpu.hosts == 0 and dc.batch_size % (n_batch // tpu.hosts):
        raise PlanError(f"data.batch_size ({dc.batch_size}) must be a multiple of the batch shards per host "
                        f"({n_batch // tpu.hosts} = data x fsdp / {tpu.hosts} hosts)")
    a = sc.accum_steps

    def abstract_batch(ts: Any, accum: int) -> Any:
        local = assemble_batch([[] for _ in range(dc.batch_size)], seq_len=dc.seq_len, max_patches=dc.max_patches,
                               model_cfg=cfg, pad_id=0)
        if accum > 1:
            local = stack_batches([local] * accum)
        shapes = global_shapes(local, tpu.hosts, 1 if accum > 1 else 0)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            ts.batch_shardings(shapes))

    def compile_step(ts: Any, accum: int) -> tuple[Any, float]:
        params, opt = abstract_state(ts)
        batch = abstract_batch(ts, accum)
        t0 = time.perf_counter()
        exe = ts.jitted(batch).lower(params, opt, batch).compile()
        return exe, time.perf_counter() - t0

    # Built under the slice's mesh: tracing the model (abstract params) with a TPU kernel as the attention backend
    # must see the TPU platform, not this host's CPU.
    with jax.sharding.use_abstract_mesh(mesh_obj.abstract_mesh):
        ts = TrainStep(cfg, oc, mesh_obj, sc)
    a_params, a_opt = abstract_state(ts)
    counter = FlopCounter(ts.cfg, ts.abstract_params, oc.freeze)
    patches = dc.max_patches * tpu.hosts * a
    tokens = rows * dc.seq_len * a
    stats = {"tokens": tokens, "attn_s2": rows * a * dc.seq_len * (dc.seq_len + 1), "patches": patches,
             "frame_n2": patches * min(FRAME_PATCHES, dc.max_patches)}
    model_flops = counter.step_flops(stats)
    report: dict[str, Any] = {
        "kind": "train", "tpu": tpu.name, "topology": tpu.topology, "chips": tpu.chips, "hosts": tpu.hosts,
        "devices": len(devices), "mesh": mesh_desc, "model": _model_desc(cfg),
        "step": {"global_rows": rows, "seq_len": dc.seq_len, "accum_steps": a, "tokens_per_step": tokens,
                 "patches_per_step": patches, "remat_policy": sc.remat_policy, "compute_dtype": sc.compute_dtype,
                 "grad_dtype": sc.grad_dtype, "freeze": list(oc.freeze), "state_dtype": getattr(oc, "state_dtype",
                                                                                                  None)},
        "per_chip": {"params_bytes": shard_bytes(a_params), "opt_state_bytes": shard_bytes(a_opt),
                     "kv_cache_bytes": 0, "temp_bytes": 0, "total_bytes": shard_bytes(a_params) + shard_bytes(a_opt),
                     "hbm_bytes": int(hbm)},
        "programs": [],
    }
    n_dev = len(devices)
    report["analytic"] = {
        "model_flops_per_step": model_flops, "model_flops_per_chip": model_flops / n_dev,
        "note": "6*N*tokens (trained groups; frozen ones 2x or 1x) + attention, every row one sequence of seq_len "
                f"tokens, images of {FRAME_PATCHES} patches; the compiled figure counts the scanned layer once"}
    at_peak = model_flops / (peak * n_dev)
    report["roofline"] = {"step_s_at_peak": at_peak, "step_s_at_50pct_mfu": 2 * at_peak,
                          "tokens_per_s_at_50pct_mfu": tokens / (2 * at_peak)}
    if step_time is not None:
        report["roofline"]["step_time_s"] = step_time
        report["roofline"]["mfu_at_step_time"] = at_peak / step_time
    try:
        exe, secs = compile_step(ts, a)
    except Exception as e:  # the compiler's RESOURCE_EXHAUSTED; anything else is a bug and is re-raised
        oom = _compile_oom(e)
        if oom is None:
            raise
        pc = report["per_chip"]
        advice = []
        bigger = _next_size(tpu, max(oom.get("required_bytes") or 0, pc["total_bytes"]))
        if bigger:
            advice.append(f"more chips: {bigger} (params, moments and gradients shard over fsdp)")
        if sc.remat_policy != "full":
            advice.append("step.remat_policy: full (recompute each layer in the backward pass: least memory)")
        advice.append(f"fewer rows per micro-batch: data.batch_size {dc.batch_size} -> {max(dc.batch_size // 2, 1)} "
                      f"with step.accum_steps {a} -> {a * 2} (the same tokens per update), or a shorter data.seq_len")
        if getattr(oc, "state_dtype", "float32") != "bfloat16":
            advice.append("optim.state_dtype: bfloat16 (half the Adam moments)")
        if "vision" not in oc.freeze:
            advice.append("optim.freeze: [vision] (no vision moments, gradients or backward)")
        return _not_fit(report, oom, "train_step", advice)
    report["programs"].append({"name": "train_step", "compile_s": round(secs, 2), **cost_figures(exe),
                               "hbm_bytes": calibrated_bytes(exe), "memory": memory_figures(exe)})
    report["efficiency"] = {"flops_ratio": None}
    if count_flops:
        # The compiler counts a scanned body once: the per-layer count comes from the unrolled step at 1 and 2
        # decoder layers (one micro-batch, a 1-block vision tower; the same mesh, remat and shapes).
        counts = []
        for n_layers in (1, 2):
            small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=n_layers),
                                        vision=dataclasses.replace(cfg.vision, depth=1))
            with jax.sharding.use_abstract_mesh(mesh_obj.abstract_mesh):
                sts = TrainStep(small, oc, mesh_obj, dataclasses.replace(sc, accum_steps=1, scan_layers=False))
            exe_n, secs_n = compile_step(sts, 1)
            counts.append(cost_figures(exe_n)["flops"])
            report["programs"].append({"name": f"train_step_unrolled_{n_layers}_layer", "compile_s": round(secs_n, 2),
                                       **cost_figures(exe_n), "hbm_bytes": calibrated_bytes(exe_n),
                                       "memory": memory_figures(exe_n)})
        layer_compiled = (counts[1] - counts[0]) * n_dev
        t = cfg.text
        flat = jax.tree_util.tree_flatten_with_path(ts.abstract_params)[0]
        layer_kernels = sum(int(np.prod(x.shape)) for p, x in flat
                            if [str(getattr(k, "key", k)) for k in p][:2] == ["language_model", "layers"]
                            and str(getattr(p[-1], "key", p[-1])) == "kernel") / t.num_hidden_layers
        layer_model = counter.mult["decoder"] * (
            2.0 * layer_kernels * (rows * dc.seq_len)
            + 2 * t.num_attention_heads * t.head_dim * rows * dc.seq_len * (dc.seq_len + 1))
        report["efficiency"] = {
            "flops_ratio": layer_model / layer_compiled if layer_compiled > 0 else None,
            "layer_model_flops": layer_model, "layer_compiled_flops": layer_compiled,
            "note": "one decoder layer, one micro-batch: model FLOPs / compiled FLOPs (unrolled 2-layer minus 1-layer "
                    "step); < 1 is the remat recompute and the attention's masked blocks"}
        report["analytic"]["compiled_flops_per_step_estimate"] = layer_compiled * t.num_hidden_layers * a
    return _finish(report, hbm)


# ---------------------------------------------------------------------------------------------------------------
# Output.


def _fmt_flops(x: float | None) -> str:
    if not x:
        return "-"
    for unit, f in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= f:
            return f"{x / f:.2f} {unit}"
    return f"{x:.3g} FLOP"


def format_report(r: Mapping[str, Any]) -> str:
    """The plan as a few aligned lines (per chip)."""
    lines = [f"plan: {r['kind']} on {r['tpu']} ({r['topology']}: {r['chips']} chips, {r['hosts']} host"
             f"{'s' if r['hosts'] > 1 else ''}, {r['devices']} devices), mesh {r['mesh']}",
             f"model: {r['model']}"]
    if r["kind"] == "generate":
        b = r["bucket"]
        lines.append(f"bucket: batch {b['batch']}, prompt {b['prompt_tokens']} tokens ({b['vision_patches']} vision "
                     f"patches), {b['max_new_tokens']} new tokens, KV cache {b['cache_slots']} slots; {r['dtype']}, "
                     f"attention {r['attention_impl']}")
    else:
        s = r["step"]
        lines.append(f"step: {s['global_rows']} rows x {s['seq_len']} tokens x {s['accum_steps']} micro-batches = "
                     f"{s['tokens_per_step']} tokens, {s['patches_per_step']} patches; remat {s['remat_policy']}, "
                     f"grads {s['grad_dtype']}, moments {s['state_dtype']}, frozen {s['freeze'] or 'none'}")
    pc = r["per_chip"]
    hbm = pc["hbm_bytes"]
    lines.append("per chip:")
    for label, key in (("parameters", "params_bytes"), ("optimizer state", "opt_state_bytes"),
                       ("KV cache", "kv_cache_bytes"), ("temporaries", "temp_bytes"), ("total", "total_bytes")):
        lines.append(f"  {label:<18}{format_bytes(pc[key]):>12}  {100 * pc[key] / hbm:5.1f}% of "
                     f"{format_bytes(hbm)} HBM")
    if r["programs"]:
        lines.append("programs (per chip; the compiler counts a loop body once):")
        for p in r["programs"]:
            lines.append(f"  {p['name']:<30} compile {p['compile_s']:7.2f} s  {_fmt_flops(p['flops']):>12}  "
                         f"HBM {format_bytes(p.get('hbm_bytes', p['bytes_accessed'])):>11}  "
                         f"total {format_bytes(p['memory']['total_bytes'])}")
    an = r.get("analytic", {})
    ro = r.get("roofline", {})
    ef = r.get("efficiency", {})
    if r["kind"] == "generate" and ro:
        lines.append(f"prefill: {_fmt_flops(an['prefill_flops'])} ({_fmt_flops(an['prefill_flops_per_chip'])} per chip)"
                     f", {ro['prefill_s_at_peak'] * 1e3:.1f} ms at peak")
        lines.append(f"decode: minimum {format_bytes(an['decode_min_bytes_per_chip'])} per chip per step -> at most "
                     f"{ro['decode_tokens_per_s_bound']:.0f} tokens/s ({ro['decode_step_s_bound'] * 1e3:.2f} ms/step)")
        if ef.get("decode_bytes_ratio") is not None:
            lines.append(f"efficiency: decode bytes ratio {ef['decode_bytes_ratio']:.2f} (minimum / the compiled "
                         f"step's HBM bytes; {ef['decode_bytes_ratio_uncalibrated']:.2f} against the compiler's "
                         "'bytes accessed')")
    if r["kind"] == "train" and ro:
        lines.append(f"model FLOPs per step: {_fmt_flops(an['model_flops_per_step'])} "
                     f"({_fmt_flops(an['model_flops_per_chip'])} per chip); step {ro['step_s_at_peak']:.2f} s at peak, "
                     f"{ro['step_s_at_50pct_mfu']:.2f} s at 50% MFU ({ro['tokens_per_s_at_50pct_mfu']:.0f} tokens/s)")
        if "mfu_at_step_time" in ro:
            lines.append(f"a measured step of {ro['step_time_s']:.3g} s means MFU {100 * ro['mfu_at_step_time']:.1f}%")
        if ef.get("flops_ratio") is not None:
            lines.append(f"efficiency: decoder-layer FLOPs ratio {ef['flops_ratio']:.2f} (model / compiled; remat "
                         "recompute)")
    if r.get("compile_error"):
        ce = r["compile_error"]
        req, avail = ce.get("required_bytes"), ce.get("available_bytes")
        figs = f"{format_bytes(req)} needed, {format_bytes(avail)} available" if req else ce["message"]
        lines.append(f"DOES NOT FIT: the TPU compiler refused the {ce['program']} program: {figs}")
        lines.append(f"  compiler: {ce['message']}")
    elif not r["fits"]:
        lines.append("DOES NOT FIT")
    else:
        lines.append(f"fits: {format_bytes(pc['total_bytes'])} of {format_bytes(hbm)} per chip")
    for a in r.get("advice", []):
        lines.append(f"  would fit: {a}" if not r["fits"] else f"  {a}")
    return "\n".join(lines)
