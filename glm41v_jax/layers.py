"""Shared building blocks: the one dense layer, norms and remat policies (+ the attention entry point, re-exported).

Every weight is declared here (shape, dtype, logical axes, init) and nowhere else, so quantized kernels, LoRA
adapters or fused attention kernels slot in at one place each.

Axis legend: B batch, T query tokens, S key/value tokens, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import backend
from .attention import NEG_INF, attention  # noqa: F401  (re-exported: the one attention lives in attention.py)
from .config import KERNEL_LAYOUTS

Dtype = Any


def _init(scale_fan_in: int):
    std = 1.0 / np.sqrt(max(scale_fan_in, 1))
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """x[..., *in] . kernel (+ bias[*out]). The only matmul-with-weights in the model.

    `features` is the output shape (e.g. (N, H) for a q projection); `n_in` is how many trailing input axes are
    contracted (2 for an o projection over (N, H)); `axes` names the kernel axes, in axes then out axes.

    `kernel_layout` is how the kernel is stored (`RuntimeConfig.kernel_layout`): "in_out" = (*in, *out), the checkpoint
    and training layout; "out_in" = (*out, *in), contracted as W . x^T (then the output transposed), the Engine's
    decode layout on CPU, where XLA:CPU streams it at the memory bandwidth at small batch and x . W does not
    (`backend.BACKEND_TUNING`); x . W^T instead would copy the kernel before every matmul.
    `model.to_kernel_layout` converts a params tree between the two.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of kernel axes: in axes then out axes
    n_in: int = 1
    use_bias: bool = False
    kernel_layout: str = "in_out"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in:]
        n_out = len(self.features)
        assert len(self.axes) == self.n_in + n_out, (self.name, self.axes, in_shape, self.features)
        assert self.kernel_layout in KERNEL_LAYOUTS, (self.name, self.kernel_layout)
        out_in = self.kernel_layout == "out_in"
        kshape = (*self.features, *in_shape) if out_in else (*in_shape, *self.features)
        axes = (*self.axes[self.n_in:], *self.axes[:self.n_in]) if out_in else self.axes
        kernel = self.param("kernel", nn.with_logical_partitioning(_init(int(np.prod(in_shape))), axes),
                            kshape, self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        nd = x.ndim
        x_in = tuple(range(nd - self.n_in, nd))
        if not out_in:
            y = jax.lax.dot_general(x, kernel, ((x_in, tuple(range(self.n_in))), ((), ())))
        else:
            k_in = tuple(range(n_out, n_out + self.n_in))
            y = jax.lax.dot_general(kernel, x, ((k_in, x_in), ((), ())))  # (*out, *rows)
            y = jnp.moveaxis(y, tuple(range(n_out)), tuple(range(nd - self.n_in, nd - self.n_in + n_out)))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """w * cast_back(x_fp32 * rsqrt(mean(x_fp32^2) + eps)): normalise in fp32, cast, then scale (as HF)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm computed in fp32 (the patch merger's post_projection_norm)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `fused` keeps gate and up in one (D, 2, F) kernel (the text decoder's layout)."""

    hidden: int
    out: int
    fused: bool = False
    kernel_layout: str = "in_out"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_layout=self.kernel_layout)
        if self.fused:
            gu = Dense((2, self.hidden), ("embed", None, "mlp"), name="gate_up", **kw)(x)
            gate, up = gu[..., 0, :], gu[..., 1, :]
        else:
            gate = Dense((self.hidden,), ("embed", "mlp"), name="gate", **kw)(x)
            up = Dense((self.hidden,), ("embed", "mlp"), name="up", **kw)(x)
        y = jax.nn.silu(gate) * up
        return Dense((self.out,), ("mlp", "embed"), name="down", **kw)(y)


def remat_policy(name: str):
    """Named jax.checkpoint policies for nn.remat: none | full | dots | dots_no_batch."""
    cp = jax.checkpoint_policies
    table = {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
        "everything": cp.everything_saveable,
    }
    if name not in table:
        raise ValueError(f"remat_policy must be one of none, {', '.join(table)}; got {name!r}")
    return table[name]


def maybe_remat(block: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()) -> type[nn.Module]:
    if policy == "none":
        return block
    return nn.remat(block, policy=remat_policy(policy), prevent_cse=True, static_argnums=tuple(static_argnums))


class Embed(nn.Module):
    """Token embedding table (V, D); `attend` is the tied-output projection."""

    num: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                              ("vocab", "embed")),
                                    (self.num, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., V); the (V, D) table is already "out_in": a few rows (decode) are contracted as
        Dense contracts that, more rows as x . E^T (`backend.embed_attend_rows_first`)."""
        x, w = x.astype(self.dtype), self.embedding.astype(self.dtype)
        if backend.embed_attend_rows_first(int(np.prod(x.shape[:-1]))):
            return jnp.moveaxis(jax.lax.dot_general(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
