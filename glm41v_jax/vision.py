"""The GLM-4.1V vision tower and projector.

What is special: patches arrive *packed* — every image and every video frame of a request, concatenated, in
2x2-merge-block-major order — with per-patch metadata (row, col, segment id, segment height/width). The learned
24x24 position table is resampled bicubically (A = -0.75, border clamp) to each segment's grid; the 2-D RoPE
rotates the whole head dim; attention is block-diagonal over segments (one per image/frame, 0 = padding).
The tail (post-norm, 2x2 downsample conv, merger with LayerNorm + exact GELU + SwiGLU) turns every 4 consecutive
patches into one LLM token.

Axis legend: P packed patches (a multiple of merge**2), Dv vision width, D LLM width, Nv heads, Hv head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import Glm4vConfig, VisionConfig
from .layers import Dense, GatedMLP, LayerNorm, RMSNorm, attention, maybe_remat
from .rope import apply_rotate_half, interpolate_pos_embed, vision_cos_sin


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, seg):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"), use_bias=c.attention_bias,
                    name="qkv", **kw)(x)  # (B, P, 3, Nv, Hv)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rotate_half(q, cos, sin)
        k = apply_rotate_half(k, cos, sin)
        o = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False)
        return Dense((c.hidden_size,), ("heads", "head_dim", "embed"), n_in=2, name="proj", **kw)(o)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, seg):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="norm1", **kw)(x)
        x = x + VisionAttention(c, name="attn", **kw)(h, cos, sin, seg)
        h = RMSNorm(c.rms_norm_eps, name="norm2", **kw)(x)
        x = x + GatedMLP(c.out_hidden_size, c.hidden_size, name="mlp", **kw)(h)
        return x, None


class VisionModel(nn.Module):
    """Packed patches (P, C*T*p*p) -> LLM tokens (P / merge**2, D)."""

    cfg: Glm4vConfig

    @nn.compact
    def __call__(self, pixel_values, hpos, wpos, segment_ids, seg_h, seg_w):
        c = self.cfg.vision
        rt = self.cfg.runtime
        dtype, pdtype = jnp.dtype(rt.dtype), jnp.dtype(rt.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        with jax.named_scope("patch_embed"):
            x = Dense((c.hidden_size,), ("patch", "embed"), use_bias=True, name="patch_embed", **kw)(pixel_values)
            x = RMSNorm(c.rms_norm_eps, name="post_conv_layernorm", **kw)(x)
            table = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("pos", "embed")),
                               (c.num_positions_side**2, c.hidden_size), pdtype)
            pos = interpolate_pos_embed(table, hpos, wpos, seg_h, seg_w)
            x = x + pos.astype(pdtype).astype(dtype)
        cos, sin = vision_cos_sin(hpos[None], wpos[None], c.head_dim, c.rope_theta)
        x, seg = x[None], segment_ids[None]  # one packed sequence
        block = maybe_remat(VisionBlock, rt.remat_policy)
        if rt.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                           metadata_params={nn.PARTITION_NAME: "layers"})(c, name="blocks", **kw)(x, cos, sin, seg)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"blocks_{i}", **kw)(x, cos, sin, seg)
        x = RMSNorm(c.rms_norm_eps, name="post_layernorm", **kw)(x[0])
        with jax.named_scope("merger"):
            m2 = c.spatial_merge_size**2
            x = x.reshape(x.shape[0] // m2, m2 * c.hidden_size)  # 4 consecutive block-major patches, (a, b, d)
            x = Dense((c.out_hidden_size,), ("mlp", "embed"), use_bias=True, name="downsample", **kw)(x)
            x = _Merger(c, name="merger", **kw)(x)
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
