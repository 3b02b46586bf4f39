"""The GLM-4 text decoder of GLM-4.1V.

What is special: "sandwich" norms (RMSNorm on each branch *output* before the residual add, plus the usual
pre-norms), q/k/v biases but no o bias, grouped-query attention (32 q / 2 kv heads in the 9B), and a partial,
interleaved-pair 3-D M-RoPE on the first half of each head. The same layer code runs scanned over stacked
weights (training) or unrolled over per-layer weights (decoding), with or without a KV cache.

KV cache: per layer k, v (B, K, S, H) (heads before slots: see model.init_cache) written at slot `cache_index`; one
shared `kv_segment_ids` (B, S) says which slots hold real tokens (0 = empty or padding). Slots double as causal
positions. With a cache but no kv segment ids (a prefill into an empty cache) the new tokens are written and attend
only to each other, not to the S - T empty slots.

Axis legend: B batch, T new tokens, S cache slots, D width, N q heads, K kv heads, H head dim, F mlp width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from .config import Glm4vConfig, TextConfig
from .layers import Dense, Embed, GatedMLP, RMSNorm, attention, maybe_remat
from .rope import apply_mrope


@flax.struct.dataclass
class LayerInputs:
    """What every decoder layer reads besides its hidden states and its own KV cache: the same for all layers
    (broadcast by the layer scan), passed by name so that adding a field cannot shift a positional count."""

    cos: jax.Array  # (B, T, rotary_dim/2) M-RoPE
    sin: jax.Array
    q_seg: jax.Array  # (B, T) segment ids of the new tokens, 0 = padding
    q_slots: jax.Array  # (B, T) their cache slots (= causal positions)
    kv_seg: jax.Array | None = None  # (B, S) of the cache after this write; None: the new tokens are all the keys
    kv_slots: jax.Array | None = None  # (B, S)
    cache_index: jax.Array | None = None  # scalar slot where the T new tokens are written (with a cache)


class TextAttention(nn.Module):
    cfg: TextConfig
    dtype: Any
    param_dtype: Any
    attention_impl: str = "xla"  # RuntimeConfig.attention_impl
    kernel_layout: str = "in_out"  # RuntimeConfig.kernel_layout
    quant: str = "none"  # RuntimeConfig.quantize (the decoder's projections are always quantized with it)
    quant_group_size: int = 128
    lora: Any = None  # RuntimeConfig.lora (layers.Dense)

    @nn.compact
    def __call__(self, x: jax.Array, inp: LayerInputs, kv_cache: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_layout=self.kernel_layout, quant=self.quant,
                  quant_group_size=self.quant_group_size, lora=self.lora)
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Dense((n, h), ("embed", "heads", "head_dim"), use_bias=True, name="q_proj", **kw)(x)
        kk = Dense((k, h), ("embed", "kv_heads", "head_dim"), use_bias=True, name="k_proj", **kw)(x)
        v = Dense((k, h), ("embed", "kv_heads", "head_dim"), use_bias=True, name="v_proj", **kw)(x)
        q = apply_mrope(q, inp.cos, inp.sin)
        kk = apply_mrope(kk, inp.cos, inp.sin)
        new_cache = None
        k_all, v_all = kk, v
        if kv_cache is not None:
            ck, cv = kv_cache  # (B, K, S, H)
            new_cache = tuple(jax.lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).astype(c.dtype),
                                                           (0, 0, inp.cache_index, 0)) for c, x in ((ck, kk), (cv, v)))
            if inp.kv_seg is not None:  # attend to the whole cache; None: a fresh cache, the new tokens are all of it
                k_all, v_all = (c.transpose(0, 2, 1, 3) for c in new_cache)  # (B, S, K, H) views
        kv_seg, kv_slots = (inp.q_seg, inp.q_slots) if inp.kv_seg is None else (inp.kv_seg, inp.kv_slots)
        o = attention(q, k_all.astype(self.dtype), v_all.astype(self.dtype), q_segment_ids=inp.q_seg,
                      kv_segment_ids=kv_seg, causal=True, q_positions=inp.q_slots, kv_positions=kv_slots,
                      impl=self.attention_impl, kv_is_q=inp.kv_seg is None)
        return Dense((c.hidden_size,), ("heads", "head_dim", "embed"), n_in=2, name="o_proj", **kw)(o), new_cache


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: Any
    param_dtype: Any
    attention_impl: str = "xla"
    kernel_layout: str = "in_out"
    quant: str = "none"
    quant_group_size: int = 128
    lora: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, inp: LayerInputs, kv_cache: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkw = dict(kernel_layout=self.kernel_layout, quant=self.quant, quant_group_size=self.quant_group_size,
                   lora=self.lora)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, new_cache = TextAttention(c, name="self_attn", attention_impl=self.attention_impl, **qkw, **kw)(
            h, inp, kv_cache)
        x = x + RMSNorm(c.rms_norm_eps, name="post_self_attn_layernorm", **kw)(h)
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        h = GatedMLP(c.intermediate_size, c.hidden_size, fused=True, name="mlp", **qkw, **kw)(h)
        x = x + RMSNorm(c.rms_norm_eps, name="post_mlp_layernorm", **kw)(h)
        return x, new_cache


class TextModel(nn.Module):
    """embed_tokens + decoder layers + final norm."""

    cfg: Glm4vConfig

    def setup(self) -> None:
        c, rt = self.cfg.text, self.cfg.runtime
        self._dtype, pdtype = jnp.dtype(rt.compute_dtype), jnp.dtype(rt.param_dtype)
        kw = dict(dtype=self._dtype, param_dtype=pdtype)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, **kw)
        layer = maybe_remat(DecoderLayer, rt.remat_policy)
        lkw = dict(attention_impl=rt.attention_impl, kernel_layout=rt.kernel_layout, quant=rt.quant_of("text"),
                   quant_group_size=rt.quant_group_size, lora=rt.lora, **kw)
        if rt.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0, "lora": 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, 0), length=c.num_hidden_layers,  # (inp, kv_cache)
                                  metadata_params={nn.PARTITION_NAME: "layers"})(c, **lkw)
        else:
            self.layers = [layer(c, name=f"layers_{i}", **lkw) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def attend(self, x: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(x)

    def __call__(self, x: jax.Array, inp: LayerInputs, cache: dict[str, Any] | None = None
                 ) -> tuple[jax.Array, dict[str, Any] | None]:
        """x (B, T, D) embeddings -> normed hidden states (B, T, D), updated cache (or None)."""
        if self.cfg.runtime.scan_layers:
            xs = None if cache is None else (cache["k"], cache["v"])
            x, ys = self.layers(x, inp, xs)
            new_cache = None if cache is None else {"k": ys[0], "v": ys[1]}
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                with jax.named_scope(f"layer_{i}"):
                    x, kv = layer(x, inp, kv)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_cache = None if cache is None else {"k": ks, "v": vs}
        return self.norm(x), new_cache
