"""`load(model)`: GLM-4.1V weights from an HF checkpoint directory, a converted directory or a hub id, placed where
they will run.

The pieces, one module each:
  * model_dir.py          what the user typed -> a local directory (paths made absolute, hub ids downloaded);
  * checkpoint_format.py  the file names, the converted format's record, and `CheckpointError`;
  * hf_checkpoint.py      HF safetensors, streamed one tensor at a time and checked against config.json first;
  * converted.py          a converted (Orbax) directory: restore, and `verify_converted` against its checksums;
  * this module           the targets (shapes from `jax.eval_shape`, shardings from the rules table, dtypes) and
                          the placement: with a `mesh` each array goes straight into its final `NamedSharding` (an
                          HF tensor host -> device before the next is read, so host memory stays bounded by about
                          one tensor); without one, single-device arrays on `jax.devices()[0]`, or host NumPy
                          arrays with `as_numpy=True`. The shardings stored in a converted directory are ignored.

The returned tree is the canonical *unrolled* layout (`layers_0`, `blocks_3`, ...); with `scan_layers=True` it is
stacked (`weights.stack_layers`) after loading.

Quantized weights (quant.py): a converted directory written with `glm41v convert --quantize` records its scheme,
and `load` returns its integer codes and scales with `cfg.runtime.quantize` set from that record (no flag). Asking
for `quantize="int8"|"int4"` on a float checkpoint quantizes it here, one tensor at a time on the host
(`quant_checkpoint.LeafQuantizer`: the same bits as the converter), each result put into its final sharding before
the next tensor is read: the device never holds a float kernel, the host about one tensor (an HF checkpoint) or
one `QUANT_READ_BYTES` group of arrays (a converted float directory). Asking it of a quantized checkpoint is an
error.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from .checkpoint_format import (
    COMPLETE_MARKER,
    FORMAT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PARAMS_SUBDIR,
    SIDE_FILES,
    CheckpointError,
    check_files,
    is_converted_dir,
    read_format,
)
from .config import ConfigError, Glm4vConfig, RuntimeConfig
from .converted import (
    NumpyAbstract,
    VerifyReport,
    check_arrays,
    open_converted,
    paths_and_leaves,
    restore,
    verify_converted,
)
from .hf_checkpoint import HFCheckpoint, TensorInfo, read_safetensors_header, refuse_pickles, to_flax_layout
from .integrity import abs_path
from .model import abstract_params
from .model_dir import resolve_model_dir
from .quant_checkpoint import LeafQuantizer, QuantizedCheckpointError, checkpoint_quantization
from .sharding import param_shardings, unbox
from .weights import WeightsError, set_path, stack_layers

QUANT_READ_BYTES = 256 << 20  # a converted float directory quantized at load is read this many bytes at a time


def load_config(model: str | os.PathLike, runtime: RuntimeConfig | None = None, **overrides: Any) -> Glm4vConfig:
    """The `Glm4vConfig` of a model spec (HF directory, converted directory or hub id), with `runtime` (default
    `RuntimeConfig()`) and then the `RuntimeConfig` field `overrides` applied."""
    cfg = Glm4vConfig.from_file(os.path.join(resolve_model_dir(model), "config.json"))
    return cfg.with_runtime(runtime, **overrides)


def load(
    model: str | os.PathLike,
    runtime: RuntimeConfig | None = None,
    *,
    mesh: Any = None,
    as_numpy: bool = False,
    verify: bool = False,
    **overrides: Any,
) -> tuple[Any, Glm4vConfig]:
    """Load (params, cfg) from an HF checkpoint dir, a converted dir, or a hub id.

    runtime: how to run (`RuntimeConfig`, default `RuntimeConfig()`); `overrides` are its fields by name, applied
      on top: `param_dtype`, `compute_dtype`, `scan_layers`, `remat_policy`, `attention_impl`, `kernel_layout`.
      `param_dtype`, when given (in `runtime` or here), is the dtype every weight is cast to; when neither gives it,
      the weights keep their stored dtype (bf16 stays bit-exact) and cfg's `param_dtype` keeps its default.
      `quantize` ("int8" | "int4", with `quant_group_size`, `quant_skip`): quantize a float checkpoint at load (see
      the module docstring; integer codes and fp32 scales are never cast). A quantized converted directory sets
      them from its format file; asking for `quantize` there is a QuantizedCheckpointError.
    mesh: place each array directly into its `NamedSharding` from `sharding.LOGICAL_RULES`.
    as_numpy: return host NumPy arrays (ignored with a mesh). Otherwise single-device jax arrays on device 0.
    verify: first read every array of a converted directory back and compare it with the checksums recorded at
      conversion (`verify_converted`: one extra read of the weights); CheckpointError naming the damaged arrays, or
      saying that the directory has no checksums to compare with. HF directories carry no checksums: refused.
    Every load of a converted directory checks that its data files are all there with their recorded sizes.
    """
    if "dtype" in overrides:
        raise TypeError("load(dtype=...) is ambiguous and no longer taken: pass param_dtype= (the weights) and/or "
                        "compute_dtype= (activations and matmul inputs)")
    cast = overrides.get("param_dtype", runtime.param_dtype if runtime is not None else None)
    cast = None if cast is None else np.dtype(cast)
    if mesh is not None:
        as_numpy = False
    directory = resolve_model_dir(model)
    cfg = Glm4vConfig.from_file(os.path.join(directory, "config.json")).with_runtime(runtime, **overrides)
    stored_q = checkpoint_quantization(directory)
    if stored_q:
        if cfg.runtime.quantize != "none":
            raise QuantizedCheckpointError(f"{directory}: is already quantized ({stored_q['quantize']}, at "
                                           f"conversion); load it without quantize/--quantize")
        cfg = cfg.with_runtime(**stored_q)
    quantizer = LeafQuantizer(cfg) if cfg.runtime.quantize != "none" else None  # checks every layer first
    if verify:
        _verify_before_load(directory)
    if is_converted_dir(directory):
        if quantizer is not None and not stored_q:
            params = _quantize_converted(directory, cfg, cast, mesh, as_numpy, quantizer)
        else:
            params = _load_converted(directory, cfg, cast, mesh, as_numpy, quantizer)
    else:
        params = _load_hf(directory, cfg, cast, mesh, as_numpy, quantizer)
    if cfg.runtime.scan_layers:
        params = _stack(params, cfg, mesh)
    return params, cfg


def _unrolled(cfg: Glm4vConfig) -> Any:
    """The abstract params of the stored (unrolled) layout, boxed with their logical axes."""
    return abstract_params(cfg.with_runtime(scan_layers=False))


class _Placer:
    """Puts host arrays where `load` returns them: as they are (as_numpy), into their sharding, or on device 0;
    waits for each transfer, so the host copy can go before the next tensor is read."""

    def __init__(self, cfg: Glm4vConfig, mesh: Any, as_numpy: bool) -> None:
        self.shardings = paths_and_leaves(param_shardings(_unrolled(cfg), mesh)) if mesh is not None else None
        self.device = None if (mesh is not None or as_numpy) else jax.devices()[0]
        self.as_numpy = as_numpy
        self.tree: dict = {}

    def put(self, path: tuple[str, ...], arr: np.ndarray) -> None:
        value = arr
        if not self.as_numpy:
            value = jax.device_put(arr, self.shardings[path] if self.shardings is not None else self.device)
            value.block_until_ready()
        set_path(self.tree, path, value)


def _load_hf(directory: str, cfg: Glm4vConfig, dtype: np.dtype | None, mesh: Any, as_numpy: bool,
             quantizer: LeafQuantizer | None) -> dict:
    ckpt = HFCheckpoint(directory, cfg)
    placer = _Placer(cfg, mesh, as_numpy)
    quantized = quantizer.plans if quantizer is not None else {}
    for name, rule in ckpt.rules.items():
        quant = rule.path in quantized  # quantized from the tensor as stored, never from a cast copy
        arr = to_flax_layout(name, ckpt.read(name), rule, None if quant else dtype, ckpt.infos[name].file)
        for path, out in (quantizer(rule.path, arr) if quant else [(rule.path, arr)]):
            placer.put(path, out)
        del arr
    return placer.tree


def _quantize_converted(directory: str, cfg: Glm4vConfig, dtype: np.dtype | None, mesh: Any, as_numpy: bool,
                        quantizer: LeafQuantizer) -> dict:
    """A converted float directory, read `QUANT_READ_BYTES` at a time as host arrays in their stored dtype, each
    kernel quantized on the host, every result placed before the next group is read."""
    directory = abs_path(directory)
    params_dir, on_disk = open_converted(directory)
    check_arrays(params_dir, on_disk, quantizer.float_leaves)
    placer = _Placer(cfg, mesh, as_numpy)
    group: dict[tuple[str, ...], NumpyAbstract] = {}
    size = 0

    def flush() -> None:
        got = paths_and_leaves(restore(directory, group, partial=True))
        for p in list(group):
            arr = got.pop(p)
            if p not in quantizer.plans and dtype is not None and arr.dtype != dtype:
                arr = arr.astype(dtype)
            for path, out in quantizer(p, arr):
                placer.put(path, out)
            del arr
        group.clear()

    for p, a in quantizer.float_leaves.items():
        meta = on_disk[p]
        nbytes = int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize
        if group and size + nbytes > QUANT_READ_BYTES:
            flush()
            size = 0
        group[p] = NumpyAbstract(tuple(a.shape), np.dtype(meta.dtype))
        size += nbytes
    if group:
        flush()
    return placer.tree


def _load_converted(directory: str, cfg: Glm4vConfig, dtype: np.dtype | None, mesh: Any, as_numpy: bool,
                    quantizer: LeafQuantizer | None) -> dict:
    directory = abs_path(directory)  # orbax and tensorstore take absolute paths only
    params_dir, on_disk = open_converted(directory)
    expected = paths_and_leaves(unbox(_unrolled(cfg)))
    check_arrays(params_dir, on_disk, expected)
    shardings = paths_and_leaves(param_shardings(_unrolled(cfg), mesh)) if mesh is not None else None
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    keep = quantizer.quant_paths if quantizer is not None else set()  # codes and scales: never cast

    def target(p: tuple[str, ...]) -> Any:
        dt = dtype if dtype is not None and p not in keep else np.dtype(on_disk[p].dtype)
        shape = tuple(expected[p].shape)
        if as_numpy:
            return NumpyAbstract(shape, dt)
        return jax.ShapeDtypeStruct(shape, dt, sharding=shardings[p] if shardings is not None else single)

    return restore(directory, {p: target(p) for p in expected})


def _verify_before_load(directory: str) -> None:
    if not is_converted_dir(directory):
        raise CheckpointError(f"{directory}: cannot verify an HF checkpoint directory (safetensors files carry no "
                              "checksums); convert it with `glm41v convert`, or load it without verifying")
    report = verify_converted(directory)
    if report.damaged:
        raise CheckpointError(f"{directory}: verification failed, {report.summary()}; convert again")
    if not report.has_checksums:
        raise CheckpointError(f"{directory}: cannot verify: no checksums were recorded when it was written (converted "
                              "by an older version, or the final weights of a multi-host training run); every array "
                              "read back, but bit flips cannot be detected; convert again to record them, or load it "
                              "without verifying")


def _stack(params: dict, cfg: Glm4vConfig, mesh: Any) -> dict:
    """Unrolled -> scanned layout (transiently holds both copies of the layer weights)."""
    stacked = stack_layers(params)
    if mesh is not None:
        stacked = jax.device_put(stacked, param_shardings(abstract_params(cfg), mesh))
    return stacked


# The names below are re-exported: `glm41v_jax.loading` is where users and the converter find them.
__all__ = [
    "COMPLETE_MARKER",
    "FORMAT_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PARAMS_SUBDIR",
    "SIDE_FILES",
    "CheckpointError",
    "ConfigError",
    "HFCheckpoint",
    "TensorInfo",
    "VerifyReport",
    "WeightsError",
    "check_files",
    "is_converted_dir",
    "load",
    "load_config",
    "read_format",
    "read_safetensors_header",
    "refuse_pickles",
    "resolve_model_dir",
    "to_flax_layout",
    "verify_converted",
]
