"""The one attention entry point of both towers, with interchangeable backends.

`attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions, scale, impl)`:
grouped-query attention with segment ids. q (B, T, N, H); k, v (B, S, K, H), N = G * K; segment ids (B, T) /
(B, S) int, 0 = padding (never attended). A query attends to a key iff their segment ids are equal and non-zero,
and (if causal) the key's position is <= the query's. Block-diagonal vision attention = one segment per
image/frame, causal=False. Returns (B, T, N, H) in q's dtype.

Backends (`impl`, also `RuntimeConfig.attention_impl`):

* "xla"    the reference: materialised fp32 logits and softmax, probabilities cast to v's dtype (as HF). Runs
           everywhere; every other path is tested against it. On the CPU backend, calls with 32+ queries run the
           same math blocked over cache-sized pieces (`blocked_attention`; `dense_attention` is the one block).
* "pallas" TPU: JAX's splash-attention Pallas kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) for
           prefill (T > 1), text and vision alike. The exact reference mask (segments, padding, causal by
           *positions*, so prefill into a longer KV cache at any offset is exact) is handed to the kernel as a
           dynamic block-sparse mask: fully masked (bq, bkv) tiles (upper triangle, empty cache slots, other
           images' patches) are skipped. Decode (T == 1) runs the XLA reference: one query row per head is a
           matrix-vector product the kernel's 128-row tiles would waste. Off-TPU the kernel only runs in Pallas
           interpret mode (`PALLAS_INTERPRET` / `interpret=`), which is how the tests check it on CPU.
* "cudnn"  GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention) with the same mask
           passed as a boolean (B, 1, T, S) `mask`; GQA natively (K < N heads). Needs bf16/fp16 inputs and
           head_dim % 8 == 0, <= 128 (256 on Hopper).
* "auto"   per call, from static shapes/dtypes and `jax.default_backend()`: "pallas" on TPU for prefill with
           head_dim % 128 == 0; "cudnn" on GPU for prefill with bf16/fp16, head_dim % 8 == 0 and <= 128, even T
           and S; "xla" otherwise (CPU, decode, unsupported shapes).

Fully masked query rows (padding queries): "xla" and "cudnn" return the mean of v over all S keys (uniform softmax
over equal masked logits); "pallas" returns 0. Rows with at least one visible key agree across backends.

Axis legend: B batch, T query tokens, S key/value tokens, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import ATTENTION_IMPLS

NEG_INF = -2.3819763e38  # a large finite negative: fully masked rows stay NaN-free

# Run the Pallas kernels through the Pallas interpreter (CPU tests). Read at trace time; False on TPU.
PALLAS_INTERPRET = False
# Largest splash tile along T and along S (a multiple of 128); 512 is the usual sweet spot on v4/v5 TPUs.
PALLAS_MAX_BLOCK = 512
_LANES = 128  # splash tiles are multiples of 128 along both sequence axes


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(map(repr, ATTENTION_IMPLS))}; got {impl!r}")
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "xla",
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped-query attention with segment ids: the one attention of both towers (see the module docstring).

    `impl` in {"xla", "pallas", "cudnn", "auto"}; `interpret` (pallas only) overrides `PALLAS_INTERPRET`.
    """
    if causal and (q_positions is None or kv_positions is None):
        raise ValueError("causal attention needs q_positions and kv_positions")
    kind = resolve_impl(check_impl(impl), q, k, v)
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_positions=q_positions,
              kv_positions=kv_positions, scale=scale)
    if kind == "pallas":
        return pallas_attention(q, k, v, **kw, interpret=PALLAS_INTERPRET if interpret is None else interpret)
    if kind == "cudnn":
        return cudnn_attention(q, k, v, **kw)
    return xla_attention(q, k, v, **kw)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """The backend one call runs on ("xla" | "pallas" | "cudnn"), from static shapes/dtypes and the backend."""
    t, h = q.shape[1], q.shape[-1]
    backend = jax.default_backend()
    if impl == "xla":
        return "xla"
    if impl == "pallas":
        return "xla" if t == 1 else "pallas"  # decode: no kernel (see the module docstring)
    if impl == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs a GPU backend; jax.default_backend() is {backend!r} "
                             "(use 'xla', or 'auto' to pick per backend)")
        bad = _cudnn_unsupported(q, k, v, strict=False)
        if bad:
            raise ValueError(f"attention impl 'cudnn' cannot run this call: {bad} (use 'xla' or 'auto')")
        return "cudnn"
    # auto
    if t == 1:
        return "xla"
    if backend == "tpu" and h % 128 == 0:
        return "pallas"
    if backend == "gpu" and not _cudnn_unsupported(q, k, v, strict=True):
        return "cudnn"
    return "xla"


def _cudnn_unsupported(q: jax.Array, k: jax.Array, v: jax.Array, *, strict: bool) -> str:
    """Why cuDNN flash attention cannot take these inputs ('' if it can). `strict` (auto): also the limits that
    only bite in the backward pass or on pre-Hopper GPUs (even T and S with a mask, head_dim <= 128)."""
    dt = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dt) != 1 or dt.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"q, k, v must all be bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}"
    h = q.shape[-1]
    if h % 8 or h > (128 if strict else 256):
        return f"head_dim {h} must be a multiple of 8 and <= {128 if strict else 256}"
    if strict and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"T {q.shape[1]} and S {k.shape[1]} must be even"
    return ""


def segment_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions) -> jax.Array:
    """(B, T, S) bool: which keys each query sees (the rule in the module docstring)."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
    return mask


# XLA:CPU: prefill-sized attention runs in blocks whose fp32 logits stay within this many bytes (blocked_attention).
CPU_BLOCK_BYTES = 1 << 20


def xla_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
                  scale=None) -> jax.Array:
    """The reference. Logits and softmax in fp32; probabilities cast to v's dtype (as HF).

    On the CPU backend, calls with many queries (prefill, vision) run `blocked_attention`, the same math over
    cache-sized query chunks (3-4x faster there, BENCHMARKS.md "Attention on XLA:CPU").
    """
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_positions=q_positions,
              kv_positions=kv_positions, scale=scale)
    if q.shape[1] >= 32 and jax.default_backend() == "cpu":
        return blocked_attention(q, k, v, **kw)
    return dense_attention(q, k, v, **kw)


def dense_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
                    scale=None) -> jax.Array:
    """`xla_attention` in one block: (B, K, G, T, S) fp32 logits, masked softmax, probabilities @ v."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, h)
    with jax.named_scope("attention"):
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions)
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def blocked_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
                      scale=None, block_bytes: int | None = None) -> jax.Array:
    """`xla_attention`'s math as a loop (`lax.map`) over (batch row, KV head, query chunk) blocks, each a plain
    (cq * G, H) x (H, S) matrix product whose fp32 logits stay within `block_bytes` (default CPU_BLOCK_BYTES),
    in cache. The softmax is normalised after the PV product (the unnormalised probabilities, cast to v's dtype,
    times v, over their fp32 row sums). Rows are independent, so blocking changes no result beyond rounding.
    Differentiated, the blocks are rematerialised (`jax.checkpoint`), so the backward pass keeps no per-block
    logits or K/V copies (on the 2 x 512-token train benchmark: 17.05 -> 15.96 s per step, A/B)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    budget = CPU_BLOCK_BYTES if block_bytes is None else block_bytes
    cq = max(min(budget // (4 * g * s), t), min(16, t))
    nc = -(-t // cq)
    cq = -(-t // nc)  # balanced chunks: padding < nc rows
    pad = nc * cq - t
    q_segment_ids, kv_segment_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    qpos = jnp.asarray(q_positions) if causal else jnp.zeros((b, t), jnp.int32)  # (not read by a non-causal mask)
    kpos = jnp.asarray(kv_positions) if causal else jnp.zeros((b, s), jnp.int32)
    with jax.named_scope("attention_blocked"):
        qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
        qs = jnp.pad(qs, ((0, 0), (0, pad), (0, 0), (0, 0)))
        qs = qs.reshape(b, nc, cq, kh, g, h).transpose(0, 3, 1, 2, 4, 5).reshape(b * kh, nc, cq * g, h)
        qseg = jnp.pad(q_segment_ids, ((0, 0), (0, pad))).reshape(b, nc, cq)
        qpos = jnp.pad(qpos, ((0, 0), (0, pad))).reshape(b, nc, cq)
        kk = k.transpose(0, 2, 1, 3).reshape(b * kh, s, h)
        vv = v.transpose(0, 2, 1, 3).reshape(b * kh, s, h)

        def block(i):
            bk, c = i // nc, i % nc
            bi = bk // kh
            mask = segment_mask(qseg[bi, c][None], kv_segment_ids[bi][None], causal, qpos[bi, c][None],
                                kpos[bi][None])[0]  # (cq, S)
            logits = jnp.dot(qs[bk, c], kk[bk].T, preferred_element_type=jnp.float32).reshape(cq, g, s)
            logits = jnp.where(mask[:, None], logits, NEG_INF)
            m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
            p = jnp.exp(logits - m)
            denom = jnp.sum(p, axis=-1, keepdims=True)
            o = jnp.dot(p.astype(v.dtype).reshape(cq * g, s), vv[bk], preferred_element_type=jnp.float32)
            return o.reshape(cq, g, h) / denom

        # Under differentiation each block is recomputed in the backward pass instead of saving its logits,
        # probabilities and K/V slices per block (flash-attention style: the residuals are the loop inputs).
        block = jax.checkpoint(block, prevent_cse=False)
        out = jax.lax.map(block, jnp.arange(b * kh * nc, dtype=jnp.int32))  # (B*K*nc, cq, G, H)
        out = out.reshape(b, kh, nc, cq, g, h).transpose(0, 2, 3, 1, 4, 5).reshape(b, nc * cq, n, h)[:, :t]
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_args(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
               scale=None) -> dict:
    """Keyword arguments for `jax.nn.dot_product_attention` that reproduce the reference.

    The segment/padding/causal-by-position rule does not fit cuDNN's built-in masks (its causal mask is top-left
    aligned by index, its padding masks are right-padding lengths; ours is left padding and packed segments), so
    the exact rule goes in as a boolean (B, 1, T, S) `mask` (cuDNN turns it into an additive bias, broadcast over
    heads). q, k, v stay BTNH / BSKH: the API does GQA itself when K divides N.
    """
    mask = segment_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions)
    return dict(query=q, key=k, value=v, mask=mask[:, None], scale=q.shape[-1] ** -0.5 if scale is None else scale)


def cudnn_attention(q, k, v, *, implementation: str | None = "cudnn", **kw) -> jax.Array:
    """cuDNN flash attention via `jax.nn.dot_product_attention`; `implementation="xla"` runs the same call through
    JAX's XLA fallback (how the CPU tests check the argument construction)."""
    with jax.named_scope("attention_cudnn"):
        out = jax.nn.dot_product_attention(**cudnn_args(q, k, v, **kw), implementation=implementation)
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------- Pallas (TPU)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(n: int) -> tuple[int, int]:
    """(tile, padded length) for a sequence of n: pad to a multiple of 128, then the largest tile <=
    PALLAS_MAX_BLOCK (a multiple of 128) that divides it, so tiling never adds padding beyond 127."""
    padded = _round_up(n, _LANES)
    tile = max(_LANES, PALLAS_MAX_BLOCK // _LANES * _LANES)
    while padded % tile:
        tile -= _LANES
    return tile, padded


@functools.cache
def _splash():
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    return sa


def _splash_one(q, k, v, mask, *, block_sizes, interpret):
    """One batch element: q (N, Tp, H) pre-scaled, k/v (K, Sp, H), mask (1, Tp, Sp) bool -> (N, Tp, H)."""
    sa = _splash()
    kernel = sa.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    # jax 0.10 turns MaskInfo.is_dynamic_mask into an array under jit, and the kernel branches on it in Python
    # (only to pick a named_scope); restore the plain bool.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        info = getattr(kernel, name)
        if info is not None:
            setattr(kernel, name, info._replace(is_dynamic_mask=True))
    return kernel(q, k, v)


def pallas_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
                     scale=None, interpret: bool = False) -> jax.Array:
    """Splash attention (TPU Pallas) with the exact reference mask as a dynamic block-sparse mask.

    T and S are padded to the tile sizes (padded keys are masked out, padded query rows sliced off). Each
    batch element has its own mask, so the kernel runs once per batch element (vmap -> a loop; each call is
    parallel over heads and query tiles). Query rows that see no key attend padded slot 0 instead (a kernel
    tile row with no visible key would divide by zero) and are returned as 0, which keeps the backward pass
    finite. Off-TPU it needs `interpret=True`.
    """
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"attention impl 'pallas' runs the TPU splash kernel; jax.default_backend() is "
                         f"{jax.default_backend()!r}. Use 'xla'/'auto' here, or set "
                         "glm41v_jax.attention.PALLAS_INTERPRET = True to run it in the (slow) Pallas interpreter")
    sa = _splash()
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = h**-0.5 if scale is None else scale
    bq, tp = _block(t)
    bkv, sp = _block(s)
    mask = segment_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions)
    mask = jnp.pad(mask, ((0, 0), (0, tp - t), (0, sp - s)))
    seen = jnp.any(mask, axis=-1)  # (B, Tp)
    mask = mask | (~seen[:, :, None] & (jnp.arange(sp) == 0)[None, None, :])
    # The kernel has no softmax scale: fold it into q (in fp32, then back to q's dtype).
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = jnp.pad(qs, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, N, Tp, H)
    ks = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, K, Sp, H)
    vs = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3).astype(q.dtype)
    block_sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    one = functools.partial(_splash_one, block_sizes=block_sizes, interpret=interpret)
    with jax.named_scope("attention_splash"):
        out = jax.vmap(one)(qs, ks, vs, mask[:, None])  # (B, N, Tp, H)
    out = out.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where(seen[:, :t, None, None], out, 0).astype(q.dtype)
