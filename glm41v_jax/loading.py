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
from .sharding import param_shardings, unbox
from .weights import WeightsError, set_path, stack_layers


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
    if verify:
        _verify_before_load(directory)
    if is_converted_dir(directory):
        params = _load_converted(directory, cfg, cast, mesh, as_numpy)
    else:
        params = _load_hf(directory, cfg, cast, mesh, as_numpy)
    if cfg.runtime.scan_layers:
        params = _stack(params, cfg, mesh)
    return params, cfg


def _unrolled(cfg: Glm4vConfig) -> Any:
    """The abstract params of the stored (unrolled) layout, boxed with their logical axes."""
    return abstract_params(cfg.with_runtime(scan_layers=False))


def _load_hf(directory: str, cfg: Glm4vConfig, dtype: np.dtype | None, mesh: Any, as_numpy: bool) -> dict:
    ckpt = HFCheckpoint(directory, cfg)
    shardings = paths_and_leaves(param_shardings(_unrolled(cfg), mesh)) if mesh is not None else None
    device = None if (mesh is not None or as_numpy) else jax.devices()[0]
    tree: dict = {}
    for _name, rule, arr in ckpt.iter_flax(dtype):
        if as_numpy:
            value = arr
        else:
            value = jax.device_put(arr, shardings[rule.path] if shardings is not None else device)
            value.block_until_ready()  # the host copy can go before the next tensor is read
        set_path(tree, rule.path, value)
    return tree


def _load_converted(directory: str, cfg: Glm4vConfig, dtype: np.dtype | None, mesh: Any, as_numpy: bool) -> dict:
    directory = abs_path(directory)  # orbax and tensorstore take absolute paths only
    params_dir, on_disk = open_converted(directory)
    expected = paths_and_leaves(unbox(_unrolled(cfg)))
    check_arrays(params_dir, on_disk, expected)
    shardings = paths_and_leaves(param_shardings(_unrolled(cfg), mesh)) if mesh is not None else None
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(p: tuple[str, ...]) -> Any:
        dt = dtype if dtype is not None else np.dtype(on_disk[p].dtype)
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
