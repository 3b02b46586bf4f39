"""Shared building blocks: the one dense layer, norms and remat policies (+ the attention entry point, re-exported).

Every weight is declared here (shape, dtype, logical axes, init) and nowhere else, so quantized kernels, LoRA
adapters or fused attention kernels slot in at one place each.

Axis legend: B batch, T query tokens, S key/value tokens, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import backend
from .attention import NEG_INF, attention  # noqa: F401  (re-exported: the one attention lives in attention.py)
from .config import KERNEL_LAYOUTS
from .errors import Glm41vError

Dtype = Any


def _init(scale_fan_in: int):
    std = 1.0 / np.sqrt(max(scale_fan_in, 1))
    return nn.initializers.normal(stddev=std)


# Weight-only quantization (quant.py has the schemes and the host quantizer; the math lives here because Dense
# reads it and quant.py imports the model): the largest code of each scheme and the dtype the codes are stored in.
QUANT_QMAX = {"int8": 127, "int4": 7}
QUANT_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}


class QuantError(Glm41vError, ValueError):
    """A layer that cannot be quantized as asked (e.g. int4 with an input width that is not a multiple of the group
    size); the message names the layer and the sizes."""


def quant_shapes(kshape: tuple[int, ...], axes: tuple[str | None, ...], n_in: int, n_lead: int, kernel_layout: str,
                 scheme: str, group_size: int, where: str = "kernel"
                 ) -> tuple[tuple[int, ...], tuple[str | None, ...], tuple[int, ...], tuple[str | None, ...]]:
    """(codes shape, codes logical axes, scale shape, scale logical axes) of a float kernel `kshape` with logical
    `axes` (its own storage order), `n_lead` leading batch axes (the scan's "layers") then in/out axes.

    int8: the codes keep the kernel's shape and axes; the scale drops the input axes. int4: the last input axis I
    becomes (I/g, g), named (its name, None); the scale drops the g axis. QuantError when g does not divide I."""
    nd = len(kshape)
    in_pos = tuple(range(n_lead, n_lead + n_in)) if kernel_layout == "in_out" else tuple(range(nd - n_in, nd))
    if scheme == "int8":
        keep = [i for i in range(nd) if i not in in_pos]
        return kshape, axes, tuple(kshape[i] for i in keep), tuple(axes[i] for i in keep)
    last, size = in_pos[-1], kshape[in_pos[-1]]
    if size % group_size:
        raise QuantError(f"{where}: int4 groups of {group_size} along an input axis of {size}: {size} is not a "
                         f"multiple of {group_size} (choose a quant_group_size that divides it)")
    codes = (*kshape[:last], size // group_size, group_size, *kshape[last + 1:])
    caxes = (*axes[:last], axes[last], None, *axes[last + 1:])
    return codes, caxes, (*kshape[:last], size // group_size, *kshape[last + 1:]), axes[:last + 1] + axes[last + 1:]


def _quant_init(scheme: str):
    q = QUANT_QMAX[scheme]
    return lambda key, shape, dtype: jax.random.randint(key, shape, -q, q + 1, jnp.int32).astype(dtype)


def _scale_init(fan_in: int, scheme: str):
    s = np.float32(np.sqrt(3.0 / max(fan_in, 1)) / QUANT_QMAX[scheme])  # codes uniform in [-q, q]: std 1/sqrt(fan_in)
    return lambda key, shape, dtype: jnp.full(shape, s, dtype)


def dynamic_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (..., *in) float -> (int8 codes, fp32 scale (..., 1...)): symmetric per row over the trailing axes given
    by the caller's flattening (x is (rows, I) here); an all-zero row gets scale 0 and codes 0."""
    xf = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    q = jnp.clip(jnp.round(xf / jnp.where(s == 0, 1.0, s)), -127, 127).astype(jnp.int8)
    return q, s


LORA_LAYER_INDEX = re.compile(r"(layers|blocks)_\d+")


def lora_site(path: Sequence[str]) -> str:
    """A Dense layer's module path -> its LoRA site: the path with the layer index dropped ("layers_3" and the
    scanned "layers" both give "layers"), joined by "/" (e.g. "language_model/layers/self_attn/q_proj")."""
    return "/".join(m.group(1) if (m := LORA_LAYER_INDEX.fullmatch(p)) else p for p in path)


def _lora_a_init(fan_in: int):
    """PEFT's default for lora_A (torch's kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


INT8_DOT_MIN_ROWS = 4  # quant_matmul "int8_dot": fewer rows are zero-padded to this many (XLA:CPU's int8 GEMV is slow)
# quant_matmul_int4 "int8_dot" / "grouped" run up to this many rows; more run "dequant" (backend.BACKEND_TUNING: on
# XLA:CPU the grouped dot's per-group partial sums cost more than the dequantized kernel from ~16 rows, 320 measured;
# on TPU the grouped dot's contraction is one group (128) wide, half a v6e MXU's 256, so large prefill chunks run the
# dequantized kernel at full MXU width instead).
INT4_GROUPED_MAX_ROWS = {"int8_dot": 16, "grouped": 512}


class Dense(nn.Module):
    """x[..., *in] . kernel (+ bias[*out]). The only matmul-with-weights in the model.

    `features` is the output shape (e.g. (N, H) for a q projection); `n_in` is how many trailing input axes are
    contracted (2 for an o projection over (N, H)); `axes` names the kernel axes, in axes then out axes.

    `kernel_layout` is how the kernel is stored (`RuntimeConfig.kernel_layout`): "in_out" = (*in, *out), the checkpoint
    and training layout; "out_in" = (*out, *in), contracted as W . x^T (then the output transposed), the Engine's
    decode layout on CPU, where XLA:CPU streams it at the memory bandwidth at small batch and x . W does not
    (`backend.BACKEND_TUNING`); x . W^T instead would copy the kernel before every matmul.
    `model.to_kernel_layout` converts a params tree between the two.

    `quant` ("none" | "int8" | "int4", quant.py): the params are `kernel` = the integer codes and `scale` (fp32)
    instead of a float kernel (`quant_shapes`); the bias stays float. The activations stay in `dtype`. The matmul
    (`backend_default(platform, "quant_matmul")` for int8, `"quant_matmul_int4"` for int4): "dequant" = int8:
    dot(x, codes.astype(dtype)) * scale (the per-output scale factors out of the dot); int4: the codes times their
    group scales, then the float dot. "int8_dot" (XLA:CPU, where the dequantized kernel is materialised and read at
    fp32 width): the activation rows quantized to int8 on the fly (per-row scale), an int8 x int8 -> int32 dot,
    times both scales; for int4 codes (values in [-7, 7], held as int8 on CPU) the dot is batched over the groups
    (one int32 partial sum per group, row and output), each times its group's scale, summed over groups in fp32.
    "grouped" (int4 on TPU): that grouped dot with float activations (the codes converted inside the dot, read
    packed). The grouped forms run up to `INT4_GROUPED_MAX_ROWS[form]` rows, "dequant" above.

    `lora` (a resolved `config.LoraConfig`, glm41v_jax/lora.py): when this layer's `lora_site` is one of its
    `sites`, y += (dropout(x) . A) . B * alpha / rank, with A = `lora_a` (*in, r) and B = `lora_b` (r, *out) in the
    "lora" variable collection (float32, logical axes: the kernel's in axes + None, None + its out axes; the same
    in both kernel layouts), on top of the float or quantized base (QLoRA). A starts as PEFT's (uniform, bound
    1/sqrt(fan_in)), B at zero, so a fresh adapter leaves the output unchanged. Dropout runs only when the apply
    is given a "dropout" rng (training).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of kernel axes: in axes then out axes
    n_in: int = 1
    use_bias: bool = False
    kernel_layout: str = "in_out"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"  # RuntimeConfig.quantize, where this layer is quantized (see quant.py)
    quant_group_size: int = 128
    lora: Any = None  # RuntimeConfig.lora (resolved): adapters here when lora_site(self.path) is one of its sites

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in:]
        n_out = len(self.features)
        assert len(self.axes) == self.n_in + n_out, (self.name, self.axes, in_shape, self.features)
        assert self.kernel_layout in KERNEL_LAYOUTS, (self.name, self.kernel_layout)
        out_in = self.kernel_layout == "out_in"
        kshape = (*self.features, *in_shape) if out_in else (*in_shape, *self.features)
        axes = (*self.axes[self.n_in:], *self.axes[:self.n_in]) if out_in else self.axes
        fan_in = int(np.prod(in_shape))
        x = x.astype(self.dtype)
        if self.quant == "none":
            kernel = self.param("kernel", nn.with_logical_partitioning(_init(fan_in), axes), kshape, self.param_dtype)
            y = self._dot(x, kernel.astype(self.dtype))
        elif self.quant in QUANT_QMAX:
            cshape, caxes, sshape, saxes = quant_shapes(kshape, axes, self.n_in, 0, self.kernel_layout, self.quant,
                                                        self.quant_group_size, where=self.name or "Dense")
            codes = self.param("kernel", nn.with_logical_partitioning(_quant_init(self.quant), caxes), cshape,
                               QUANT_DTYPES[self.quant])
            scale = self.param("scale", nn.with_logical_partitioning(_scale_init(fan_in, self.quant), saxes), sshape,
                               jnp.float32)
            how = backend.backend_default(backend.target_platform(),
                                          "quant_matmul" if self.quant == "int8" else "quant_matmul_int4")
            if self.quant == "int8" and how == "int8_dot":
                y = self._int8_dot(x, codes, scale)
            elif self.quant == "int4" and how in INT4_GROUPED_MAX_ROWS \
                    and int(np.prod(x.shape[:-self.n_in])) <= INT4_GROUPED_MAX_ROWS[how]:
                y = self._int4_grouped_dot(x, codes, scale, int8_rows=how == "int8_dot")
            elif self.quant == "int8":
                y = self._dot(x, codes.astype(self.dtype)) * scale.astype(self.dtype)  # (..., *out) * (*out)
            else:
                g_axis = len(sshape) if out_in else len(sshape) - n_out  # where the codes have the group axis
                w = codes.astype(jnp.float32) * jnp.expand_dims(scale, g_axis)
                y = self._dot(x, w.reshape(kshape).astype(self.dtype))
        else:
            raise QuantError(f"{self.name}: quant must be one of 'none', 'int8', 'int4'; got {self.quant!r}")
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and lora_site(self.path) in self.lora.sites:
            y = y + self._lora(x, in_shape, fan_in)
        return y

    def _lora(self, x: jax.Array, in_shape: tuple[int, ...], fan_in: int) -> jax.Array:
        """(dropout(x) . A) . B * alpha / rank, in the compute dtype, from float32 adapters."""
        r, n_out = self.lora.rank, len(self.features)
        a = self.variable("lora", "lora_a", lambda: nn.LogicallyPartitioned(
            _lora_a_init(fan_in)(self.make_rng("params"), (*in_shape, r), jnp.float32), (*self.axes[:self.n_in], None)))
        b = self.variable("lora", "lora_b", lambda: nn.LogicallyPartitioned(
            jnp.zeros((r, *self.features), jnp.float32), (None, *self.axes[self.n_in:])))
        if self.lora.dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(x.dtype)
        nd = x.ndim
        xa = jax.lax.dot_general(x, a.value.astype(self.dtype),
                                 ((tuple(range(nd - self.n_in, nd)), tuple(range(self.n_in))), ((), ())))
        y = jax.lax.dot_general(xa, b.value.astype(self.dtype), (((xa.ndim - 1,), (0,)), ((), ())))
        assert y.shape[-n_out:] == tuple(self.features), (self.name, y.shape)
        return y * jnp.asarray(self.lora.scale, self.dtype)

    def _dot(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x (..., *in) . kernel in this layer's layout -> (..., *out)."""
        n_out, nd = len(self.features), x.ndim
        x_in = tuple(range(nd - self.n_in, nd))
        if self.kernel_layout == "in_out":
            return jax.lax.dot_general(x, kernel, ((x_in, tuple(range(self.n_in))), ((), ())),
                                       preferred_element_type=None if kernel.dtype != jnp.int8 else jnp.int32)
        k_in = tuple(range(n_out, n_out + self.n_in))
        y = jax.lax.dot_general(kernel, x, ((k_in, x_in), ((), ())),
                                preferred_element_type=None if kernel.dtype != jnp.int8 else jnp.int32)  # (*out, *rows)
        return jnp.moveaxis(y, tuple(range(n_out)), tuple(range(nd - self.n_in, nd - self.n_in + n_out)))

    def _int8_dot(self, x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
        """The "int8_dot" matmul: rows of x quantized per row to int8, int32 accumulation, both scales applied."""
        lead, in_shape = x.shape[:-self.n_in], x.shape[-self.n_in:]
        rows = int(np.prod(lead))
        x2 = x.reshape(rows, int(np.prod(in_shape)))
        pad = max(INT8_DOT_MIN_ROWS - rows, 0)
        if pad:
            x2 = jnp.pad(x2, ((0, pad), (0, 0)))
        xq, xs = dynamic_int8(x2)
        acc = self._dot(xq.reshape(rows + pad, *in_shape), codes)  # (rows + pad, *out) int32
        xs = xs.reshape(rows + pad, *([1] * len(self.features)))
        y = acc.astype(jnp.float32) * xs * scale
        return y[:rows].reshape(*lead, *self.features).astype(self.dtype)


    def _int4_grouped_dot(self, x: jax.Array, codes: jax.Array, scale: jax.Array, int8_rows: bool) -> jax.Array:
        """int4 codes times x without the dequantized kernel: one dot batched over every input axis but the group's
        g (over (N, H/g) groups for an o projection) gives each group's partial sums, fp32; those times the group
        scales, summed over the groups. int8_rows ("int8_dot", XLA:CPU): x's rows quantized per row to int8 first
        (int8 x int8 -> int32 dot, times the row scale at the end; codes held as int8 on CPU); else ("grouped", TPU)
        x stays in the compute dtype and the codes are converted to it inside the dot, so the compiler reads them
        packed (the "dequant" form materialises the whole kernel each call on TPU: 8.5x the bytes of a decode step's
        minimum, BENCHMARKS.md). The codes' group axes lead in "in_out" (no operand copy); in "out_in" XLA moves them
        first (a copy)."""
        lead, in_shape = x.shape[:-self.n_in], x.shape[-self.n_in:]
        n_out, n_in = len(self.features), self.n_in
        rows = int(np.prod(lead))
        g = codes.shape[n_in] if self.kernel_layout == "in_out" else codes.shape[-1]
        x2 = x.reshape(rows, int(np.prod(in_shape)))
        pad = max(INT8_DOT_MIN_ROWS - rows, 0) if int8_rows else 0
        if pad:
            x2 = jnp.pad(x2, ((0, pad), (0, 0)))
        if int8_rows:
            x2, xs = dynamic_int8(x2)
            codes, acc_type = codes.astype(jnp.int8), jnp.int32
        else:
            codes, acc_type = codes.astype(self.dtype), jnp.float32
        xg = x2.reshape(rows + pad, *in_shape[:-1], in_shape[-1] // g, g)  # (R, *in[:-1], G, g)
        batch = tuple(range(1, n_in + 1))
        if self.kernel_layout == "in_out":  # codes (*in[:-1], G, g, *out), scale (*in[:-1], G, *out)
            dims = ((n_in + 1,), (n_in,)), (batch, tuple(range(n_in)))
        else:  # codes (*out, *in[:-1], G, g), scale (*out, *in[:-1], G)
            dims = ((n_in + 1,), (n_out + n_in,)), (batch, tuple(range(n_out, n_out + n_in)))
            scale = jnp.moveaxis(scale, tuple(range(n_out)), tuple(range(n_in, n_in + n_out)))
        acc = jax.lax.dot_general(xg, codes, dims, preferred_element_type=acc_type)
        # acc (*in[:-1], G, R, *out) times scale (*in[:-1], G, 1, *out), summed over the groups
        y = jnp.sum(acc.astype(jnp.float32) * jnp.expand_dims(scale, n_in), axis=tuple(range(n_in)))
        if int8_rows:
            y = y * xs.reshape(rows + pad, *([1] * n_out))
        return y[:rows].reshape(*lead, *self.features).astype(self.dtype)


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
    quant: str = "none"  # Dense.quant of its three projections
    quant_group_size: int = 128
    lora: Any = None  # Dense.lora

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_layout=self.kernel_layout, quant=self.quant,
                  quant_group_size=self.quant_group_size, lora=self.lora)
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
