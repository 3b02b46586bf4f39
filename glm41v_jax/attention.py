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
           prefill (T > 1), text and vision alike. Self-attention (`kv_is_q`: training, prefill) and non-causal
           calls (vision) give the kernel its static CausalMask / FullMask plus `SegmentIds`: no (T, S) array.
           Causal calls into a longer KV cache (causal by *positions*, any offset) hand it the exact mask as a
           dynamic block-sparse mask, fully masked (bq, bkv) tiles skipped. The backward kernels run at the MXU's
           native precision whatever the global matmul precision. Decode (T == 1) runs the XLA reference: one
           query row per head is a matrix-vector product the kernel's 128-row tiles would waste. Off-TPU the
           kernel only runs in Pallas interpret mode (`PALLAS_INTERPRET` / `interpret=`), as the CPU tests run it.
* "cudnn"  GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention) with the same mask
           passed as a boolean (B, 1, T, S) `mask`; GQA natively (K < N heads). Needs bf16/fp16 inputs and
           head_dim % 8 == 0, <= 128 (256 on Hopper).
* "auto"   per call, from static shapes/dtypes and the *target platform* (`target_platform()`: the platform of
           the devices of the mesh the program is traced for, `jax.set_mesh`; `jax.default_backend()` only when no
           mesh is set): "pallas" on TPU for prefill with head_dim % 128 == 0; "cudnn" on GPU for prefill with
           bf16/fp16, head_dim % 8 == 0 and <= 128, even T and S; "xla" otherwise (CPU, decode, unsupported shapes).

Decode (T == 1) runs "xla" on every platform, by measurement: compiled for a v5e-8 (TPU compiler, BENCHMARKS.md
"TPU decode efficiency"), XLA's decode attention reads the KV cache once (HBM bytes at the cache-read minimum), so
no kernel can do better; JAX's paged/ragged decode kernels would also need a paged cache layout.

Meshes: the kernels ("pallas", "cudnn") are custom calls that GSPMD cannot partition, so on a mesh of more than
one device they run inside `jax.shard_map` (`shard_heads`): batch over the rules table's "batch" axes
(data, fsdp), query heads over its "heads" axis (tensor), each where the size divides (else that dimension is
whole on every shard). The KV heads follow the "kv_heads" rule; when they cannot be split that way (2 KV heads on
tensor=4 or 8: the table replicates them, as it does the KV cache and k/v projections), every shard holds all KV
heads and takes the slice its own query heads read (one KV head per shard for tensor a multiple of K). Chosen over
repeating the KV heads up to the tensor degree: the replicated KV is already on every shard, the slice costs no
communication and no copy of the cache, and each shard reads only the KV head it needs. The mesh comes from the
trace context (`jax.sharding.get_abstract_mesh()`, set by `jax.set_mesh(mesh)`; the Engine and the train step set
it when they compile), so the model code passes nothing.

Fully masked query rows (padding queries): "xla" and "cudnn" return the mean of v over all S keys (uniform softmax
over equal masked logits); "pallas" returns 0. Rows with at least one visible key agree across backends.

Axis legend: B batch, T query tokens, S key/value tokens, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from . import backend
from .backend import target_platform
from .config import ATTENTION_IMPLS
from .sharding import logical_to_spec

NEG_INF = -2.3819763e38  # a large finite negative: fully masked rows stay NaN-free

# Decode attention (T == 1, the XLA math) on a multi-device mesh runs per shard under shard_map, like the kernels.
# Left to GSPMD, the einsum over the KV cache (2 KV heads replicated over tensor=8) was partitioned along the cache
# and every layer all-gathered its K and V (plus a re-layout copy) each step (BENCHMARKS.md "TPU decode
# efficiency"). Per shard, each device reads its own rows and KV head in place.
SHARD_XLA_DECODE = True
# Run the Pallas kernels through the Pallas interpreter (CPU tests). Read at trace time; False on TPU.
PALLAS_INTERPRET = False
# Largest splash tile along T and along S (a multiple of 128); 512 is the usual sweet spot on v4/v5 TPUs.
PALLAS_MAX_BLOCK = 512
_LANES = 128  # splash tiles are multiples of 128 along both sequence axes


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(map(repr, ATTENTION_IMPLS))}; got {impl!r}")
    return impl


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The (abstract) mesh the program is being traced for (`jax.set_mesh`), or None when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


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
    kv_is_q: bool = False,
) -> jax.Array:
    """Grouped-query attention with segment ids: the one attention of both towers (see the module docstring).

    `impl` in {"xla", "pallas", "cudnn", "auto"}; `interpret` (pallas only) overrides `PALLAS_INTERPRET`. On a
    context mesh of several devices the kernels run under `shard_heads`. `kv_is_q` (causal calls): the keys are the
    queries' own tokens (T == S) and q_positions increase along T, so causal-by-position is causal-by-index; the
    splash kernel then takes the cheap static mask (module docstring, "pallas"). Non-causal calls need no promise.
    """
    if causal and (q_positions is None or kv_positions is None):
        raise ValueError("causal attention needs q_positions and kv_positions")
    platform = target_platform()
    kind = resolve_impl(check_impl(impl), q, k, v, platform)
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_positions=q_positions,
              kv_positions=kv_positions, scale=scale)
    mesh = current_mesh()
    sharded = mesh is not None and mesh.size > 1
    if kind == "pallas":
        fn = functools.partial(pallas_attention, interpret=PALLAS_INTERPRET if interpret is None else interpret,
                               static_mask=not causal or (kv_is_q and q.shape[1] == k.shape[1]))
    elif kind == "cudnn":
        fn = cudnn_attention
    elif sharded and q.shape[1] == 1 and SHARD_XLA_DECODE:
        fn = xla_attention  # decode on a mesh: per shard too (no KV-cache all-gather, see SHARD_XLA_DECODE)
    else:
        return xla_attention(q, k, v, **kw)
    if sharded:
        return shard_heads(fn, q, k, v, mesh=mesh, **kw)
    return fn(q, k, v, **kw)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, platform: str | None = None) -> str:
    """The backend one call runs on ("xla" | "pallas" | "cudnn"), from static shapes/dtypes and the platform
    (default: `target_platform()`)."""
    t, h = q.shape[1], q.shape[-1]
    platform = target_platform() if platform is None else platform
    if impl == "xla":
        return "xla"
    if impl == "pallas":
        return "xla" if t == 1 else "pallas"  # decode: no kernel (see the module docstring)
    if impl == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs a GPU; the program is compiled for {platform!r} "
                             "(use 'xla', or 'auto' to pick per platform)")
        bad = _cudnn_unsupported(q, k, v, strict=False)
        if bad:
            raise ValueError(f"attention impl 'cudnn' cannot run this call: {bad} (use 'xla' or 'auto')")
        return "cudnn"
    # auto
    if t == 1:
        return "xla"
    if platform == "tpu" and h % 128 == 0:
        return "pallas"
    if platform == "gpu" and not _cudnn_unsupported(q, k, v, strict=True):
        return "cudnn"
    return "xla"


def _shards(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def shard_heads(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array, *,
                mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None, q_segment_ids: jax.Array,
                kv_segment_ids: jax.Array, causal: bool, q_positions: jax.Array | None = None,
                kv_positions: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Run the attention `fn(q, k, v, **mask kwargs)` (a kernel GSPMD cannot partition) per device under
    `jax.shard_map` over `mesh` (default: the context mesh): batch over the "batch" rule's axes, query heads over
    the "heads" rule's axis, KV heads over the "kv_heads" rule's axis where that splits them in step with the
    query heads, else whole on every shard and sliced to the heads this shard's queries read (module docstring).
    """
    mesh = current_mesh() if mesh is None else mesh
    b, _, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    qspec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    kspec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    batch_ax, head_ax = qspec[0], qspec[2]
    hs = _shards(mesh, head_ax)
    n_loc = n // hs
    kv_ax = kspec[2] if head_ax is not None and kspec[2] == head_ax else None  # KV split in step with q, or whole
    select = head_ax is not None and kv_ax is None  # q heads split, KV heads whole: take this shard's KV heads
    if kv_ax is not None and (kh // hs) * g != n_loc:
        kv_ax, select = None, True
    # A batch the batch axes cannot split (the packed vision tower: one row of P patches), non-causal: split the
    # queries along T over those axes instead, each shard attending from its T/n queries to all S keys, so no
    # shard repeats another's work. (Causal calls keep T whole: the kernel's causal mask has a static offset.)
    len_ax = None
    if batch_ax is None and not causal:
        len_ax = logical_to_spec(("batch",), (q.shape[1],), mesh)[0]
    row = PartitionSpec(batch_ax, None)
    args = {"q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids}
    if q_positions is not None:
        args["q_positions"] = q_positions
    if kv_positions is not None:
        args["kv_positions"] = kv_positions
    arg_specs = {name: row for name in args}
    arg_specs["q_segment_ids"] = PartitionSpec(batch_ax, len_ax)
    out_spec = PartitionSpec(batch_ax, len_ax, head_ax, None)
    specs = (out_spec, PartitionSpec(batch_ax, None, kv_ax, None), PartitionSpec(batch_ax, None, kv_ax, None),
             arg_specs)

    def local(q, k, v, args):
        if select:
            first = jax.lax.axis_index(head_ax) * n_loc  # this shard's first query head
            if n_loc % g == 0:  # whole groups: n_loc // g consecutive KV heads
                k, v = (jax.lax.dynamic_slice_in_dim(x, first // g, n_loc // g, axis=2) for x in (k, v))
            elif g % n_loc == 0:  # part of one group: its one KV head
                k, v = (jax.lax.dynamic_slice_in_dim(x, first // g, 1, axis=2) for x in (k, v))
            else:  # groups straddle shards: one KV head per local query head
                idx = (first + jnp.arange(n_loc)) // g
                k, v = (jnp.take(x, idx, axis=2) for x in (k, v))
        return fn(q, k, v, causal=causal, scale=h**-0.5 if scale is None else scale, **args)

    with jax.named_scope("attention_shard_map"):
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(q, k, v, args)


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


def xla_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, q_positions=None, kv_positions=None,
                  scale=None) -> jax.Array:
    """The reference. Logits and softmax in fp32; probabilities cast to v's dtype (as HF).

    Where `backend.use_blocked_attention` says so (CPU, prefill and vision sizes), it runs `blocked_attention`,
    the same math over cache-sized query chunks.
    """
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_positions=q_positions,
              kv_positions=kv_positions, scale=scale)
    if backend.use_blocked_attention(q.shape[1]):
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
    (cq * G, H) x (H, S) matrix product whose fp32 logits stay within `block_bytes` (default
    `backend.ATTENTION_BLOCK_BYTES`), in cache. The softmax is normalised after the PV product (the unnormalised
    probabilities, cast to v's dtype, times v, over their fp32 row sums). Rows are independent, so blocking changes
    no result beyond rounding. Differentiated, the blocks are rematerialised (`jax.checkpoint`), so the backward
    pass keeps no per-block logits or K/V copies (which also makes the train step faster on CPU)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    budget = backend.ATTENTION_BLOCK_BYTES if block_bytes is None else block_bytes
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
    # The TPU splash-attention kernels: ~0.15 s of import that only attention_impl 'pallas' on a TPU program needs.
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
                     scale=None, interpret: bool = False, static_mask: bool = False) -> jax.Array:
    """Splash attention (TPU Pallas) with the exact reference mask.

    `static_mask` (non-causal calls, or causal self-attention whose positions increase along T: `attention`'s
    `kv_is_q`): the mask is the kernel's own static FullMask / CausalMask plus its `SegmentIds` (q and kv segment
    ids, padding 0), vmapped over the batch: no O(T x S) array exists anywhere, the causal upper triangle is
    skipped; tiles of two different segments are computed and masked in the kernel. Otherwise (causal by
    *positions* into a longer KV cache at a traced offset) the mask is built as a dynamic block-sparse mask: a
    (T, S) bool and int32 tile array per batch element, fully masked tiles skipped, and the kernel runs once per
    batch element.

    T and S are padded to the tile sizes (padded keys are masked out, padded query rows sliced off). Query rows
    that see no key (padding queries, segment 0) are returned as 0, which keeps the backward pass finite. Off-TPU
    it needs `interpret=True`.
    """
    if not interpret and target_platform() != "tpu":
        raise ValueError(f"attention impl 'pallas' runs the TPU splash kernel; the program is compiled for "
                         f"{target_platform()!r}. Use 'xla'/'auto' here, or set "
                         "glm41v_jax.attention.PALLAS_INTERPRET = True to run it in the (slow) Pallas interpreter")
    sa = _splash()
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = h**-0.5 if scale is None else scale
    bq, tp = _block(t)
    bkv, sp = _block(s)
    # The kernel has no softmax scale: fold it into q (in fp32, then back to q's dtype).
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = jnp.pad(qs, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, N, Tp, H)
    ks = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, K, Sp, H)
    vs = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3).astype(q.dtype)
    block_sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # A bf16 kernel multiplies at the MXU's native precision: a global "highest" matmul precision (fp32 contract
    # precision) on bf16 operands is refused by Mosaic ("Bad lhs type"), and means nothing for bf16 inputs. The
    # backward kernels are traced later (at transpose time), so the precision wraps both passes (`_native_precision`).
    low = jnp.dtype(q.dtype).itemsize < 4
    wrap = _native_precision if low else (lambda f: f)
    with jax.named_scope("attention_splash"):
        if static_mask:
            kernel = _static_kernel(causal, tp, sp, n, block_sizes, interpret)
            seg = sa.SegmentIds(q=jnp.pad(q_segment_ids, ((0, 0), (0, tp - t))).astype(jnp.int32),
                                kv=jnp.pad(kv_segment_ids, ((0, 0), (0, sp - s))).astype(jnp.int32))
            out = wrap(lambda q, k, v, seg: jax.vmap(kernel)(q, k, v, segment_ids=seg))(qs, ks, vs, seg)
            seen = _has_key(q_segment_ids, kv_segment_ids)
        else:
            mask = segment_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions)
            mask = jnp.pad(mask, ((0, 0), (0, tp - t), (0, sp - s)))
            seen = jnp.any(mask, axis=-1)[:, :t]  # (B, T)
            mask = mask | (~jnp.any(mask, axis=-1)[:, :, None] & (jnp.arange(sp) == 0)[None, None, :])
            one = functools.partial(_splash_one, block_sizes=block_sizes, interpret=interpret)
            out = wrap(jax.vmap(one))(qs, ks, vs, mask[:, None])  # (B, N, Tp, H)
    out = out.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where(seen[:, :, None, None], out, 0).astype(q.dtype)


def _native_precision(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` traced at the default matmul precision in its forward and in its backward pass (a custom_vjp whose
    backward runs the vjp under the same setting), whatever the caller's global `jax_default_matmul_precision`."""

    @jax.custom_vjp
    def call(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)

    def bwd(vjp, g):
        with jax.default_matmul_precision("default"):
            return vjp(g)

    call.defvjp(fwd, bwd)
    return call


def _has_key(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """(B, T) whether each query's segment (non-zero) occurs among the keys: a sorted search, O((T + S) log S)."""
    kv = jnp.sort(kv_segment_ids, axis=-1)
    at = jax.vmap(jnp.searchsorted)(kv, q_segment_ids)
    found = jnp.take_along_axis(kv, jnp.minimum(at, kv.shape[-1] - 1), axis=-1) == q_segment_ids
    return found & (q_segment_ids != 0)


def _static_kernel(causal: bool, tp: int, sp: int, heads: int, block_sizes, interpret: bool):
    """The splash kernel of a static (Tp, Sp) causal or full mask for `heads` query heads (built per trace: the
    kernel holds arrays of the trace it was made in; splash caches the mask's block tables itself)."""
    sa = _splash()
    one = sa.CausalMask((tp, sp)) if causal else sa.FullMask((tp, sp))
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=block_sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)
