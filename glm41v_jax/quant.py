"""Weight-only int8 / int4 quantization: the schemes, the quantizer, and a float params tree -> a quantized one.

Schemes (`RuntimeConfig.quantize`; the layer side is `layers.Dense(quant=...)`):
  * "int8": symmetric, one fp32 scale per output channel: scale = max|w| over the contracted (input) axes / 127,
    codes = round-half-to-even(w / scale) clipped to [-127, 127]. An all-zero channel has scale 0 and codes 0 (the
    division is by 1 there: no NaN). The codes keep the float kernel's shape and logical axes; the scale has the
    output axes' shape and names.
  * "int4": groups of `quant_group_size` (g) along the LAST input axis (the one contracted axis of most layers; the
    head dim of an o projection), one fp32 scale per group and output: scale = max|w| in the group / 7, codes in
    [-7, 7] (symmetric: -8 is never produced, so negating a kernel negates its codes exactly). That input axis of
    length I becomes (I/g, g), logical axes (its name, None); the scale drops the g axis (`layers.quant_shapes`).
    So `sharding.logical_to_spec` places both with the float kernel's rules; a group count that the mesh axis does
    not divide is replicated: the 9B's MLP width 13696 is 107 groups of 128, so the int4 down projection is not
    split over "tensor" (its output axis "embed" is still split over "fsdp"). I % g != 0 is a `QuantError`.
    The codes are stored as JAX's `int4` dtype: the TPU packs it two to a byte in HBM natively (the point of int4:
    the 9B on a 16 GB v5e-1), and the dequantize fuses into the dot's operand read (the TPU compiler, v5e-1, a
    4096 x 13696 bf16 Dense: arguments 107.0 MiB bf16, 53.6 int8, 28.4 int4 with its scales; no temporaries).
    XLA:CPU stores `int4` one per byte (no memory saving on the host, where memory is not the limit); a
    hand-packed uint8 with shift/mask unpacking would halve the host bytes but put the unpacking in front of every
    dot on every backend. The Engine holds int4 codes as int8 on CPU and multiplies them by a grouped int8 dot
    (`backend.BACKEND_TUNING` "quant_matmul_int4"): about the fp32 matmul's speed at 1 row, below int8's.

Kernel layouts: both "in_out" and "out_in" (layers.Dense): the codes and scales put their axes in the float
kernel's order, so `model.to_kernel_layout` moves quantized trees as it moves float ones.

What is quantized (`RuntimeConfig.quant_of`): the text decoder's projections (q, k, v, o, gate_up, down) always;
the lm_head unless `quant_skip` names "lm_head"; the vision tower with its merger (the patch embedding excepted:
1176 inputs are no int4 groups, and it is tiny) unless `quant_skip` names "vision" (the default: the tower is
about a tenth of the 9B's weights, it runs once per image, compute-bound over thousands of patches, so weight bytes
do not bound its speed, and images keep full-precision features). The token embedding is never
quantized: a decode step gathers B rows of it (no matmul reads the table, so its bytes cost no bandwidth), and a
tied lm_head (`Embed.attend`) would need the float table anyway.

`quantize_params` maps a float tree to the quantized tree of `abstract_params(cfg)` leaf by leaf: host NumPy
leaves are quantized on the host (bounded memory: one leaf's temporaries), device leaves by one jitted program per
leaf whose outputs land in `shardings` (the float tree is never replicated or gathered).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .config import QUANT_SCHEMES, Glm4vConfig
from .layers import QUANT_DTYPES, QUANT_QMAX, QuantError, quant_shapes
from .model import abstract_params

SCHEMES = QUANT_SCHEMES  # "none", "int8", "int4"


def _check(scheme: str, kernel_layout: str) -> None:
    if scheme not in QUANT_QMAX:
        raise QuantError(f"quantize: scheme must be one of {', '.join(map(repr, QUANT_QMAX))}; got {scheme!r}")
    if kernel_layout not in ("in_out", "out_in"):
        raise QuantError(f"quantize: kernel_layout must be 'in_out' or 'out_in'; got {kernel_layout!r}")


def _in_axes(ndim: int, n_in: int, n_lead: int, kernel_layout: str) -> tuple[int, ...]:
    return tuple(range(n_lead, n_lead + n_in)) if kernel_layout == "in_out" else tuple(range(ndim - n_in, ndim))


def _quantize(w: Any, qmax: Any, scheme: str, n_in: int, kernel_layout: str, group_size: int, n_lead: int, xp: Any,
              where: str) -> tuple[Any, Any]:
    """The quantizer on NumPy (xp=np) or traced JAX (xp=jnp) arrays; on CPU both give the same bits.

    scale = amax / qmax and inv = qmax / amax (0 where amax = 0) are fp32 divisions of scale-sized arrays; the codes
    are round-half-to-even(w * inv), a multiplication (exact in IEEE fp32 everywhere). XLA rewrites a division by a
    broadcast (scalar or scale) as a multiplication by the reciprocal, off in the last bit, so on the device the
    divisor is a full array behind an optimization barrier, and the kernel-sized op is a multiplication."""
    _check(scheme, kernel_layout)
    names = (None,) * w.ndim
    cshape, _, sshape, _ = quant_shapes(tuple(w.shape), names, n_in, n_lead, kernel_layout, scheme, group_size, where)
    wf = xp.asarray(w).astype(xp.float32).reshape(cshape)  # int4: the last input axis split into (I/g, g)
    q = QUANT_QMAX[scheme]
    if scheme == "int8":
        red = _in_axes(w.ndim, n_in, n_lead, kernel_layout)
    else:  # the group axis: right after the group-count axis
        red = (len(sshape) if kernel_layout == "out_in" else n_lead + n_in,)
    amax = xp.max(xp.abs(wf), axis=red, keepdims=True)
    qb = xp.full(amax.shape, qmax, xp.float32)
    if xp is jnp:
        qb = jax.lax.optimization_barrier(qb)
    scale = amax / qb
    inv = xp.where(amax == 0, xp.float32(0), qb / xp.where(amax == 0, xp.float32(1), amax))
    codes = xp.clip(xp.round(wf * inv), -q, q)
    return codes.astype(QUANT_DTYPES[scheme]), scale.reshape(sshape).astype(xp.float32)


def quantize_array(w: np.ndarray, scheme: str, n_in: int = 1, kernel_layout: str = "in_out", group_size: int = 128,
                   n_lead: int = 0, where: str = "kernel") -> tuple[np.ndarray, np.ndarray]:
    """A float kernel (n_lead leading batch axes, then its in/out axes in `kernel_layout` order; `n_in` contracted
    axes) -> (codes, fp32 scale) on the host (see the module docstring). `where` names the tensor in errors."""
    _check(scheme, kernel_layout)
    return _quantize(np.asarray(w), np.float32(QUANT_QMAX[scheme]), scheme, n_in, kernel_layout, group_size, n_lead,
                     np, where)


def dequantize_array(codes: np.ndarray, scale: np.ndarray, scheme: str, n_in: int = 1, kernel_layout: str = "in_out",
                     n_lead: int = 0, dtype: Any = np.float32) -> np.ndarray:
    """(codes, scale) -> the float kernel they stand for (codes * scale in fp32, then `dtype`), in the float
    kernel's shape."""
    _check(scheme, kernel_layout)
    c = np.asarray(codes).astype(np.float32)
    s = np.asarray(scale, np.float32)
    if scheme == "int8":
        ax = _in_axes(c.ndim, n_in, n_lead, kernel_layout)
        w = c * np.expand_dims(s, ax)
        return w.astype(dtype)
    g_axis = c.ndim - 1 if kernel_layout == "out_in" else n_lead + n_in
    w = c * np.expand_dims(s, g_axis)
    shape = list(s.shape)
    shape[g_axis - 1] *= c.shape[g_axis]
    return w.reshape(shape).astype(dtype)


@functools.lru_cache(maxsize=64)
def _device_quantizer(scheme: str, n_in: int, kernel_layout: str, group_size: int, n_lead: int,
                      out_shardings: Any) -> Any:
    """The jitted quantizer, one per scheme/layout/sharding (every layer of a shape shares it; its shape errors are
    raised before, by the caller, with the layer's name)."""
    fn = functools.partial(_quantize, scheme=scheme, n_in=n_in, kernel_layout=kernel_layout, group_size=group_size,
                           n_lead=n_lead, xp=jnp, where="kernel")
    return jax.jit(fn, out_shardings=out_shardings)


def is_quantized(params: Any) -> bool:
    """Whether any leaf of a params tree holds integer codes."""
    return scheme_of(params) != "none"


def scheme_of(params: Any) -> str:
    """"int4" / "int8" when the tree holds such codes (int4 first: an int4 tree has no int8 leaf), else "none"."""
    dtypes = {np.dtype(getattr(x, "dtype", np.float32)) for x in jax.tree.leaves(params)}
    for scheme in ("int4", "int8"):
        if np.dtype(QUANT_DTYPES[scheme]) in dtypes:
            return scheme
    return "none"


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_box)}


def quantizable_kernels(cfg: Glm4vConfig) -> dict[tuple[str, ...], int]:
    """Path of every kernel the quantizer may touch (as with quant_skip=()) -> its number of input (contracted) axes:
    the axes an int8 scale drops."""
    src = _flat(abstract_params(cfg.with_runtime(quantize="none")))
    q = _flat(abstract_params(cfg.with_runtime(quantize="int8", quant_skip=())))
    return {(*k[:-1], "kernel"): len(src[(*k[:-1], "kernel")].value.shape) - len(v.value.shape)
            for k, v in q.items() if k[-1] == "scale" and (*k[:-1], "kernel") in q
            and q[(*k[:-1], "kernel")].value.dtype == np.int8}


def quantize_params(params: Any, cfg: Glm4vConfig, shardings: Any = None, *, donate: bool = False) -> Any:
    """A float params tree (that of `cfg` with quantize="none") -> the tree of `abstract_params(cfg)`: the same
    keys, shapes and dtypes, every quantized Dense's `kernel` replaced by its codes plus a `scale` beside it.

    Host (NumPy) leaves are quantized on the host one at a time; device leaves by a jitted program per leaf. With
    `shardings` (a tree for the quantized params, e.g. `sharding.param_shardings(abstract_params(cfg), mesh)`)
    every output leaf lands in its sharding. `donate=True` deletes each float device kernel once its codes exist
    (the device never holds the float and the quantized tree at once)."""
    rt = cfg.runtime
    if rt.quantize == "none":
        raise QuantError("quantize_params: the config's runtime.quantize is 'none'; give the scheme to quantize to")
    found = scheme_of(params)
    if found != "none":
        raise QuantError(f"quantize_params: the params are already quantized ({found}); quantize a float checkpoint")
    src = _flat(abstract_params(cfg.with_runtime(quantize="none")))
    dst = _flat(abstract_params(cfg))
    n_ins = quantizable_kernels(cfg)
    leaves = _flat(params)
    if set(leaves) != set(src):
        extra, missing = sorted(set(leaves) - set(src)), sorted(set(src) - set(leaves))
        raise QuantError(f"quantize_params: the params do not match the float config (unexpected {extra[:3]}, "
                         f"missing {missing[:3]})")
    for key, s in src.items():  # every shape checked before any array is consumed
        if tuple(np.shape(leaves[key])) != s.value.shape:
            raise QuantError(f"quantize_params: {'/'.join(key)}: shape {np.shape(leaves[key])}, the float config "
                             f"expects {s.value.shape}")
    sh = _flat(shardings) if shardings is not None else {}
    out = {}
    for key, s in src.items():
        x, d = leaves[key], dst[key]
        if d.value.dtype == s.value.dtype:  # a float leaf of the quantized tree
            out[key] = x if key not in sh else jax.device_put(x, sh[key])
            continue
        scale_key = (*key[:-1], "scale")
        n_lead = sum(1 for n in s.names if n == "layers")
        n_in = n_ins[key]
        where = "/".join(key)
        layout = "in_out" if key[0] == "visual" else rt.kernel_layout  # the vision tower is always in_out
        if isinstance(x, jax.Array):
            outs = None if key not in sh else (sh[key], sh[scale_key])
            quant_shapes(tuple(x.shape), s.names, n_in, n_lead, layout, rt.quantize, rt.quant_group_size, where)
            codes, scale = _device_quantizer(rt.quantize, n_in, layout, rt.quant_group_size, n_lead, outs)(
                x, np.float32(QUANT_QMAX[rt.quantize]))
            if donate:
                x.delete()
        else:
            codes, scale = quantize_array(np.asarray(x), rt.quantize, n_in, layout, rt.quant_group_size, n_lead,
                                          where)
            if key in sh:
                codes, scale = jax.device_put(codes, sh[key]), jax.device_put(scale, sh[scale_key])
        out[key], out[scale_key] = codes, scale
    if set(out) != set(dst):
        raise QuantError(f"quantize_params: built {sorted(set(out) ^ set(dst))[:3]} unlike the quantized config")
    return traverse_util.unflatten_dict(out)


def logit_agreement(logits_ref: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position of (T, V) logits: (top-1 agrees, KL(ref || other) in nats), in float64: how a quantized model's
    logits compare with the float model's (tests/test_quant_accuracy.py, benchmarks/quant_accuracy.py)."""
    lpf = np.asarray(logits_ref, np.float64)
    lpq = np.asarray(logits, np.float64)
    lpf = lpf - lpf.max(-1, keepdims=True)
    lpf -= np.log(np.exp(lpf).sum(-1, keepdims=True))
    lpq = lpq - lpq.max(-1, keepdims=True)
    lpq -= np.log(np.exp(lpq).sum(-1, keepdims=True))
    return np.argmax(logits_ref, -1) == np.argmax(logits, -1), (np.exp(lpf) * (lpf - lpq)).sum(-1)
