"""HBM traffic of a compiled TPU program, read from its optimized HLO: a calibrated "bytes accessed".

The compiler's `cost_analysis()["bytes accessed"]` is not the HBM traffic. Calibrated on programs whose minimum is
known (`calibration_programs`, compiled for a v5e-8 with a weight sharded 8 ways; BENCHMARKS.md "TPU decode
efficiency"):

* x @ W at batch 1 (W 16 MiB per chip): "bytes accessed" 16.05 MiB, right;
* tanh(x @ W) at batch 8: 80 MiB for the same 16 MiB of weights: the compiler prefetches W into on-chip memory
  (`copy-start` to memory space S(1)) and counts the copy's read, its write and the matmul's read of the copy;
* tanh(x @ W1) @ W2 (two 16 MiB weights): 96 MiB for 32 MiB.

`calibrated_bytes(compiled)` counts what touches HBM instead: for every instruction the program executes at its
top level (the entry computation and the bodies of its loops/conditionals, each counted once, as the compiler
does; never the inside of a fusion), the bytes of its operands and results that live in HBM (memory space 0 in
the layout; buffers in on-chip memory spaces, `S(1)` and up, are free). Moves that touch no memory (parameter,
tuple, get-tuple-element, bitcast, constants, the `-done` half of async pairs) count nothing; the `-start` half
counts its operands and its destination, and an in-place
dynamic-update-slice (a KV-cache write) counts the slice it writes, not the buffer it updates. On the calibration
programs this gives the minimum exactly (16, 16, 32 MiB).

`decode_step(cfg, mesh, batch, max_len)` compiles one decode step of the Engine's own step function (the body of its
decode loop, layers unrolled) with the Engine's shardings and a donated KV cache; `decode_minimum_bytes` is the
analytic floor (every text weight and the lm_head read once per chip, B rows of the embedding, the KV cache read
once); their ratio is the decode efficiency of `glm41v plan`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .compiled_figures import device_bytes
from .config import Glm4vConfig
from .decode import step_logits
from .engine import Engine
from .model import init_cache
from .sharding import under_mesh

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2,
                "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1,
                "f8e5m2": 1, "token": 0}
# Instructions that move no HBM bytes themselves.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done", "after-all", "partition-id",
         "replica-id", "opt-barrier", "while", "conditional", "call", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "send-done", "recv-done", "async-done", "iota"}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%(\S+)\s*\(.*\{\s*$")


def _array_bytes(text: str, any_space: bool = False) -> float:
    """HBM bytes of the arrays in a shape string (tuples summed); arrays laid out in memory space S(k>0): 0
    (`any_space`: counted too)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        if not any_space and layout and re.search(r"S\(([1-9][0-9]*)\)", layout):
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _split_operands(args: str) -> list[str]:
    """'%a, %b), attr=...' -> ['%a', '%b'] (the operand list up to the closing parenthesis)."""
    depth, cur, out = 0, [], []
    for ch in args:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse(hlo: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """{computation: [instruction dicts]}, entry name."""
    comps: dict[str, list[dict[str, Any]]] = {}
    entry, cur = "", None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur is None:
            continue
        if line.strip() == "}":
            cur = None
            continue
        mi = _INSTR.match(line)
        if mi:
            name, shape, op, rest = mi.groups()
            calls = re.findall(r"(?:calls|body|condition|to_apply|branch_computations|true_computation|"
                               r"false_computation)=\{?(%[^,}\s]+(?:,\s*%[^,}\s]+)*)", rest)
            called = [c.strip().lstrip("%") for group in calls for c in group.split(",")]
            comps[cur].append({"name": name, "shape": shape, "op": op, "operands":
                               [o.split()[-1].lstrip("%") for o in _split_operands(rest) if o],
                               "called": called, "line": line})
    return comps, entry


def _dus_param(comp: list[dict[str, Any]]) -> tuple[int, float] | None:
    """For a fusion computation whose root is a dynamic-update-slice: (parameter index of the updated buffer,
    bytes of the update). None otherwise."""
    by_name = {i["name"]: i for i in comp}
    root = next((i for i in comp if i["line"].lstrip().startswith("ROOT")), None)
    if root is None or root["op"] != "dynamic-update-slice" or len(root["operands"]) < 2:
        return None
    buf, upd = by_name.get(root["operands"][0]), by_name.get(root["operands"][1])
    while buf is not None and buf["op"] == "bitcast" and buf["operands"]:
        buf = by_name.get(buf["operands"][0])
    if buf is None or buf["op"] != "parameter" or upd is None:
        return None
    m = re.search(r"parameter\((\d+)\)", buf["line"])
    return (int(m.group(1)), _array_bytes(upd["shape"])) if m else None


_SLICING = ("slice", "dynamic-slice", "gather")


def _sliced_params(comp: list[dict[str, Any]]) -> dict[int, float]:
    """For a fusion computation: {parameter index: bytes read} for parameters only read through slices (an
    embedding row, a weight half): the slices' sizes, not the whole buffer."""
    users: dict[str, list[dict[str, Any]]] = {}
    for ins in comp:
        for o in ins["operands"]:
            users.setdefault(o, []).append(ins)

    def reads(name: str, depth: int = 0) -> float | None:
        us = users.get(name, [])
        if not us or depth > 4:
            return None
        total = 0.0
        for u in us:
            if u["op"] == "bitcast":
                r = reads(u["name"], depth + 1)
            elif u["op"] in _SLICING and u["operands"] and u["operands"][0] == name:
                r = _array_bytes(u["shape"], any_space=True)
            else:
                r = None
            if r is None:
                return None
            total += r
        return total

    out = {}
    for ins in comp:
        if ins["op"] == "parameter":
            m = re.search(r"parameter\((\d+)\)", ins["line"])
            r = reads(ins["name"])
            if m and r is not None:
                out[int(m.group(1))] = r
    return out


def hbm_bytes(hlo_text: str) -> float:
    """HBM bytes read and written by the top-level instructions of an optimized HLO module (module docstring)."""
    return sum(hbm_bytes_by_computation(hlo_text).values())


def hbm_bytes_by_computation(hlo_text: str) -> dict[str, float]:
    """`hbm_bytes` per executed computation: {"entry": the entry computation's own instructions, "<name>": a loop
    body / condition / branch (each counted once)}, in the order they are reached."""
    comps, entry = _parse(hlo_text)
    shapes = {i["name"]: i["shape"] for c in comps.values() for i in c}
    seen: set[str] = set()
    totals: dict[str, float] = {}

    def walk(name: str) -> None:
        if name in seen or name not in comps:
            return
        seen.add(name)
        key = "entry" if name == entry else name
        totals[key] = 0.0
        for ins in comps[name]:
            op = ins["op"]
            if op in ("while", "conditional", "call"):
                for c in ins["called"]:
                    walk(c)
                continue
            if op in _FREE or op.endswith("-done"):
                continue
            operands = [_array_bytes(shapes.get(o, "")) for o in ins["operands"]]
            out = _array_bytes(ins["shape"])
            if op.endswith("-start"):
                # async pair: the result tuple repeats the operands next to the destination; count the destination
                out = max(out - sum(operands), 0.0)
            dus = None
            if op in ("slice", "slice-start", "dynamic-slice") and operands:
                # reads only the slice (the destination's size, wherever the destination lives)
                dst = _array_bytes(ins["shape"], any_space=True) - (sum(operands) if op == "slice-start" else 0)
                operands[0] = min(operands[0], max(dst, 0.0))
            if op == "fusion" and ins["called"]:
                fused = comps.get(ins["called"][0], [])
                dus = _dus_param(fused)
                for i, r in _sliced_params(fused).items():
                    if i < len(operands):
                        operands[i] = min(operands[i], r)
            elif op == "dynamic-update-slice" and len(ins["operands"]) >= 2:
                dus = (0, operands[1])
            if dus is not None and dus[0] < len(operands):
                operands[dus[0]] = 0.0  # updated in place: only the slice is written
                out = dus[1]
            totals[key] += sum(operands) + out

    walk(entry)
    return totals


def calibrated_bytes(compiled: Any) -> float:
    """HBM bytes per device of one run of a compiled program (`jax.jit(...).lower(...).compile()`), counted from
    its optimized HLO (module docstring); a loop body is counted once."""
    return hbm_bytes(compiled.as_text())


def calibrated_split(compiled: Any) -> dict[str, float]:
    """`calibrated_bytes` as {"entry": once per run, "loops": the loop bodies, once per iteration}: a program that
    runs `n` loop iterations moves about entry / n + loops per iteration (the decode chunk: n steps)."""
    by = hbm_bytes_by_computation(compiled.as_text())
    entry = by.pop("entry", 0.0)
    return {"entry": entry, "loops": sum(by.values())}


def compiler_bytes(compiled: Any) -> float:
    """The compiler's own `cost_analysis()["bytes accessed"]` (counts on-chip copies and intermediates)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    return float(ca.get("bytes accessed", 0.0))


# ----------------------------------------------------------------------------------------------- calibration


def calibration_programs(mesh: jax.sharding.Mesh, d: int = 4096, f: int = 16384) -> dict[str, tuple[Any, float]]:
    """Programs with a known HBM minimum, compiled for `mesh` (W sharded over "tensor"): name -> (compiled,
    minimum bytes per device)."""
    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    t = mesh.shape["tensor"]
    w1, w2 = sds((d, f), P(None, "tensor")), sds((f, d), P("tensor", None))
    col, rep = NamedSharding(mesh, P(None, "tensor")), NamedSharding(mesh, P())
    one_w = d * f * 2 / t
    out = {}
    out["gemv x@W, batch 1"] = (jax.jit(lambda x, w: x @ w, out_shardings=col).lower(sds((1, d), P()), w1).compile(),
                                one_w)
    out["tanh(x@W), batch 8"] = (jax.jit(lambda x, w: jnp.tanh(x @ w), out_shardings=col)
                                 .lower(sds((8, d), P()), w1).compile(), one_w)
    out["tanh(x@W1)@W2, batch 1"] = (jax.jit(lambda x, a, b: jnp.tanh(x @ a) @ b, out_shardings=rep)
                                     .lower(sds((1, d), P()), w1, w2).compile(), 2 * one_w)
    # A donated cache (B, S, K, H) sharded over "tensor" on H... written at one slot: only the slot moves.
    b, slots, kh, h = 8, 4096, 2, 128 * t
    cache_sh = NamedSharding(mesh, P(None, None, None, "tensor"))
    cache = sds((b, slots, kh, h), P(None, None, None, "tensor"))
    new = sds((b, 1, kh, h), P(None, None, None, "tensor"))
    upd = jax.jit(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0, 0)), donate_argnums=(0,),
                  out_shardings=cache_sh)
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    out["cache write, 1 slot (donated)"] = (upd.lower(cache, new, i32).compile(), 2 * b * kh * h * 2 / t)
    # Embedding rows: B rows of a (V, D) table sharded over rows (GLM-4's 151552 x 4096: too big to prefetch
    # on chip, as the compiler does with a small table, which then really reads it whole).
    table = sds((151552, d), P("tensor", None))
    ids = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep)
    out["embedding rows, batch 8"] = (jax.jit(lambda e, i: jnp.take(e, i, axis=0), out_shardings=rep)
                                      .lower(table, ids).compile(), 8 * d * 2)
    return out


# ----------------------------------------------------------------------------------------------- decode step


def decode_step(cfg: Glm4vConfig, mesh: jax.sharding.Mesh, batch: int, max_len: int,
                kernel_layout: str | None = None) -> tuple[Any, dict[str, float]]:
    """Compile one decode step of the Engine (`decode.step_logits`: the body of its decode loop) for `mesh`
    from shapes only, with the Engine's param / KV-cache / row shardings and the cache donated.
    Returns (compiled, {"params_bytes", "kv_cache_bytes", "minimum_bytes"} per device)."""
    eng = Engine(None, cfg, mesh=mesh, kernel_layout=kernel_layout)
    cache = jax.eval_shape(functools.partial(init_cache, eng.cfg, batch, max_len))
    cache_sh = eng.cache_shardings(cache)
    row = eng.batch_sharding(np.zeros((batch, max_len), np.int32))
    vec = eng.batch_sharding(np.zeros((batch,), np.int32))
    rep = eng.replicated()

    def sds(x, sh):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    args = (eng.params, jax.tree.map(sds, cache, cache_sh), sds(jax.ShapeDtypeStruct((batch, max_len), jnp.int32), row),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), sds(jax.ShapeDtypeStruct((batch,), jnp.int32), vec),
            sds(jax.ShapeDtypeStruct((batch,), jnp.int32), vec))
    fn = under_mesh(functools.partial(step_logits, model=eng.model), mesh)
    logits_sh = eng.batch_sharding(np.zeros((batch, cfg.text.vocab_size), np.float32))
    compiled = jax.jit(fn, in_shardings=(eng.param_shardings, cache_sh, row, rep, vec, vec),
                       out_shardings=(logits_sh, cache_sh, row), donate_argnums=(1, 2)).lower(*args).compile()
    return compiled, decode_minimum_bytes(eng.params, cache, cache_sh, batch, kv_read_fraction(cfg, mesh))


def kv_read_fraction(cfg: Glm4vConfig, mesh: jax.sharding.Mesh) -> float:
    """The part of its KV-cache shard a device must read per decode step: the kv heads its query heads use, out of
    those it holds. KV heads that do not divide "tensor" are replicated (sharding.py), yet each device's N/t query
    heads use only N/t / G of them (the 9B on tensor=8: 4 query heads, 1 of the 2 kv heads held; the compiled step
    slices it out)."""
    n, k = cfg.text.num_attention_heads, cfg.text.num_key_value_heads
    t = mesh.shape.get("tensor", 1)
    q_local = n // t if n % t == 0 else n
    kv_local = k // t if k % t == 0 else k
    used = len({h // (n // k) for h in range(q_local)})
    return min(used, kv_local) / kv_local


def decode_minimum_bytes(params: Mapping[str, Any], cache: Any, cache_shardings: Any, batch: int,
                         kv_fraction: float = 1.0) -> dict[str, float]:
    """The floor of one decode step's HBM traffic per device: every text-decoder weight and the lm_head read once
    (the shard this device holds), B rows of the embedding table, the KV cache read once (this device's shard, times
    `kv_fraction`: `kv_read_fraction`). The vision tower is not part of decode."""
    text = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "visual"})[0]:
        keys = [str(getattr(p, "key", p)) for p in path]
        if "embed_tokens" in keys:
            text += batch * x.shape[-1] * jnp.dtype(x.dtype).itemsize  # B rows gathered
            continue
        text += device_bytes(x.shape, x.dtype, getattr(x, "sharding", None))
    kv = sum(device_bytes(x.shape, x.dtype, s) for x, s in zip(jax.tree.leaves(cache),
                                                                     jax.tree.leaves(cache_shardings), strict=True))
    return {"params_bytes": text, "kv_cache_bytes": kv, "minimum_bytes": text + kv * kv_fraction}
