"""Per-device figures of a program compiled for TPU devices (`glm41v plan`), as the compiler reports them.

`memory_figures`: `compiled.memory_analysis()` (the compiler's peak, what it checks against HBM); `cost_figures`:
`compiled.cost_analysis()` (FLOPs and "bytes accessed"; a loop body is counted once; `tpu_cost.calibrated_bytes`
is the HBM traffic); `shard_bytes`: what one device holds of arrays under their shardings; `parse_oom`: the
figures of the compiler's RESOURCE_EXHAUSTED message (`compile_oom`: of an exception raised while compiling).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def shard_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs or arrays) under its shardings (or `shardings`); int4
    counts half a byte, as the TPU packs it (quant.py)."""
    leaves = jax.tree.leaves(tree)
    shs = [getattr(x, "sharding", None) for x in leaves] if shardings is None else jax.tree.leaves(shardings)
    return sum(device_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, shs, strict=True))


def device_bytes(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> int:
    """Bytes one device holds of an array of `shape` and `dtype` under `sharding` (None: the whole array); int4
    counts half a byte, as the TPU packs it (numpy's int4 itemsize is 1)."""
    shape = tuple(shape) if sharding is None else tuple(sharding.shard_shape(tuple(shape)))
    n = int(np.prod(shape, dtype=np.int64))
    return (n + 1) // 2 if np.dtype(dtype) == np.dtype(jnp.int4) else n * np.dtype(dtype).itemsize


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


def compile_oom(e: BaseException) -> dict[str, Any] | None:
    """`parse_oom` of an exception raised while compiling (None when it is not the compiler's out-of-memory)."""
    return parse_oom(str(e)) if isinstance(e, (jax.errors.JaxRuntimeError, RuntimeError)) else None
