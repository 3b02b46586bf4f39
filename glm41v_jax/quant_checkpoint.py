"""Quantized checkpoints: a float checkpoint quantized one tensor at a time on the host (by `glm41v convert
--quantize` and by `load(..., quantize=...)`, with the same bits), and what a checkpoint directory says about its
own scheme.

`LeafQuantizer(cfg)` knows, for the unrolled tree of `cfg` (runtime.quantize "int8" or "int4"), which float leaves
become codes + scale and how (contracted axes, kernel layout, group size: as `quant.quantize_params` does). Each
kernel is quantized in slices along its first output axis of about `chunk_bytes` of fp32 temporaries at a time:
output channels (and their groups) are independent, so the slices give exactly the codes and scales of one call
over the whole kernel (tested), while the host's peak stays bounded whatever the tensor (the 9B's lm_head is 2.5 GB
in fp32). Quantization always starts from the tensor as stored in the source (bf16 or fp32), never from a cast
copy: converting with --quantize and quantizing the same source at load give identical codes.

Orbax stores JAX's `int4` (ml_dtypes.int4) arrays as they are and restores them bit for bit (tested), so int4
codes are written as int4: no packing on disk.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .checkpoint_format import is_converted_dir, read_format, stored_quantization
from .config import Glm4vConfig
from .converted import paths_and_leaves
from .errors import Glm41vError
from .integrity import abs_path
from .layers import QuantError
from .model import abstract_params
from .quant import quantize_array
from .sharding import unbox

Path = tuple[str, ...]
DEFAULT_CHUNK_BYTES = 64 << 20
LORA_LATER = ("full-weight training needs float weights (LoRA on a quantized base comes with the LoRA issue); train "
              "from the float checkpoint")


class QuantizedCheckpointError(Glm41vError, ValueError):
    """A quantized checkpoint used where float weights are needed (quantizing it again, full-weight training)."""


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one float kernel is quantized: contracted axes, layout, and where its scale goes."""

    n_in: int
    kernel_layout: str
    scale_path: Path


def checkpoint_quantization(directory: str | os.PathLike) -> dict[str, Any]:
    """The `RuntimeConfig` fields of a checkpoint directory's stored scheme ({} for float weights: an HF
    directory, or a converted one without a quantization record)."""
    directory = abs_path(directory)
    if not is_converted_dir(directory):
        return {}
    return stored_quantization(read_format(directory))


def refuse_quantized(directory: str | os.PathLike, what: str) -> None:
    """QuantizedCheckpointError when `directory` holds quantized weights; `what` says what needed float ones."""
    stored = checkpoint_quantization(directory)
    if stored:
        raise QuantizedCheckpointError(f"{abs_path(directory)}: the weights are quantized ({stored['quantize']}); "
                                       f"{what}")


class LeafQuantizer:
    """Float leaves of the unrolled tree -> the leaves of `cfg`'s quantized tree, one at a time, on the host.

    Building it checks the scheme against every layer (int4: a group size that does not divide an input width is a
    `QuantError` naming the layer), before any tensor is read."""

    def __init__(self, cfg: Glm4vConfig, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        rt = cfg.runtime
        if rt.quantize == "none":
            raise QuantError("LeafQuantizer: the config's runtime.quantize is 'none'")
        self.cfg = cfg.with_runtime(scan_layers=False)
        self.chunk_bytes = chunk_bytes
        float_tree = paths_and_leaves(unbox(abstract_params(self.cfg.with_runtime(quantize="none"))))
        quant_tree = paths_and_leaves(unbox(abstract_params(self.cfg)))
        int8_all = paths_and_leaves(unbox(abstract_params(self.cfg.with_runtime(quantize="int8", quant_skip=()))))
        self.float_leaves: dict[Path, Any] = float_tree  # the float checkpoint's arrays (shape, dtype)
        self.leaves: dict[Path, Any] = quant_tree  # the quantized tree's arrays
        self.plans: dict[Path, LeafPlan] = {}
        for path, f in float_tree.items():
            if quant_tree[path].dtype == f.dtype:
                continue
            scale_path = (*path[:-1], "scale")
            n_in = len(f.shape) - len(int8_all[scale_path].shape)  # an int8 scale has the output axes only
            layout = "in_out" if path[0] == "visual" else rt.kernel_layout  # the vision tower is always in_out
            self.plans[path] = LeafPlan(n_in, layout, scale_path)
        self.quant_paths = set(self.plans) | {p.scale_path for p in self.plans.values()}

    @property
    def scheme(self) -> str:
        return self.cfg.runtime.quantize

    def __call__(self, path: Path, arr: np.ndarray) -> list[tuple[Path, np.ndarray]]:
        """[(path, arr)] for a leaf that stays float; [(path, codes), (scale path, scale)] for a quantized one."""
        plan = self.plans.get(path)
        if plan is None:
            return [(path, arr)]
        codes, scale = self.quantize(arr, plan, "/".join(path))
        return [(path, codes), (plan.scale_path, scale)]

    def quantize(self, w: np.ndarray, plan: LeafPlan, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scale) of one kernel, computed in slices along its first output axis (bounded temporaries)."""
        rt = self.cfg.runtime
        kw = dict(scheme=rt.quantize, n_in=plan.n_in, kernel_layout=plan.kernel_layout,
                  group_size=rt.quant_group_size, where=where)
        n_out = w.ndim - plan.n_in
        axis = plan.n_in if plan.kernel_layout == "in_out" else 0  # the first output axis
        width = w.shape[axis]
        per_row = max(1, w.size // max(width, 1)) * 4  # fp32 bytes of one output slice
        step = max(1, self.chunk_bytes // per_row)
        if step >= width:
            return quantize_array(w, **kw)
        codes, scales = [], []
        for a in range(0, width, step):
            sl = (slice(None),) * axis + (slice(a, min(a + step, width)),)
            c, s = quantize_array(w[sl], **kw)
            codes.append(c)
            scales.append(s)
        # the output axes trail in_out codes and scales (int4 splits an input axis in front of them) and lead out_in
        c_axis = codes[0].ndim - n_out if plan.kernel_layout == "in_out" else 0
        s_axis = scales[0].ndim - n_out if plan.kernel_layout == "in_out" else 0
        return np.concatenate(codes, axis=c_axis), np.concatenate(scales, axis=s_axis)


__all__ = ["DEFAULT_CHUNK_BYTES", "LORA_LATER", "LeafPlan", "LeafQuantizer", "QuantizedCheckpointError",
           "checkpoint_quantization", "refuse_quantized"]
