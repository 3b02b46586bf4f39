"""Rotary embeddings and the bicubic position-table resampling (device code).

Two RoPEs, deliberately different (docs/MODEL.md §3.4, §4.3):
  * vision: 2-D axial, rotate-half (NeoX) over the whole head dim, angles [row*f, col*f] repeated twice, in fp32;
  * text: 3-D M-RoPE, *interleaved pairs* (2j, 2j+1) over the first `rotary_dim` dims only; frequency j reads
    position row t, h or w according to `mrope_section`; cos/sin cast to the activation dtype.
The positions themselves are host data: `inputs.get_rope_index` (the prompt's (3, B, S) text positions and decode
offsets) and `inputs.vision_patch_positions` (each patch's row and column).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Text M-RoPE (device).


def mrope_cos_sin(positions: jax.Array, head_dim: int, rotary_dim: int, theta: float,
                  mrope_section: Sequence[int], dtype) -> tuple[jax.Array, jax.Array]:
    """positions (3, B, T) int -> cos, sin (B, T, rotary_dim/2) in `dtype`."""
    del head_dim
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))  # (half,)
    axis = np.repeat(np.arange(3), np.asarray(mrope_section))  # (half,) which position row each frequency reads
    assert axis.shape[0] == half, (mrope_section, rotary_dim)
    pos = positions.astype(jnp.float32)  # (3, B, T)
    pos_per_freq = jnp.moveaxis(pos[axis], 0, -1)  # (B, T, half)
    ang = pos_per_freq * jnp.asarray(inv_freq)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def apply_mrope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, H); rotate interleaved pairs of the first 2*cos.shape[-1] dims; the rest pass through."""
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    out = jnp.stack([o1, o2], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out, xp], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Vision 2-D RoPE (device).


def vision_cos_sin(hpos: jax.Array, wpos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Patch rows/cols (..., P) -> cos, sin (..., P, head_dim) in fp32."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))  # (head_dim/4,)
    fh = hpos.astype(jnp.float32)[..., None] * inv_freq
    fw = wpos.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([fh, fw, fh, fw], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, P, N, H), cos/sin (B, P, H): NeoX rotate-half in fp32, cast back."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Bicubic resampling of the learned position table (device).

_A = -0.75  # PyTorch's bicubic coefficient (not the Keys a = -0.5 of jax.image.resize)


def _cubic_weights(t: jax.Array) -> jax.Array:
    """t in [0, 1) -> the 4 tap weights for taps floor-1 .. floor+2 (PyTorch upsample_bicubic2d)."""

    def c1(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def c2(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return jnp.stack([c2(t + 1), c1(t), c1(1 - t), c2(2 - t)], axis=-1)


def bicubic_matrix(coord: jax.Array, size: jax.Array, table_side: int) -> jax.Array:
    """Per-patch interpolation rows over one table axis.

    coord (P,) patch row (or col) in a segment of `size` (P,) patches; returns (P, table_side) weights of the
    align_corners=False, border-clamped bicubic sample at source coordinate (coord + 0.5) * side / size - 0.5.
    """
    src = (coord.astype(jnp.float32) + 0.5) * table_side / jnp.maximum(size.astype(jnp.float32), 1.0) - 0.5
    f = jnp.floor(src)
    w = _cubic_weights(src - f)  # (P, 4)
    taps = jnp.clip(f.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :], 0, table_side - 1)  # (P, 4)
    onehot = jax.nn.one_hot(taps, table_side, dtype=jnp.float32)  # (P, 4, side)
    return jnp.einsum("pk,pks->ps", w, onehot, precision=jax.lax.Precision.HIGHEST)


def interpolate_pos_embed(table: jax.Array, hpos: jax.Array, wpos: jax.Array, seg_h: jax.Array, seg_w: jax.Array
                          ) -> jax.Array:
    """Resample the (side*side, D) table at each patch (fp32, exact like F.grid_sample bicubic/border)."""
    side = int(round(table.shape[0] ** 0.5))
    ry = bicubic_matrix(hpos, seg_h, side)  # (P, side)
    rx = bicubic_matrix(wpos, seg_w, side)
    wmat = (ry[:, :, None] * rx[:, None, :]).reshape(ry.shape[0], side * side)
    return jnp.dot(wmat, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
