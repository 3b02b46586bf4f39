"""The GLM-4.1V vision tower and projector.

What is special: patches arrive *packed* — every image and every video frame of a request, concatenated, in
2x2-merge-block-major order — with per-patch metadata (row, col, segment id, segment height/width). The learned
24x24 position table is resampled bicubically (A = -0.75, border clamp) to each segment's grid; the 2-D RoPE
rotates the whole head dim; attention is block-diagonal over segments (one per image/frame, 0 = padding).
The tail (post-norm, 2x2 downsample conv, merger with LayerNorm + exact GELU + SwiGLU) turns every 4 consecutive
patches into one LLM token.

Axis legend: P packed patches (a multiple of merge**2), Dv vision width, D LLM width, Nv heads, Hv head dim.

Attention layout (host-chosen, static shapes)
---------------------------------------------
The block-diagonal attention over S segments of lengths l_1..l_S (contiguous runs of the P packed rows; padding
rows at the end) runs in one of two layouts. Costs are in logits per head (query-key pairs).

* dense: one (P x P) masked attention with the segment ids as masks. Cost P**2.
* grouped (segment-major): one or two groups. Group g is an int32 table `attn_groups[g]` of shape (n_g, L_g):
  each row lists the packed rows of one or more whole segments (bin-packed, best-fit decreasing), -1 = empty slot.
  q/k/v are gathered to (n_g, L_g, Nv, Hv) and the one `attention` function runs with batch n_g and segment ids
  gathered the same way (0 for empty slots), so segments sharing a row stay block-diagonal; the outputs go back
  to (P, Nv, Hv) through `attn_inverse` (P,), the flat slot of each packed row (padding rows point one past the
  end and get 0). Cost
      grouped = sum_g [n_g * L_g**2 + ROW_COST * n_g * L_g + GROUP_COST] + ROW_COST * P
  (ROW_COST: the q/k/v/output gathers of a row; GROUP_COST: one more op per block).

Buckets (these bound the number of compiled programs): L_g is a power of two >= 16 and >= the longest segment in
the group; n_g is a power of two >= the group's row count after packing.

Rule (`plan_attention`, host side, from the segment lengths and P):
  1. one group: L = bucket(longest segment), all segments packed into rows of L;
  2. two groups: over the distinct length buckets, the split into "small" and "large" segments (each group with
     its own L and packing) of least cost; taken only if it costs < SPLIT_GAIN (0.6) x the one-group cost, since
     every extra group shape is an extra program to compile;
  3. grouped if its cost < P**2, else dense.
So a single image filling its patch bucket stays dense (L = P); 4 equal images cost 4 L**2 instead of (4 L)**2;
a video of t frames t L**2; one big image with many small ones a group for the big one and a packed group for the
small ones; many tiny segments a few densely packed rows.

A banded (chunked key window) layout is not offered: with static shapes its window must cover the longest segment,
so its cost is >= P * L_max >= sum_i l_i * L_max >= sum_i l_i**2, what the grouped layout reaches up to bucket
rounding; for equal segments it is >= P * (C + 2 L) against P * L for the grouped layout.

Compile keys: the layout lives in the `vision` dict as arrays (`attn_groups`: a tuple of (n_g, L_g) int32 arrays;
`attn_inverse`: (P,) int32), so the mode (the keys are absent for dense), G, n_g and L_g are part of the pytree
structure and shapes that every jit / AOT cache (programs.signature) keys on; nothing else needs to know. Single
images and batches of equal images add no program to the dense path's one per patch bucket; 500 requests of 1-6
images of random sizes (~490 distinct size lists) give ~46 layouts over 11 patch buckets (tests/test_vision_attention).

Backends: every group is one call of the one `attention` function with `impl=RuntimeConfig.attention_impl`. The
cost model is that of the materialised-logits paths ("xla", "cudnn" with its (B, 1, T, S) mask). The TPU splash
kernel ("pallas") already skips fully masked tiles of the dense layout, so there the grouped layout mainly saves
the (P x P) mask and the tile padding; the rule is the same for every backend.

Sharding: the tower's activations are one packed sequence (1, P, ...), unconstrained (the model puts no activation
constraints anywhere). The grouped q/k/v are (n_g, L_g, Nv, Hv), i.e. ("batch", "length", "heads", "head_dim") in
the logical-axis vocabulary of sharding.py, should they ever be constrained.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention
from .config import Glm4vConfig, VisionConfig
from .layers import Dense, GatedMLP, LayerNorm, RMSNorm, maybe_remat
from .rope import apply_rotate_half, interpolate_pos_embed, vision_cos_sin

SPLIT_GAIN = 0.6  # two groups only if they cost < SPLIT_GAIN x one group (each distinct shape is a compile)
ROW_COST = 4  # gathers of q, k, v and of the output, per row, in logit units
GROUP_COST = 64 * 64  # fixed cost of one more attention op per block, in logit units
MIN_LENGTH = 16
LAYOUTS = ("auto", "dense", "grouped")

# ---------------------------------------------------------------------------------------------------------------
# Host-side layout planning (NumPy).


def _pow2(n: int, minimum: int = 1) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def length_bucket(n: int) -> int:
    """Row length of a group: a power of two >= 16."""
    return _pow2(int(n), MIN_LENGTH)


def count_bucket(n: int) -> int:
    """Rows of a group: a power of two."""
    return _pow2(int(n), 1)


def _pack(lens: Sequence[int], members: Sequence[int], length: int) -> list[tuple[int, ...]]:
    """Best-fit-decreasing bin packing of whole segments into rows of `length`; rows list segments in order."""
    rem: list[tuple[int, int]] = []  # sorted (remaining capacity, row)
    rows: list[list[int]] = []
    for s in sorted(members, key=lambda s: (-lens[s], s)):
        i = bisect.bisect_left(rem, (lens[s], -1))
        if i < len(rem):
            r, row = rem.pop(i)
        else:
            r, row = length, len(rows)
            rows.append([])
        rows[row].append(s)
        bisect.insort(rem, (r - lens[s], row))
    return [tuple(sorted(r)) for r in rows]


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The chosen layout: `groups[g] = (n_g, L_g, rows)`, rows = segment indices per row (empty for dense)."""

    mode: str  # "dense" | "grouped"
    groups: tuple[tuple[int, int, tuple[tuple[int, ...], ...]], ...]
    dense_cost: int
    grouped_cost: int  # of the best grouped layout, whether chosen or not

    @property
    def shape_key(self) -> tuple:
        """What the compiled program depends on (besides P)."""
        return (self.mode, tuple((n, length) for n, length, _ in self.groups))


def _group(lens: list[int], members: list[int]) -> tuple[int, tuple]:
    length = length_bucket(max(lens[s] for s in members))
    rows = _pack(lens, members, length)
    n = count_bucket(len(rows))
    return n * length * length + ROW_COST * n * length + GROUP_COST, (n, length, tuple(rows))


def plan_attention(seg_lens: Sequence[int], total: int, mode: str = "auto") -> AttentionPlan:
    """Dense or grouped for segments of `seg_lens` (packed order) in `total` rows (rule: the module docstring)."""
    if mode not in LAYOUTS:
        raise ValueError(f"vision attention layout must be one of {', '.join(LAYOUTS)}; got {mode!r}")
    lens = [int(x) for x in seg_lens]
    dense_cost = int(total) ** 2
    if not lens or mode == "dense":
        return AttentionPlan("dense", (), dense_cost, -1)
    cost, one = _group(lens, list(range(len(lens))))
    best_cost, groups = cost, (one,)
    buckets = [length_bucket(x) for x in lens]
    for cut in sorted(set(buckets))[:-1]:  # small = buckets <= cut
        small = [s for s, b in enumerate(buckets) if b <= cut]
        large = [s for s, b in enumerate(buckets) if b > cut]
        (c1, g1), (c2, g2) = _group(lens, small), _group(lens, large)
        if c1 + c2 < SPLIT_GAIN * cost and c1 + c2 < best_cost:
            best_cost, groups = c1 + c2, (g1, g2)
    best_cost += ROW_COST * int(total)
    use = mode == "grouped" or best_cost < dense_cost
    return AttentionPlan("grouped" if use else "dense", groups if use else (), dense_cost, best_cost)


def attention_layout(seg_lens: Sequence[int], total: int, mode: str = "auto") -> dict[str, Any]:
    """The arrays of the chosen layout, for the `vision` dict: {} for dense, else `attn_groups` (tuple of int32
    (n_g, L_g): packed row, or -1) and `attn_inverse` (int32 (total,): flat slot of each row over the concatenated
    groups; padding rows get sum_g n_g * L_g, one past the end). Segments are the runs of `seg_lens` from row 0."""
    plan = plan_attention(seg_lens, total, mode)
    if plan.mode == "dense":
        return {}
    starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int64)
    n_slots = sum(n * length for n, length, _ in plan.groups)
    inverse = np.full((int(total),), n_slots, np.int32)
    tables = []
    offset = 0
    for n, length, rows in plan.groups:
        table = np.full((n, length), -1, np.int32)
        for r, segs in enumerate(rows):
            idx = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in segs])
            table[r, : len(idx)] = idx
            inverse[idx] = offset + r * length + np.arange(len(idx))
        tables.append(table)
        offset += n * length
    return {"attn_groups": tuple(tables), "attn_inverse": inverse}


# ---------------------------------------------------------------------------------------------------------------
# Device side.


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      groups: Sequence[jax.Array], inverse: jax.Array, **attn_kw) -> jax.Array:
    """Block-diagonal attention on (P, N, H) q/k/v, segment ids (P,), through the grouped layout -> (P, N, H)."""
    p, n, h = q.shape
    outs = []
    for idx in groups:  # (n_g, L_g) packed rows, -1 = empty
        safe = jnp.maximum(idx, 0)
        seg = jnp.where(idx >= 0, jnp.take(segment_ids, safe, axis=0), 0)  # several segments may share a row
        qg, kg, vg = (jnp.take(a, safe, axis=0) for a in (q, k, v))  # (n_g, L_g, N, H)
        o = attention(qg, kg, vg, q_segment_ids=seg, kv_segment_ids=seg, causal=False, **attn_kw)
        outs.append(o.reshape(-1, n, h))
    flat = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return jnp.take(flat, inverse, axis=0, mode="fill", fill_value=0)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"  # RuntimeConfig.attention_impl

    @nn.compact
    def __call__(self, x, cos, sin, layout):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"), use_bias=c.attention_bias,
                    name="qkv", **kw)(x)  # (B, P, 3, Nv, Hv)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rotate_half(q, cos, sin)
        k = apply_rotate_half(k, cos, sin)
        akw = dict(impl=self.attention_impl)
        seg = layout["segment_ids"]  # (P,)
        if "attn_groups" in layout:
            o = grouped_attention(q[0], k[0], v[0], seg, layout["attn_groups"], layout["attn_inverse"], **akw)
            o = o[None]
        else:
            o = attention(q, k, v, q_segment_ids=seg[None], kv_segment_ids=seg[None], causal=False, **akw)
        return Dense((c.hidden_size,), ("heads", "head_dim", "embed"), n_in=2, name="proj", **kw)(o)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, layout):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="norm1", **kw)(x)
        x = x + VisionAttention(c, name="attn", attention_impl=self.attention_impl, **kw)(h, cos, sin, layout)
        h = RMSNorm(c.rms_norm_eps, name="norm2", **kw)(x)
        x = x + GatedMLP(c.out_hidden_size, c.hidden_size, name="mlp", **kw)(h)
        return x, None


class VisionModel(nn.Module):
    """Packed patches (P, C*T*p*p) -> LLM tokens (P / merge**2, D).

    `attn_groups` / `attn_inverse` (from `attention_layout`, via model.pack_vision) select the grouped attention
    layout; without them the attention is one dense masked (P x P) block.
    """

    cfg: Glm4vConfig

    @nn.compact
    def __call__(self, pixel_values, hpos, wpos, segment_ids, seg_h, seg_w, attn_groups=None, attn_inverse=None):
        c = self.cfg.vision
        rt = self.cfg.runtime
        dtype, pdtype = jnp.dtype(rt.dtype), jnp.dtype(rt.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype, attention_impl=rt.attention_impl)
        with jax.named_scope("patch_embed"):
            x = Dense((c.hidden_size,), ("patch", "embed"), use_bias=True, name="patch_embed", dtype=dtype,
                      param_dtype=pdtype)(pixel_values)
            x = RMSNorm(c.rms_norm_eps, name="post_conv_layernorm", dtype=dtype, param_dtype=pdtype)(x)
            table = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("pos", "embed")),
                               (c.num_positions_side**2, c.hidden_size), pdtype)
            pos = interpolate_pos_embed(table, hpos, wpos, seg_h, seg_w)
            x = x + pos.astype(pdtype).astype(dtype)
        cos, sin = vision_cos_sin(hpos[None], wpos[None], c.head_dim, c.rope_theta)
        x = x[None]  # one packed sequence
        layout = {"segment_ids": segment_ids}
        if attn_groups:
            layout.update(attn_groups=tuple(attn_groups), attn_inverse=attn_inverse)
        block = maybe_remat(VisionBlock, rt.remat_policy)
        if rt.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                           metadata_params={nn.PARTITION_NAME: "layers"})(c, name="blocks", **kw)(x, cos, sin, layout)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"blocks_{i}", **kw)(x, cos, sin, layout)
        x = RMSNorm(c.rms_norm_eps, name="post_layernorm", dtype=dtype, param_dtype=pdtype)(x[0])
        with jax.named_scope("merger"):
            m2 = c.spatial_merge_size**2
            x = x.reshape(x.shape[0] // m2, m2 * c.hidden_size)  # 4 consecutive block-major patches, (a, b, d)
            x = Dense((c.out_hidden_size,), ("mlp", "embed"), use_bias=True, name="downsample", dtype=dtype,
                      param_dtype=pdtype)(x)
            x = _Merger(c, name="merger", dtype=dtype, param_dtype=pdtype)(x)
        return x


class _Merger(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense((c.out_hidden_size,), ("embed", "embed_out"), name="proj", **kw)(x)
        x = LayerNorm(1e-5, name="post_projection_norm", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        g = Dense((c.intermediate_size,), ("embed", "mlp"), name="gate", **kw)(x)
        u = Dense((c.intermediate_size,), ("embed", "mlp"), name="up", **kw)(x)
        return Dense((c.out_hidden_size,), ("mlp", "embed"), name="down", **kw)(jax.nn.silu(g) * u)
