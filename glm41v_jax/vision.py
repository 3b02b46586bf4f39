"""The GLM-4.1V vision tower and projector.

What is special: patches arrive *packed* — every image and every video frame of a request, concatenated, in
2x2-merge-block-major order — with per-patch metadata (row, col, segment id, segment height/width). The learned
24x24 position table is resampled bicubically (A = -0.75, border clamp) to each segment's grid; the 2-D RoPE
rotates the whole head dim; attention is block-diagonal over segments (one per image/frame, 0 = padding).
The tail (post-norm, 2x2 downsample conv, merger with LayerNorm + exact GELU + SwiGLU) turns every 4 consecutive
patches into one LLM token.

Axis legend: P packed patches (a multiple of merge**2), Dv vision width, D LLM width, Nv heads, Hv head dim.

Attention is block-diagonal over segments and runs in the plan the host chose (dense, or grouped: segment-major
rows gathered from the packed sequence; vision_plan.py has the rule and its costs): the plan's tables arrive in
`inputs.VisionInputs` (`attn_groups`, `attn_inverse`), so the plan is part of every compile key.

Sharding: the tower's activations are one packed sequence (1, P, ...), unconstrained (the model puts no activation
constraints anywhere). The grouped q/k/v are (n_g, L_g, Nv, Hv), i.e. ("batch", "length", "heads", "head_dim") in
the logical-axis vocabulary of sharding.py, should they ever be constrained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import attention
from .config import Glm4vConfig, VisionConfig
from .inputs import VisionInputs
from .layers import Dense, GatedMLP, LayerNorm, RMSNorm, maybe_remat
from .rope import apply_rotate_half, interpolate_pos_embed, vision_cos_sin


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      groups: Sequence[jax.Array], inverse: jax.Array, **attn_kw) -> jax.Array:
    """Block-diagonal attention on (P, N, H) q/k/v, segment ids (P,), through the grouped plan -> (P, N, H)."""
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
    quant: str = "none"  # RuntimeConfig.quant_of("vision")
    quant_group_size: int = 128
    lora: Any = None  # RuntimeConfig.lora (layers.Dense)

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, vision: VisionInputs) -> jax.Array:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant,
                  quant_group_size=self.quant_group_size, lora=self.lora)
        qkv = Dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"), use_bias=c.attention_bias,
                    name="qkv", **kw)(x)  # (B, P, 3, Nv, Hv)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rotate_half(q, cos, sin)
        k = apply_rotate_half(k, cos, sin)
        akw = dict(impl=self.attention_impl)
        seg = vision.segment_ids  # (P,)
        if vision.grouped:
            o = grouped_attention(q[0], k[0], v[0], seg, vision.attn_groups, vision.attn_inverse, **akw)
            o = o[None]
        else:
            o = attention(q, k, v, q_segment_ids=seg[None], kv_segment_ids=seg[None], causal=False, **akw)
        return Dense((c.hidden_size,), ("heads", "head_dim", "embed"), n_in=2, name="proj", **kw)(o)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    quant: str = "none"
    quant_group_size: int = 128
    lora: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, vision: VisionInputs) -> tuple[jax.Array, None]:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkw = dict(quant=self.quant, quant_group_size=self.quant_group_size, lora=self.lora)
        h = RMSNorm(c.rms_norm_eps, name="norm1", **kw)(x)
        x = x + VisionAttention(c, name="attn", attention_impl=self.attention_impl, **qkw, **kw)(h, cos, sin, vision)
        h = RMSNorm(c.rms_norm_eps, name="norm2", **kw)(x)
        x = x + GatedMLP(c.out_hidden_size, c.hidden_size, name="mlp", **qkw, **kw)(h)
        return x, None


class VisionModel(nn.Module):
    """Packed patches (P, C*T*p*p) -> LLM tokens (P / merge**2, D).

    A grouped attention plan in `vision` (`attn_groups` / `attn_inverse`) runs the attention per group of segments;
    the dense plan runs it as one masked (P x P) block.
    """

    cfg: Glm4vConfig

    @nn.compact
    def __call__(self, vision: VisionInputs) -> jax.Array:
        c = self.cfg.vision
        rt = self.cfg.runtime
        dtype, pdtype = jnp.dtype(rt.compute_dtype), jnp.dtype(rt.param_dtype)
        qkw = dict(quant=rt.quant_of("vision"), quant_group_size=rt.quant_group_size, lora=rt.lora)
        kw = dict(dtype=dtype, param_dtype=pdtype, attention_impl=rt.attention_impl, **qkw)
        with jax.named_scope("patch_embed"):  # float always (quant.py: small, and 1176 inputs are no int4 groups)
            x = Dense((c.hidden_size,), ("patch", "embed"), use_bias=True, name="patch_embed", dtype=dtype,
                      param_dtype=pdtype)(vision.pixel_values)
            x = RMSNorm(c.rms_norm_eps, name="post_conv_layernorm", dtype=dtype, param_dtype=pdtype)(x)
            table = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("pos", "embed")),
                               (c.num_positions_side**2, c.hidden_size), pdtype)
            pos = interpolate_pos_embed(table, vision.hpos, vision.wpos, vision.seg_h, vision.seg_w)
            x = x + pos.astype(pdtype).astype(dtype)
        cos, sin = vision_cos_sin(vision.hpos[None], vision.wpos[None], c.head_dim, c.rope_theta)
        x = x[None]  # one packed sequence
        masks = vision.replace(pixel_values=None)  # what attention reads: segment ids and the plan's tables
        block = maybe_remat(VisionBlock, rt.remat_policy)
        if rt.scan_layers:  # every argument after the carry is the same for all blocks
            x, _ = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=nn.broadcast,
                           length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})(c, name="blocks", **kw)(
                x, cos, sin, masks)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"blocks_{i}", **kw)(x, cos, sin, masks)
        x = RMSNorm(c.rms_norm_eps, name="post_layernorm", dtype=dtype, param_dtype=pdtype)(x[0])
        with jax.named_scope("merger"):
            m2 = c.spatial_merge_size**2
            x = x.reshape(x.shape[0] // m2, m2 * c.hidden_size)  # 4 consecutive block-major patches, (a, b, d)
            x = Dense((c.out_hidden_size,), ("mlp", "embed"), use_bias=True, name="downsample", dtype=dtype,
                      param_dtype=pdtype, **qkw)(x)
            x = _Merger(c, name="merger", dtype=dtype, param_dtype=pdtype, **qkw)(x)
        return x


class _Merger(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    quant: str = "none"
    quant_group_size: int = 128
    lora: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkw = dict(quant=self.quant, quant_group_size=self.quant_group_size, lora=self.lora, **kw)
        x = Dense((c.out_hidden_size,), ("embed", "embed_out"), name="proj", **qkw)(x)
        x = LayerNorm(1e-5, name="post_projection_norm", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        g = Dense((c.intermediate_size,), ("embed", "mlp"), name="gate", **qkw)(x)
        u = Dense((c.intermediate_size,), ("embed", "mlp"), name="up", **qkw)(x)
        return Dense((c.out_hidden_size,), ("mlp", "embed"), name="down", **qkw)(jax.nn.silu(g) * u)
