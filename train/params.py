"""The train step's parameters from a checkpoint on disk, and the abstract state a training checkpoint restores into.

Training keeps fp32 params in the scanned layout (one leading axis per layer stack), sharded over the mesh; the
weights on disk are unrolled (`layers_0`, `layers_1`, ...) in any float dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from glm41v_jax.loading import CheckpointError, load
from glm41v_jax.quant_checkpoint import refuse_quantized
from glm41v_jax.weights import LAYER_GROUPS, get_path, key_names

from .step import TrainStep


def place_unrolled(params: Mapping[str, Any], ts: TrainStep) -> Any:
    """Unrolled host params (NumPy, any float dtype) -> the step's stacked global arrays in its param dtype. Each
    device's shard is cut (and the layers stacked) on the host by `jax.make_array_from_callback`: no full fp32 or
    stacked copy is made, and it works the same on every host."""
    flat = jax.tree_util.tree_flatten_with_path(ts.abstract_params)[0]
    shardings = jax.tree.leaves(ts.param_shardings)
    leaves = []
    for (path, abstract), sharding in zip(flat, shardings, strict=True):
        names = key_names(path)
        if names[:2] in LAYER_GROUPS:
            n_layers = abstract.shape[0]
            layers = [get_path(params, (names[0], f"{names[1]}_{i}") + names[2:]) for i in range(n_layers)]
            got = (n_layers, *np.shape(layers[0]))

            def cb(idx, layers=layers, dtype=abstract.dtype):
                sel = range(len(layers))[idx[0]]
                return np.stack([np.asarray(layers[i][idx[1:]], dtype) for i in sel])
        else:
            leaf = get_path(params, names)
            got = tuple(np.shape(leaf))

            def cb(idx, leaf=leaf, dtype=abstract.dtype):
                return np.asarray(leaf[idx], dtype)
        if got != tuple(abstract.shape):
            raise CheckpointError(f"param {'/'.join(names)}: shape {got}, expected {tuple(abstract.shape)}")
        leaves.append(jax.make_array_from_callback(tuple(abstract.shape), sharding, cb))
    return jax.tree.unflatten(jax.tree.structure(ts.abstract_params), leaves)


def load_params(model_dir: str, ts: TrainStep) -> Any:
    """The weights of `model_dir` (HF or converted; read on every host as NumPy), placed as the step's params.
    Quantized weights are refused (QuantizedCheckpointError): the train step runs on float weights."""
    refuse_quantized(model_dir, "the train step (training, `glm41v loss`) runs on float weights (LoRA on a quantized "
                                "base comes with the LoRA issue); use the float checkpoint")
    params, _ = load(model_dir, as_numpy=True)
    return place_unrolled(params, ts)


def abstract_state(ts: TrainStep) -> tuple[Any, Any]:
    """(params, opt_state) as ShapeDtypeStructs with their shardings: the restore targets."""
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    params = jax.tree.map(sds, ts.abstract_params, ts.param_shardings)
    opt = jax.eval_shape(ts.tx.init, ts.abstract_params)
    return params, jax.tree.map(sds, opt, ts.opt_shardings)


__all__ = ["abstract_state", "load_params", "place_unrolled"]
