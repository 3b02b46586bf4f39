"""The global batch of a multi-host step: the shapes it needs, each host's part, and their assembly.

Host i holds rows [i*B, (i+1)*B) of the global batch and patches [i*P, (i+1)*P) of the global vision pack
(P = max_patches, the same static bucket on every host). Text arrays need no change: rows are independent, and
segment ids and M-RoPE positions are per row. The vision pack is one flat sequence over all hosts, so each host
offsets its own references (`offset_vision`): `vision_index` + i * P / merge^2 (the host's first merged vision token
in the global pack; -1 stays -1), and the vision `segment_ids` + i * P (a host's pack has at most P frames, so the
ranges never meet; 0 = padding stays 0), so that the vision tower's attention never mixes patches of different
hosts. This needs the dense vision layout (what the packer emits) and the P axis sharded over the batch axes
(`step.vision_sharding: batch`, with P a multiple of merge^2 x the batch shards per host): each host's patches then
live on its own devices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from glm41v_jax.inputs import ModelInputs, offset_vision_index

from .config import TrainConfig, TrainConfigError
from .loss import IGNORE_INDEX
from .step import TrainStep


def batch_shards_per_host(mesh) -> int:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(n // jax.process_count(), 1)


def check_geometry(cfg: TrainConfig, mesh, model_cfg) -> None:
    """Shapes the multi-host assembly needs, checked before anything compiles (errors name the field)."""
    pc = jax.process_count()
    sources = [("data", cfg.data)] + ([("eval", cfg.eval)] if cfg.eval is not None else [])
    m2 = model_cfg.vision.spatial_merge_size ** 2
    for name, src in sources:
        p = src.max_patches or cfg.data.max_patches
        if p % m2:
            raise TrainConfigError(f"{name}.max_patches ({p}) must be a multiple of {m2} (the model's "
                                   f"spatial_merge_size^2: each merged vision token takes {m2} patches)")
    if pc == 1:
        return
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if n % pc:
        raise TrainConfigError(f"mesh: the batch axes data x fsdp = {n} must be a multiple of the process count {pc}"
                               " (each host feeds whole batch shards)")
    per_host = n // pc
    # Each host's devices must hold a contiguous block of batch shards, in process order.
    devs = np.asarray(mesh.devices)
    for d in range(devs.shape[0]):
        for f in range(devs.shape[1]):
            for dev in devs[d, f].reshape(-1):
                if dev.process_index != (d * devs.shape[1] + f) // per_host:
                    raise TrainConfigError("mesh: the device order does not give each host a contiguous block of "
                                           "batch shards; build the mesh from jax.devices() (process-major)")
    for name, src in sources:
        b = src.batch_size or cfg.data.batch_size
        p = src.max_patches or cfg.data.max_patches
        if b % per_host:
            raise TrainConfigError(f"{name}.batch_size ({b}) must be a multiple of the batch shards per host "
                                   f"({per_host} = data x fsdp / processes)")
        if p % (m2 * per_host):
            raise TrainConfigError(f"{name}.max_patches ({p}) must be a multiple of {m2 * per_host} (merge^2 x the "
                                   "batch shards per host) with several hosts: the vision pack is split by host")
    if cfg.step.vision_sharding != "batch":
        raise TrainConfigError("step.vision_sharding must be 'batch' with several hosts (each host's patches live "
                               "on its own devices)")


def offset_vision(batch: Mapping[str, Any], host: int, max_patches: int, merge2: int) -> dict[str, Any]:
    """Host `host`'s batch with its vision references moved into the global vision pack (module docstring)."""
    out = dict(batch)
    if host == 0:
        return out
    out["vision"] = batch["vision"].offset(host * max_patches)  # the dense plan only (InputError otherwise)
    out["vision_index"] = offset_vision_index(batch["vision_index"], host * (max_patches // merge2))
    return out


def global_shapes(batch: Mapping[str, Any], n_hosts: int, lead: int) -> dict[str, Any]:
    """The global shapes of a host batch: rows (text) and patches (vision) times the number of hosts."""

    def grow(x, axis):
        shape = list(np.shape(x))
        shape[axis] *= n_hosts
        return jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype)

    out = {}
    for key, val in batch.items():
        if key == "vision":
            out[key] = jax.tree.map(lambda v: grow(v, lead), val)
        elif key == "positions":
            out[key] = grow(val, lead + 1)
        else:
            out[key] = grow(val, lead)
    return out


def global_batch(batch: Mapping[str, Any], ts: TrainStep, max_patches: int, lead: int = 0) -> dict[str, Any]:
    """This host's NumPy batch -> global jax arrays (every host calls it with its own batch)."""
    host, n = jax.process_index(), jax.process_count()
    merge2 = ts.cfg.vision.spatial_merge_size ** 2
    local = offset_vision(batch, host, max_patches, merge2) if n > 1 else dict(batch)
    shapes = global_shapes(local, n, lead)
    shardings = ts.batch_shardings(shapes)
    return jax.tree.map(lambda x, s, g: jax.make_array_from_process_local_data(s, np.asarray(x), g.shape),
                        local, shardings, shapes)


def empty_batch(like: Mapping[str, Any]) -> dict[str, Any]:
    """A batch of padding with the shapes of `like`: no tokens, no labels (pads hosts with fewer eval batches)."""
    pads = {**ModelInputs.pad_values(), "labels": IGNORE_INDEX}
    out = {k: np.full_like(v, pads[k]) for k, v in like.items() if k != "vision"}
    out["vision"] = like["vision"].empty_like()
    return out


def sample_fingerprints(batch: Mapping[str, Any]) -> list[str]:
    """sha1 (16 hex) of each packed sample's int32 input_ids, row-major: which samples a host's batch holds."""
    ids = np.asarray(batch["input_ids"])
    seg = np.asarray(batch["segment_ids"])
    ids, seg = ids.reshape(-1, ids.shape[-1]), seg.reshape(-1, seg.shape[-1])
    out = []
    for r in range(ids.shape[0]):
        for s in range(1, int(seg[r].max(initial=0)) + 1):
            out.append(hashlib.sha1(ids[r][seg[r] == s].astype(np.int32).tobytes()).hexdigest()[:16])
    return out


__all__ = ["batch_shards_per_host", "check_geometry", "empty_batch", "global_batch", "global_shapes", "offset_vision",
           "sample_fingerprints"]
