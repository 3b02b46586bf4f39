"""Mesh and sharding: one logical-axis rules table, mapped onto the mesh axes ("data", "fsdp", "tensor").

Every weight declares logical axis names where it is created (layers.py). This table is the only place that says
which mesh axis each logical axis lives on: a new parallelism layout is an edit here, not in the model.

A dimension whose size is not divisible by its mesh axis is replicated along that axis (so 2 KV heads on
tensor=4 are replicated across the 4 tensor shards, while the 32 query heads are split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import Glm41vError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("patch", None),
    ("pos", None),
    ("norm", None),
    ("layers", None),
)


class MeshError(Glm41vError, ValueError):
    """A bad --mesh specification; the message says what was expected."""


def parse_mesh(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> sizes. Missing axes are 1; one axis may be -1 (= the rest). None -> all fsdp.

    Every problem (syntax, unknown or repeated axis, a size that is not a positive integer, two -1s, sizes that do not
    multiply to the device count) is a MeshError naming the item."""
    n = n_devices or jax.device_count()
    if spec is None or not str(spec).strip():
        return {"data": 1, "fsdp": n, "tensor": 1}
    if not isinstance(spec, str):
        raise MeshError(f"--mesh: expected a string like 'data=2,fsdp=4', got {type(spec).__name__}")
    sizes = {a: 1 for a in MESH_AXES}
    seen: set[str] = set()
    fill = None
    for part in spec.split(","):
        if "=" not in part:
            raise MeshError(f"--mesh: expected AXIS=SIZE items separated by commas, got {part.strip()[:40]!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in MESH_AXES:
            raise MeshError(f"--mesh: unknown axis {k[:40]!r}; expected one of {', '.join(MESH_AXES)}")
        if k in seen:
            raise MeshError(f"--mesh: axis {k!r} is given twice")
        seen.add(k)
        try:
            size = int(v)
        except ValueError:
            raise MeshError(f"--mesh: size of {k!r} must be an integer, got {v[:40]!r}") from None
        if size == -1:
            if fill is not None:
                raise MeshError(f"--mesh: only one axis may be -1, got {fill!r} and {k!r}")
            fill = k
        elif not 1 <= size <= n:
            raise MeshError(f"--mesh: size of {k!r} must be in [1, {n}] (the device count) or -1, got {v[:40]}")
        sizes[k] = size
    if fill is not None:
        rest = math.prod(s for a, s in sizes.items() if a != fill)
        if n % rest:
            raise MeshError(f"--mesh: {n} devices are not divisible by the fixed axes' product {rest}")
        sizes[fill] = n // rest
    total = math.prod(sizes.values())
    if total != n:
        raise MeshError(f"--mesh: {spec!r} uses {total} devices but {n} are available; sizes must multiply to {n}")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    sizes = spec if isinstance(spec, Mapping) else parse_mesh(spec, len(devices))
    shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {int(np.prod(shape))} devices, "
                        f"got {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> PartitionSpec:
    """Map one array's logical axes to a PartitionSpec; refuse double use of a mesh axis; replicate if indivisible."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        size = 1
        for a in axes:
            if a in used or mesh.shape.get(a, 1) == 1:
                continue
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*out)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Shardings for a params tree from `jax.eval_shape(model.init, ...)` (boxed with logical names)."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def under_mesh(fn: Any, mesh: Mesh | None) -> Any:
    """`fn` traced under `mesh` as the context mesh (`jax.sharding.use_abstract_mesh`), however it is later jitted,
    lowered or compiled: what the attention kernels read to run under shard_map, and the platform "auto" choices
    read (a TPU topology compiled from a CPU host). `mesh=None`: `fn` itself."""
    if mesh is None:
        return fn

    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced
