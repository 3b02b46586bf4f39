"""Converted (Orbax) directory -> HF safetensors checkpoint, or a LoRA adapter -> PEFT's adapter format: the way out.

It lives beside the converter (package `glm41v_convert`) because it is the converter run backwards: the same
name/layout table (`weights.build_rules`, each `Rule.to_hf` the inverse of its `to_flax`), the same raw-bit layout
copy (bf16 moved as uint16, so it is bit-exact) and the same atomic destination (`hf_to_orbax._staging`: DST.lock,
`DST.tmp-<pid>`, removed on any failure, renamed without replacing anything).

What is special here:
  * Streaming with bounded host memory: the shard plan (which tensor goes into which file, at which byte offset) is
    computed from the stored shapes and dtypes alone, so each shard's safetensors header is written first and the
    tensors are then read from Orbax `read_bytes` at a time (a partial restore), laid out as torch's (out, in), cast
    and appended. Host memory: about `read_bytes` plus the largest tensor and its HF-layout copy, whatever the size
    of the model; never a whole shard.
  * `model-0000k-of-0000n.safetensors` shards of at most `shard_bytes` (default 5 GB, as `save_pretrained`; a
    tensor larger than that gets a shard of its own), `{"format": "pt"}` metadata, `model.safetensors.index.json`
    (total size and the weight map), and config.json with every side file of the source (tokenizer, chat template,
    generation and processor configs), as they are; with a `dtype` that changes the weights, the config's dtype
    fields name it.
  * dtype: kept as stored unless `dtype` says otherwise (fp32 -> bf16 rounds to nearest even, like torch). The
    round trip HF -> `glm41v convert` -> `glm41v export` gives every tensor's bytes back.
  * `adapter` + `merge`: W + A B * alpha / r in float32 (`lora._merged`, the merge that `glm41v generate --adapter`
    does), rounded once to the output dtype. `adapter` + `peft`: only `adapter_model.safetensors` +
    `adapter_config.json` in PEFT's format (keys `base_model.model.<HF module>.lora_{A,B}.weight`, fp32), which
    `peft.PeftModel.from_pretrained` and vLLM's `--enable-lora` load on the HF base. The adapter's recorded base
    must be SRC (`lora.check_base`).
  * A quantized SRC (int8 / int4 codes) is refused for a weights export unless `dequantize` is set: each kernel is
    then codes * scale in fp32, cast to the output dtype (default the float leaves' stored dtype), and a warning
    line says the weights are the quantized model's, not the original float ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from glm41v_jax.checkpoint_files import copy_side_files, rename_noreplace
from glm41v_jax.checkpoint_format import (
    FORMAT_FILE,
    SAFETENSORS_INDEX,
    CheckpointError,
    is_converted_dir,
    read_format,
    stored_quantization,
)
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.converted import NumpyAbstract, check_arrays, open_converted, paths_and_leaves, restore
from glm41v_jax.errors import Glm41vError
from glm41v_jax.hf_checkpoint import contiguous
from glm41v_jax.integrity import abs_path
from glm41v_jax.lora import _merged, base_identity, check_base, load_adapters, targeted
from glm41v_jax.model import abstract_params
from glm41v_jax.quant import dequantize_array
from glm41v_jax.quant_checkpoint import LeafQuantizer
from glm41v_jax.sharding import unbox
from glm41v_jax.weights import Rule, build_rules, get_path, set_path

from .hf_to_orbax import _staging, _write_failure, parse_dtype

DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size "5GB"
DEFAULT_READ_BYTES = 256 << 20  # bytes restored from Orbax per partial read
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_ST_NAMES = {"bfloat16": "BF16", "float32": "F32"}
_RAW = {2: np.uint16, 4: np.uint32}
_F32 = np.dtype(np.float32)

Path = tuple[str, ...]


class ExportError(Glm41vError, ValueError):
    """An export that cannot be done as asked (flags that do not go together, a quantized base without
    --dequantize, a source that is not a converted directory). The message names the flag or file."""


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def shard_name(k: int, n: int) -> str:
    """`save_pretrained`'s shard file name: model-0000k-of-0000n.safetensors (1-based k)."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class _Tensor:
    name: str  # HF name
    rule: Rule
    dtype: np.dtype  # written dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.rule.hf_shape) * self.dtype.itemsize


def plan_shards(tensors: list[_Tensor], shard_bytes: int) -> list[list[_Tensor]]:
    """Tensors in order, cut into shards of at most `shard_bytes` (a larger tensor alone in its shard)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def safetensors_header(tensors: list[_Tensor]) -> bytes:
    """The length-prefixed safetensors header of `tensors` laid out back to back in this order, {"format": "pt"}
    metadata, padded with spaces to a multiple of 8 bytes (as the safetensors library writes it)."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        head[t.name] = {"dtype": _ST_NAMES[t.dtype.name], "shape": list(t.rule.hf_shape),
                        "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    body = json.dumps(head, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def to_hf_layout(arr: np.ndarray, rule: Rule, dtype: np.dtype) -> np.ndarray:
    """A Flax leaf -> torch's layout (`rule.to_hf`, raw bits through a tiled copy: bit-exact), then cast."""
    out = contiguous(rule.to_hf(arr.view(_RAW[arr.dtype.itemsize]))).view(arr.dtype)
    if out.dtype != dtype:
        out = out.astype(dtype)
    if out.shape != rule.hf_shape:
        raise AssertionError((rule.path, out.shape, rule.hf_shape))
    return out


# ---------------------------------------------------------------------------------------------------------------


class _Source:
    """A converted directory opened for export: its config, stored arrays, quantization and the float leaves."""

    def __init__(self, src: str | os.PathLike) -> None:
        self.dir = d = abs_path(src)
        if not os.path.isdir(d):
            raise ExportError(f"{d}: no such directory (SRC must be a converted directory, written by "
                              "`glm41v convert` or by training)")
        if not is_converted_dir(d):
            raise ExportError(f"{d}: not a converted directory (no {FORMAT_FILE}); `glm41v export` takes the output "
                              "of `glm41v convert` or a training run's final weights (an HF checkpoint is already in "
                              "the HF format)")
        self.fmt = read_format(d)
        self.params_dir, self.on_disk = open_converted(d)
        self.cfg = Glm4vConfig.from_file(os.path.join(d, "config.json")).with_runtime(scan_layers=False,
                                                                                      kernel_layout="in_out")
        self.quant = stored_quantization(self.fmt, os.path.join(d, FORMAT_FILE))
        if self.quant:
            self.quantizer: LeafQuantizer | None = LeafQuantizer(self.cfg.with_runtime(**self.quant))
            check_arrays(self.params_dir, self.on_disk, self.quantizer.leaves)
        else:
            self.quantizer = None
            check_arrays(self.params_dir, self.on_disk, paths_and_leaves(unbox(abstract_params(self.cfg))))

    def stored_dtype(self, path: Path) -> np.dtype:
        """The dtype a float leaf is stored in; for a quantized kernel, the float leaves' dtype (bf16 if mixed)."""
        if self.quantizer is not None and path in self.quantizer.plans:
            name = self.fmt.get("dtype")
            return np.dtype(name if name in _ST_NAMES else "bfloat16")
        return np.dtype(self.on_disk[path].dtype)

    def read(self, paths: list[Path]) -> dict[Path, np.ndarray]:
        """Host arrays of these leaves (a quantized kernel: its codes and scale, dequantized to fp32)."""
        want: dict[Path, NumpyAbstract] = {}
        for p in paths:
            reads = [p] if self.quantizer is None or p not in self.quantizer.plans else \
                [p, self.quantizer.plans[p].scale_path]
            for q in reads:
                want[q] = NumpyAbstract(tuple(self.on_disk[q].shape), np.dtype(self.on_disk[q].dtype))
        got = paths_and_leaves(restore(self.dir, want, partial=True))
        out = {}
        for p in paths:
            if self.quantizer is not None and p in self.quantizer.plans:
                plan = self.quantizer.plans[p]
                out[p] = dequantize_array(got.pop(p), got.pop(plan.scale_path), self.quant["quantize"],
                                          n_in=plan.n_in, kernel_layout=plan.kernel_layout)
            else:
                out[p] = got.pop(p)
        return out

    def identity(self) -> dict[str, str]:
        """`lora.base_identity` of SRC (only the norm scales it hashes are read)."""
        n = self.cfg.text.num_hidden_layers
        paths = [("language_model", "norm", "scale")] + [
            ("language_model", f"layers_{i}", "post_mlp_layernorm", "scale") for i in range(n)]
        tree: dict = {}
        for p, a in self.read(paths).items():
            set_path(tree, p, a)
        return base_identity(tree, self.cfg)


def _check_args(dtype: str | None, adapter: Any, merge: bool, peft: bool, shard_bytes: int, read_bytes: int,
                dst: str | os.PathLike) -> np.dtype | None:
    out_dtype = parse_dtype(dtype)
    for name, v in (("shard_bytes", shard_bytes), ("read_bytes", read_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ExportError(f"{name} must be a positive number of bytes, got {v!r}")
    if adapter is None and (merge or peft):
        raise ExportError(f"--{'merge' if merge else 'peft'} needs --adapter DIR (the adapter to merge or write)")
    if adapter is not None and merge == peft:
        raise ExportError("--adapter needs exactly one of --merge (fold it into the exported weights) and --peft "
                          "(write it as a PEFT adapter for the HF base)")
    if peft and dtype is not None:
        raise ExportError("--dtype applies to exported weights; a --peft adapter is written in float32")
    if not os.fspath(dst).strip():
        raise ExportError("the destination path is empty")
    return out_dtype


def export(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    adapter: str | os.PathLike | None = None,
    merge: bool = False,
    peft: bool = False,
    dequantize: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    read_bytes: int = DEFAULT_READ_BYTES,
    warn: Callable[[str], None] = _warn,
) -> str:
    """Export the converted directory `src` to `dst` (which must not exist); returns `dst` (absolute).

    Without `adapter`: an HF checkpoint (module docstring), in `dtype` ('bfloat16' | 'float32' | None: as stored).
    `adapter` + `merge`: the same with the adapter folded in (fp32, rounded once). `adapter` + `peft`: the PEFT
    adapter directory only. `dequantize`: allow a quantized `src` (weights exports; `warn` is told). `shard_bytes`:
    the largest shard; `read_bytes`: bytes read from Orbax at a time (host memory scales with it).
    Every check (flags, SRC, the adapter and its base, DST) runs before anything is written.
    """
    out_dtype = _check_args(dtype, adapter, merge, peft, shard_bytes, read_bytes, dst)
    dst = abs_path(dst)
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: destination already exists; remove it or choose another path")
    source = _Source(src)
    adapters = lcfg = None
    if adapter is not None:
        adapter = abs_path(adapter)
        adapters, lcfg, meta = load_adapters(adapter, source.cfg)
        check_base(meta, source.identity(), adapter, source.dir)
    if source.quant and not peft:
        scheme = source.quant["quantize"]
        if not dequantize:
            raise ExportError(f"{source.dir}: holds {scheme} weights; an HF export needs float weights: export the "
                              f"float checkpoint it was quantized from, or pass --dequantize to write the {scheme} "
                              "weights as floats")
        warn(f"{source.dir} holds {scheme} weights: exporting them dequantized (codes * scale), which is the "
             f"{scheme} model, not the original float weights")
    with _staging(dst) as tmp:
        try:
            if peft:
                write_peft(tmp, adapters, lcfg, source)
            else:
                _write_weights(tmp, source, out_dtype, adapters, lcfg, shard_bytes, read_bytes)
            try:
                rename_noreplace(tmp, dst)
            except FileExistsError:
                raise CheckpointError(f"{dst}: the destination was created by another program while exporting; it "
                                      "was left untouched and this export's output was discarded") from None
        except Exception as e:
            failure = _write_failure(e, dst, None)
            if failure is not None:
                raise failure from None
            raise
    return dst


def _write_weights(tmp: str, source: _Source, out_dtype: np.dtype | None, adapters: Any, lcfg: Any,
                   shard_bytes: int, read_bytes: int) -> None:
    merged = {m.path + ("kernel",): m for m in targeted(lcfg)} if adapters is not None else {}
    tensors = [_Tensor(name, rule, out_dtype or source.stored_dtype(rule.path))
               for name, rule in build_rules(source.cfg).items()]
    shards = plan_shards(tensors, shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = shard_name(k, n)
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(safetensors_header(shard))
            group: list[_Tensor] = []
            size = 0
            for i, t in enumerate(shard):
                group.append(t)
                size += t.nbytes
                if size >= read_bytes or i + 1 == len(shard):
                    arrays = source.read([g.rule.path for g in group])
                    for g in group:
                        arr = arrays.pop(g.rule.path)
                        if g.rule.path in merged:
                            arr = _merge(arr, adapters, merged[g.rule.path], lcfg)
                        f.write(memoryview(to_hf_layout(arr, g.rule, g.dtype).reshape(-1).view(np.uint8)))
                        weight_map[g.name] = fname
                        del arr
                    group, size = [], 0
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(tmp, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    copy_side_files(source.dir, tmp)
    if out_dtype is not None and any(source.stored_dtype(t.rule.path) != out_dtype for t in tensors):
        _set_config_dtype(os.path.join(tmp, "config.json"), out_dtype.name)  # as stored: config.json as it was


def _merge(kernel: np.ndarray, adapters: Any, module: Any, lcfg: Any) -> np.ndarray:
    """W + A B * alpha / r in float32 (the result stays fp32: the caller rounds it once to the output dtype)."""
    a, b = (get_path(adapters, module.path + (k,)) for k in ("lora_a", "lora_b"))
    return np.asarray(_merged(kernel.astype(_F32), a, b, lcfg.runtime.lora.scale))


def _set_config_dtype(path: str, dtype: str) -> None:
    """Point config.json's dtype fields (`torch_dtype` / `dtype`, top level and sub-configs) at the written dtype,
    so transformers loads the weights as they are stored."""
    with open(path, encoding="utf-8") as f:
        conf = json.load(f)
    changed = False
    for d in (conf, conf.get("text_config"), conf.get("vision_config")):
        if not isinstance(d, dict):
            continue
        for key in ("torch_dtype", "dtype"):
            if key in d and d[key] != dtype:
                d[key] = dtype
                changed = True
    if changed:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=2)
            f.write("\n")


def write_peft(directory: str, adapters: Any, lcfg: Any, source: _Source) -> None:
    """PEFT's adapter files for the adapter tree (HF module names, lora_A (r, in) / lora_B (out, r), fp32)."""
    from safetensors.numpy import save_file

    from glm41v_jax.lora import adapters_to_hf

    lora = lcfg.runtime.lora
    tensors = {}
    for name, (a, b) in adapters_to_hf(adapters, lcfg).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    base = source.fmt.get("source")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base if isinstance(base, str) and base != "in-memory" else source.dir,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(m.hf_name for m in targeted(lcfg)),  # exact names: PEFT and vLLM match them as is
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with open(os.path.join(directory, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


__all__ = ["DEFAULT_SHARD_BYTES", "ExportError", "PEFT_CONFIG", "PEFT_WEIGHTS", "export", "plan_shards",
           "safetensors_header", "shard_name", "to_hf_layout", "write_peft"]
