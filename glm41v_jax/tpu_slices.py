"""Cloud TPU slice types for `glm41v plan`: names, published per-chip figures, and the devices of a slice.

`parse_tpu` reads a type as Google spells it: v5e-N (or v5litepod-N) and v6e-N count chips, v5p-N and v4-N count
TensorCores (2 per chip). A multi-host slice (v5p-16 and up, v5e/v6e above 8 chips) has 4 chips per host.

`topology_devices` gives the jax devices of a slice from the real TPU compiler (libtpu, from
`pip install 'glm41v-jax[tpu]'`), which runs on any machine: `jax.experimental.topologies.get_topology_desc` builds
the topology, and programs compiled for its devices need no TPU (a multi-host slice is one program over all of its
devices).

Per-device figures (`per_device`): a jax device is a chip except on v4, where each of the 2 TensorCores is a device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import Glm41vError

GiB = 1 << 30


class PlanError(Glm41vError, ValueError):
    """A bad plan request (TPU name, mesh, sizes, config); the message says what was expected."""


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


def next_size(tpu: TpuType, need_per_chip: float) -> str | None:
    """The smallest larger slice of the family whose HBM holds the same bytes spread over more chips (to 90%)."""
    spec = tpu.spec
    total = need_per_chip * tpu.chips
    for chips in sorted(spec.shapes):
        if chips > tpu.chips and total / chips <= 0.9 * spec.hbm_bytes:
            return f"{tpu.family}-{chips * 2 if spec.counts_cores else chips}"
    return None


def per_device(tpu: TpuType, n_devices: int) -> tuple[float, float, float]:
    """(HBM bytes, peak FLOP/s, HBM bytes/s) per jax device (a chip; half a chip on v4)."""
    share = tpu.chips / n_devices
    return tpu.spec.hbm_bytes * share, tpu.spec.peak_flops * share, tpu.spec.hbm_bandwidth * share
