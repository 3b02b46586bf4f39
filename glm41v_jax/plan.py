"""`glm41v plan`: will it fit on a Cloud TPU slice, and how fast can it be, before anyone pays for one.

The programs are compiled by the real TPU compiler (libtpu) for the devices of a slice (`glm41v_jax.tpu_slices`:
the slice types, their published per-chip figures, the devices; no TPU needed), lowered with abstract inputs
(ShapeDtypeStructs with shardings: no weights). The programs are the ones that run, not copies:

  * generation: an `Engine` without params (`Engine(None, cfg, mesh=...)`) whose `warmup` compiles its prefill and
    decode programs for one bucket (batch, prompt, new tokens, images);
  * training: the step `glm41v train` runs (`lora_step.make_train_step`), compiled by its own `compile(batch)` from
    abstract params and optimizer state (`params.abstract_state`) and a batch of the config's static shapes: the
    full-weight `TrainStep`, or for a config with a `lora:` section the `LoraTrainStep` (the adapters and their
    optimizer state trained, the base a frozen argument: float, or int8/int4 codes and scales for QLoRA, from the
    config's `quantize:`, `--quantize` or a quantized --model directory). Per chip, a LoRA plan's parameters are the
    base's and the adapters' shards, its optimizer state the adapters' moments.

Figures (per chip: per jax device, which is a chip except on v4, where each of the 2 TensorCores is a device):
  * memory, from `compiled.memory_analysis()`: the compiler's peak of the largest program (`compiled_figures`);
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
figures and what would fit. The report is a dict (`--json`); `glm41v_jax.plan_report.format_report` renders it as
text. The public names of `tpu_slices`, `compiled_figures` and `plan_report` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from glm41v_train.metrics import FlopCounter

from .buckets import bucket_length, cache_length, format_bytes
from .compiled_figures import compile_oom, cost_figures, memory_figures, parse_oom, shard_bytes
from .config import Glm4vConfig, dtype_flag
from .decode import prefill_chunk_length
from .engine import Engine
from .errors import Glm41vError
from .model import abstract_params, init_cache
from .pipeline import auto_mesh_spec
from .plan_report import format_report
from .processing.image import ImageProcessor
from .quant_checkpoint import QuantizedCheckpointError
from .requests import synthetic_inputs
from .sharding import make_mesh
from .tpu_cost import calibrated_bytes, calibrated_split, decode_minimum_bytes, kv_read_fraction
from .tpu_slices import FAMILIES, Family, PlanError, TpuType, next_size, parse_tpu, per_device, topology_devices

__all__ = ["BUILTIN_CONFIGS", "CONFIG_DIR", "FAMILIES", "FRAME_PATCHES", "Family", "PlanError", "TpuType",
           "cost_figures", "format_report", "memory_figures", "model_config", "parse_image_size", "parse_oom",
           "parse_tpu", "plan_generate", "plan_train", "shard_bytes", "topology_devices"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "configs")
BUILTIN_CONFIGS = {"9b": "glm41v_9b.json", "glm41v-9b": "glm41v_9b.json", "glm-4.1v-9b-thinking": "glm41v_9b.json"}
COUNT_PATCHES = 1024  # vision pack of the unrolled steps that count one decoder layer's FLOPs
FRAME_PATCHES = 1024  # train plans: vision attention FLOPs assume images of 32 x 32 patches (448 x 448 px)


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
# Plans.


def _devices_and_mesh(tpu: TpuType, spec: str | None, default: str | None) -> tuple[tuple[Any, ...], Any, str]:
    devices = topology_devices(tpu)
    spec = spec if spec else default
    try:
        mesh = make_mesh(spec, devices)
    except Glm41vError as e:
        raise PlanError(f"--mesh: {str(e).removeprefix('--mesh: ')} ({tpu.name} has {len(devices)} devices)") from None
    return devices, mesh, ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"


def _report_header(kind: str, tpu: TpuType, n_devices: int, mesh_desc: str, cfg: Glm4vConfig) -> dict[str, Any]:
    """The first keys of every report: what was planned, on which slice and mesh, for which model."""
    return {"kind": kind, "tpu": tpu.name, "topology": tpu.topology, "chips": tpu.chips, "hosts": tpu.hosts,
            "devices": n_devices, "mesh": mesh_desc, "model": _model_desc(cfg)}


def _check_generate_args(cfg: Glm4vConfig, batch: int, max_context: int, max_new_tokens: int, dtype: str) -> None:
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


def _longest_prompt(max_context: int, max_new_tokens: int) -> int:
    """The longest prompt whose bucketed cache (prompt bucket + new tokens, rounded up) stays within max_context."""
    prompt = max_context - max_new_tokens
    while prompt > 1 and cache_length(bucket_length(prompt), max_new_tokens) > max_context:
        prompt -= 1
    return prompt


def _generate_figures(cfg: Glm4vConfig, eng: Engine, batch: int, n_prompt: int, slots: int,
                      sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The analytic per-device figures of a generate plan: weights, KV cache, decode's minimum bytes, FLOPs."""
    params_b = shard_bytes(eng.params)
    cache = jax.eval_shape(lambda: init_cache(eng.cfg, batch, slots))
    kv_b = shard_bytes(cache, eng.cache_shardings(cache))
    decode_min = decode_minimum_bytes(eng.params, cache, eng.cache_shardings(cache), batch,
                                      kv_read_fraction(cfg, eng.mesh))["minimum_bytes"]
    p = cfg.vision.patch_size
    patches = sum((h // p) * (w // p) for h, w in sizes)  # one frame each
    counter = FlopCounter(eng.cfg, eng.params, freeze=("vision", "projector", "decoder"))  # forward only
    prefill_flops = counter.step_flops({"tokens": batch * n_prompt, "attn_s2": batch * n_prompt * (n_prompt + 1),
                                        "patches": patches,
                                        "frame_n2": sum(((h // p) * (w // p)) ** 2 for h, w in sizes)})
    if not cfg.tie_word_embeddings:  # prefill computes the logits of the last slot only
        prefill_flops -= 2.0 * cfg.text.vocab_size * cfg.text.hidden_size * batch * (n_prompt - 1)
    decode_flops = counter.step_flops({"tokens": batch, "attn_s2": 2 * batch * slots, "patches": 0, "frame_n2": 0})
    return {"params_bytes": params_b, "kv_cache_bytes": kv_b, "decode_min_bytes": decode_min, "patches": patches,
            "prefill_flops": prefill_flops, "decode_flops": decode_flops}


def _generate_bounds(f: Mapping[str, Any], batch: int, n_prompt: int, n_dev: int, peak: float,
                     bw: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(analytic, roofline) of a generate report from `_generate_figures`."""
    prefill_flops, decode_min = f["prefill_flops"], f["decode_min_bytes"]
    analytic = {"prefill_flops": prefill_flops, "prefill_flops_per_chip": prefill_flops / n_dev,
                "decode_flops_per_step": f["decode_flops"],
                "decode_min_bytes_per_chip": decode_min,
                "note": "prefill: 2*N*tokens (logits of the last slot only) + causal attention + vision; "
                        "decode minimum: text weights (embedding table excluded: B rows gathered) and the "
                        "KV cache, read once per step"}
    roofline = {
        "decode_tokens_per_s_bound": batch * bw / decode_min,
        "decode_step_s_bound": decode_min / bw,
        "prefill_s_at_peak": prefill_flops / (peak * n_dev),
        "prefill_tokens_per_s_at_peak": batch * n_prompt * peak * n_dev / prefill_flops,
    }
    return analytic, roofline


def _generate_efficiency(report: dict[str, Any], f: Mapping[str, Any], batch: int, n_dev: int, bw: float,
                         chunk: int) -> None:
    """The compiled programs against the analytic figures: decode bytes and prefill FLOPs ratios. One decode step
    moves the loop body's bytes plus 1/chunk of the chunk program's entry (run once per `chunk` steps)."""
    progs = {p["name"]: p for p in report["programs"]}
    dec = progs["decode"]
    dec_hbm = dec["hbm_bytes_split"]["loops"] + dec["hbm_bytes_split"]["entry"] / chunk
    dec["hbm_bytes_per_step"] = dec_hbm
    decode_min, prefill_flops = f["decode_min_bytes"], f["prefill_flops"]
    report["roofline"]["decode_tokens_per_s_at_compiled_bytes"] = batch * bw / dec_hbm if dec_hbm else None
    report["efficiency"] = {
        "decode_bytes_ratio": decode_min / dec_hbm if dec_hbm else None,
        "decode_bytes_ratio_uncalibrated": decode_min / dec["bytes_accessed"] if dec["bytes_accessed"] else None,
        # a chunked prefill's loop body (one chunk) is counted once by the compiler: no whole-prompt figure
        "prefill_flops_ratio": (prefill_flops / n_dev) / progs["prefill"]["flops"]
        if progs["prefill"]["flops"] and not report.get("prefill_chunk") else None,
        "note": "decode: minimum bytes / the HBM bytes of one step of the compiled decode chunk (tpu_cost."
                "calibrated_split: the loop body + the entry / chunk; the compiler's own 'bytes accessed' also "
                "counts on-chip copies: the uncalibrated ratio); prefill: model FLOPs / compiled FLOPs (None for a "
                "chunked prefill: the compiler counts its loop body, one chunk, once)"}


def plan_generate(cfg: Glm4vConfig, tpu: TpuType, *, batch: int = 1, max_context: int = 8192,
                  max_new_tokens: int = 1024, images: Sequence[tuple[int, int]] = (), dtype: str = "bfloat16",
                  mesh: str | None = None, attention: str = "auto", chunk_size: int = 16,
                  kernel_layout: str | None = None, quantize: Mapping[str, Any] | None = None,
                  prefill_chunk: int | None = None) -> dict[str, Any]:
    """Compile the Engine's prefill and decode for one bucket: `batch` rows, `max_new_tokens` new tokens after the
    longest prompt whose KV cache (prompt bucket + new tokens, rounded up) fits in `max_context` slots (8192 and
    1024: a 7168-token prompt); images ((width, height) in pixels, resized as the processor does) are part of it.
    `kernel_layout` None: the Engine's own choice for the slice's platform. `quantize`: the `RuntimeConfig`
    quantization fields ({"quantize": "int8"|"int4", "quant_group_size", "quant_skip"}; None or {}: `cfg`'s own),
    so the Engine compiles the quantized programs over `abstract_params` of the quantized config. `prefill_chunk`:
    the Engine's chunked prefill setting (None: the platform's default, `backend.BACKEND_TUNING`; 0: one piece); the
    report's "prefill_chunk" is the chunk length the bucket's prompt runs in (None: one piece)."""
    _check_generate_args(cfg, batch, max_context, max_new_tokens, dtype)
    cfg = _with_quant(cfg, quantize)
    devices, mesh_obj, mesh_desc = _devices_and_mesh(tpu, mesh, auto_mesh_spec(cfg.text.num_attention_heads,
                                                                                 len(topology_devices(tpu))))
    n_dev = len(devices)
    hbm, peak, bw = per_device(tpu, n_dev)
    rcfg = cfg.with_runtime(**dtype_flag(dtype), attention_impl=attention, scan_layers=False)
    eng = Engine(None, rcfg, mesh=mesh_obj, chunk_size=chunk_size, max_context=max_context,
                 kernel_layout=kernel_layout, prefill_chunk=prefill_chunk)
    proc = ImageProcessor()
    sizes = [tuple(proc.target_size(h, w)) for w, h in images]
    bucket = {"batch": batch, "prompt_tokens": _longest_prompt(max_context, max_new_tokens),
              "max_new_tokens": max_new_tokens, "images": sizes}
    prep = eng.prepare(synthetic_inputs(eng.cfg, **bucket), max_new_tokens)
    n_prompt, slots = prep.prompt_len, prep.max_len
    f = _generate_figures(cfg, eng, batch, n_prompt, slots, sizes)
    params_b, kv_b = f["params_bytes"], f["kv_cache_bytes"]

    report: dict[str, Any] = {
        **_report_header("generate", tpu, n_dev, mesh_desc, cfg), "dtype": dtype, "quantize": _quant_desc(cfg),
        "attention_impl": attention, "kernel_layout": eng.cfg.runtime.kernel_layout, "chunk_size": chunk_size,
        "prefill_chunk": prefill_chunk_length(n_prompt, eng.prefill_chunk), "prefill_chunk_setting": eng.prefill_chunk,
        "bucket": {"batch": batch, "prompt_tokens": n_prompt, "max_new_tokens": max_new_tokens, "cache_slots": slots,
                   "images": [list(s) for s in sizes], "vision_patches": f["patches"]},
        "per_chip": {"params_bytes": params_b, "opt_state_bytes": 0, "kv_cache_bytes": kv_b, "temp_bytes": 0,
                     "total_bytes": params_b + kv_b, "hbm_bytes": int(hbm)},
        "programs": [],
    }
    report["analytic"], report["roofline"] = _generate_bounds(f, batch, n_prompt, n_dev, peak, bw)
    try:
        eng.warmup([bucket])
    except Exception as e:  # the compiler's RESOURCE_EXHAUSTED; anything else is a bug and is re-raised
        oom = compile_oom(e)
        if oom is None:
            raise
        failed = eng.compiling or "prefill"
        _record_programs(report, eng.programs())
        return _not_fit(report, oom, failed, _generate_advice(tpu, batch, kv_b, params_b, hbm, oom, mesh_obj,
                                                              cfg.text.num_key_value_heads))
    _record_programs(report, eng.programs())
    _generate_efficiency(report, f, batch, n_dev, bw, chunk_size)
    return _finish(report, hbm)


def _with_quant(cfg: Glm4vConfig, quantize: Mapping[str, Any] | None) -> Glm4vConfig:
    """`cfg` with the quantization fields applied; a QuantError naming the layer when int4 groups do not divide one of
    its input widths (checked before anything compiles)."""
    if not quantize:
        return cfg
    cfg = cfg.with_runtime(**quantize)
    if cfg.runtime.quantize != "none":
        abstract_params(cfg.with_runtime(scan_layers=False))  # every layer's shapes checked against the scheme
    return cfg


def _quant_desc(cfg: Glm4vConfig) -> dict[str, Any]:
    rt = cfg.runtime
    if rt.quantize == "none":
        return {"scheme": "none"}
    return {"scheme": rt.quantize, "group_size": rt.quant_group_size, "skip": list(rt.quant_skip)}


def _global_rows(tpu: TpuType, mesh: Any, batch_size: int) -> int:
    """The rows of one train micro-batch over every host (`data.batch_size` per host), checked against the mesh."""
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if n_batch % tpu.hosts == 0 and batch_size % (n_batch // tpu.hosts):
        raise PlanError(f"data.batch_size ({batch_size}) must be a multiple of the batch shards per host "
                        f"({n_batch // tpu.hosts} = data x fsdp / {tpu.hosts} hosts)")
    return batch_size * tpu.hosts


def _train_step(cfg: Glm4vConfig, train_config: Any, mesh: Any, quant: Mapping[str, Any] | None = None,
                sc: Any = None) -> Any:
    """The step that `glm41v train` runs for `train_config` (`lora_step.make_train_step`: the full `TrainStep`, or
    with a `lora:` section the `LoraTrainStep` over a frozen base, quantized by `quant` for QLoRA), built under the
    slice's mesh: tracing the model (abstract params) with a TPU kernel as the attention backend must see the TPU
    platform, not this host's CPU. `sc`: another StepConfig than the config's."""
    # The training modules need the train extra (pyyaml, grain): imported here, not at the top.
    from glm41v_train.lora_step import make_train_step

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return make_train_step(cfg, train_config.optim, mesh, sc or train_config.step, train_config.lora,
                               quantize=dict(quant) if quant else None)


def _abstract_train_state(ts: Any) -> tuple[Any, Any, Any]:
    """(trained params, their optimizer state, the frozen base or None) of `ts` as ShapeDtypeStructs with their
    shardings: a LoRA step trains the adapters (and keeps moments for them only) on a base it does not update."""
    from glm41v_train.params import abstract_state  # the train extra, as in _train_step

    params, opt = abstract_state(ts)
    base = getattr(ts, "base_abstract", None)
    if base is not None:
        base = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), base,
                            ts.base_shardings)
    return params, opt, base


def _compile_train_step(ts: Any, cfg: Glm4vConfig, data: Any, hosts: int, accum: int) -> tuple[Any, float]:
    """(compiled, seconds): `ts` compiled for a global batch of the config's static shapes over `hosts` hosts."""
    # The training modules need the train extra (pyyaml, grain): imported here, not at the top.
    from glm41v_train.assembly import global_shapes
    from glm41v_train.packing import assemble_batch
    from glm41v_train.step import stack_batches

    local = assemble_batch([[] for _ in range(data.batch_size)], seq_len=data.seq_len, max_patches=data.max_patches,
                           model_cfg=cfg, pad_id=0)
    if accum > 1:
        local = stack_batches([local] * accum)
    shapes = global_shapes(local, hosts, 1 if accum > 1 else 0)
    t0 = time.perf_counter()
    exe = ts.compile(shapes)  # abstract params, optimizer state (and a LoRA step's base) in their shardings
    return exe, time.perf_counter() - t0


def _train_bounds(report: dict[str, Any], model_flops: float, tokens: int, peak: float,
                  step_time: float | None) -> None:
    """The analytic FLOPs and the roofline of a train report."""
    n_dev = report["devices"]
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


def _train_advice(tpu: TpuType, per_chip: Mapping[str, Any], oom: Mapping[str, Any], data: Any, step: Any,
                  optim: Any, lora: bool = False, quant: str = "none") -> list[str]:
    """What would make a train step that the compiler refused fit (`quant`: a LoRA step's base scheme)."""
    advice = []
    bigger = next_size(tpu, max(oom.get("required_bytes") or 0, per_chip["total_bytes"]))
    if bigger:
        advice.append(f"more chips: {bigger} (params, moments and gradients shard over fsdp)")
    if step.remat_policy != "full":
        advice.append("step.remat_policy: full (recompute each layer in the backward pass: least memory)")
    a = step.accum_steps
    advice.append(f"fewer rows per micro-batch: data.batch_size {data.batch_size} -> {max(data.batch_size // 2, 1)} "
                  f"with step.accum_steps {a} -> {a * 2} (the same tokens per update), or a shorter data.seq_len")
    if lora:  # the moments are the adapters' (small); the frozen base's bytes are what a scheme shrinks
        if quant != "int4":
            advice.append(f"quantize: {'int4' if quant == 'int8' else 'int8'} (the frozen base in "
                          f"{'4' if quant == 'int8' else '8'}-bit weights: QLoRA)")
        return advice
    if getattr(optim, "state_dtype", "float32") != "bfloat16":
        advice.append("optim.state_dtype: bfloat16 (half the Adam moments)")
    if "vision" not in optim.freeze:
        advice.append("optim.freeze: [vision] (no vision moments, gradients or backward)")
    return advice


def _train_quant(train_config: Any, cfg: Glm4vConfig, quantize: Mapping[str, Any] | None) -> dict[str, Any]:
    """The base's quantization of a train plan: `quantize` (the --quantize flags or a quantized --model directory) or
    the config's own `quantize:` field (QLoRA from a float checkpoint); only a LoRA step runs on a quantized base."""
    own = train_config.quant_request()
    if quantize and own:
        raise PlanError(f"the training config quantizes the base ({own['quantize']}) and so does the command line or "
                        f"the --model directory ({quantize['quantize']}): give one")
    quant = dict(quantize or own)
    scheme = _with_quant(cfg, quant).runtime.quantize
    if scheme != "none" and train_config.lora is None:
        raise QuantizedCheckpointError(f"train plan on {scheme} weights: full-weight training needs float weights; "
                                       "add a lora: section to the training config to train adapters on the "
                                       "quantized base (QLoRA), or plan the float checkpoint")
    return quant if scheme != "none" else {}


def _lora_desc(ts: Any, base: Any, adapters: Any) -> dict[str, Any]:
    """The `lora` part of a LoRA train report: the adapters (rank, alpha, targets, modules, parameters) and the
    frozen base's bytes per chip beside theirs."""
    from glm41v_jax.lora import targeted

    lora = ts.cfg.runtime.lora
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "modules": len(targeted(ts.cfg)),
            "adapter_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters))),
            "adapter_bytes_per_chip": shard_bytes(adapters), "base_bytes_per_chip": shard_bytes(base),
            "base_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(base)))}


def plan_train(train_config: Any, cfg: Glm4vConfig, tpu: TpuType, *, mesh: str | None = None,
               step_time: float | None = None, count_flops: bool = True,
               quantize: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compile the train step of a `glm41v_train.config.TrainConfig` for the slice (every host's batch: the
    config's `data.batch_size` rows of `data.seq_len` tokens and `data.max_patches` patches): the full step, or with
    a `lora:` section the LoRA step (adapters and their optimizer state trained, the base a frozen argument).
    `quantize` (as `plan_generate` takes it) or the config's `quantize:` field quantizes the base: a LoRA step only
    (QLoRA); a full-weight plan on quantized weights is refused. Per chip: parameters = base + adapters, optimizer
    state = the trained params' (the adapters' for LoRA)."""
    quant = _train_quant(train_config, cfg, quantize)
    if step_time is not None and not step_time > 0:
        raise PlanError(f"--step-time must be > 0 seconds, got {step_time}")
    devices, mesh_obj, mesh_desc = _devices_and_mesh(tpu, mesh, train_config.mesh)
    hbm, peak, bw = per_device(tpu, len(devices))
    dc, sc, oc = train_config.data, train_config.step, train_config.optim
    rows = _global_rows(tpu, mesh_obj, dc.batch_size)
    a = sc.accum_steps
    ts = _train_step(cfg, train_config, mesh_obj, quant)
    a_params, a_opt, a_base = _abstract_train_state(ts)
    params_b = shard_bytes(a_params) + (shard_bytes(a_base) if a_base is not None else 0)
    counter = ts.flop_counter(oc.freeze)
    patches = dc.max_patches * tpu.hosts * a
    tokens = rows * dc.seq_len * a
    stats = {"tokens": tokens, "attn_s2": rows * a * dc.seq_len * (dc.seq_len + 1), "patches": patches,
             "frame_n2": patches * min(FRAME_PATCHES, dc.max_patches)}
    report: dict[str, Any] = {
        **_report_header("train", tpu, len(devices), mesh_desc, cfg), "quantize": _quant_desc(ts.cfg),
        "step": {"global_rows": rows, "seq_len": dc.seq_len, "accum_steps": a, "tokens_per_step": tokens,
                 "patches_per_step": patches, "remat_policy": sc.remat_policy, "compute_dtype": sc.compute_dtype,
                 "grad_dtype": sc.grad_dtype, "freeze": list(oc.freeze), "state_dtype": getattr(oc, "state_dtype",
                                                                                                  None)},
        "per_chip": {"params_bytes": params_b, "opt_state_bytes": shard_bytes(a_opt),
                     "kv_cache_bytes": 0, "temp_bytes": 0, "total_bytes": params_b + shard_bytes(a_opt),
                     "hbm_bytes": int(hbm)},
        "programs": [],
    }
    if a_base is not None:
        report["lora"] = _lora_desc(ts, a_base, a_params)
    _train_bounds(report, counter.step_flops(stats), tokens, peak, step_time)
    if a_base is not None:
        report["analytic"]["note"] = (
            "LoRA (metrics.FlopCounter, weight_grads=False): 4*N*tokens for the base's groups that gradients pass "
            "through (forward + activation gradients; no weight gradients), 2*N for those before them, + attention; "
            "the adapters' own matmuls are not counted; every row one sequence of seq_len tokens, images of "
            f"{FRAME_PATCHES} patches; the compiled figure counts the scanned layer once")
    try:
        exe, secs = _compile_train_step(ts, cfg, dc, tpu.hosts, a)
    except Exception as e:  # the compiler's RESOURCE_EXHAUSTED; anything else is a bug and is re-raised
        oom = compile_oom(e)
        if oom is None:
            raise
        return _not_fit(report, oom, "train_step", _train_advice(tpu, report["per_chip"], oom, dc, sc, oc,
                                                                 a_base is not None, ts.cfg.runtime.quantize))
    _record_programs(report, [("train_step", exe, secs)])
    report["efficiency"] = {"flops_ratio": None}
    if count_flops:
        _count_layer_flops(report, ts, counter, cfg, mesh_obj, train_config, rows, quant)
    return _finish(report, hbm)


def _count_layer_flops(report: dict[str, Any], ts: Any, counter: FlopCounter, cfg: Glm4vConfig, mesh: Any,
                       train_config: Any, rows: int, quant: Mapping[str, Any] | None = None) -> None:
    """The train step's FLOPs ratio of one decoder layer: model FLOPs / compiled FLOPs. The compiler counts a
    scanned body once: the per-layer count comes from the unrolled step at 1 and 2 decoder layers (one micro-batch,
    a 1-block vision tower and a small vision pack; the same mesh, remat and text shapes).

    The vision pack is cut to `COUNT_PATCHES`: the layer difference does not involve it, and the TPU compiler's
    count of the same decoder layer drops with a large pack (Kaggle config, v5e-8: 6.51 TFLOP per layer with 1024
    patches, 5.03 with 16384, i.e. the remat recompute no longer counted). The splash kernel is a custom call whose
    FLOPs the compiler does not count, so the compiled figure is the matmuls (8 N per token with full remat)."""
    dc, sc = train_config.data, train_config.step
    dc = dataclasses.replace(dc, max_patches=min(dc.max_patches, COUNT_PATCHES))
    counts = []
    for n_layers in (1, 2):
        small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=n_layers),
                                    vision=dataclasses.replace(cfg.vision, depth=1))
        sts = _train_step(small, train_config, mesh, quant, dataclasses.replace(sc, accum_steps=1, scan_layers=False))
        exe_n, secs_n = _compile_train_step(sts, cfg, dc, report["hosts"], 1)
        counts.append(cost_figures(exe_n)["flops"])
        _record_programs(report, [(f"train_step_unrolled_{n_layers}_layer", exe_n, secs_n)])
    layer_compiled = (counts[1] - counts[0]) * report["devices"]
    t = cfg.text
    flat = jax.tree_util.tree_flatten_with_path(getattr(ts, "base_abstract", ts.abstract_params))[0]
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
                "step, small vision pack); < 1 is the remat recompute (the kernel's own FLOPs are not counted)"}
    report["analytic"]["compiled_flops_per_step_estimate"] = layer_compiled * t.num_hidden_layers * sc.accum_steps


def _record_programs(report: dict[str, Any], programs: Sequence[tuple[str, Any, float]]) -> None:
    for name, exe, seconds in programs:
        report["programs"].append({"name": name, "compile_s": round(seconds, 2), **cost_figures(exe),
                                   "hbm_bytes": calibrated_bytes(exe), "hbm_bytes_split": calibrated_split(exe),
                                   "memory": memory_figures(exe)})


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
    bigger = next_size(tpu, need)
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
