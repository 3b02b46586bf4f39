"""HF checkpoint names <-> the Flax parameter tree, and the layout transforms between them.

One strict table: every HF tensor maps to exactly one Flax leaf, with a shape-asserting transform. The Flax tree
is the *unrolled* layout (`layers_0`, `blocks_3`, ...): it is what the converter writes (tensor by tensor, so host
memory stays bounded) and what decoding runs. `stack_layers` / `unstack_layers` turn it into the scanned layout
(one leading `layers` axis) that training uses.

Flax tree (D text width, Dv vision width, N/K/H heads, kv heads, head dim, F mlp width, P patch dim):
  visual/patch_embed/{kernel (P, Dv), bias (Dv)}          Conv3d(k = stride) as a matmul, rows ordered (C, T, py, px)
  visual/post_conv_layernorm/scale (Dv)
  visual/position_embedding (S*S, Dv)                      learned 2-D position table, row-major
  visual/blocks_i/norm1/scale, norm2/scale
  visual/blocks_i/attn/qkv/kernel (Dv, 3, Nv, Hv) [+ bias (3, Nv, Hv)], attn/proj/kernel (Nv, Hv, Dv)
  visual/blocks_i/mlp/{gate,up}/kernel (Dv, D), mlp/down/kernel (D, Dv)
  visual/post_layernorm/scale
  visual/downsample/{kernel (m*m*Dv, D), bias (D)}        Conv2d(k = stride = m), input flattened (a, b, d)
  visual/merger/proj/kernel (D, D), post_projection_norm/{scale, bias}, {gate,up}/kernel (D, Fm), down (Fm, D)
  language_model/embed_tokens/embedding (V, D)
  language_model/layers_j/{input_layernorm, post_self_attn_layernorm, post_attention_layernorm,
                           post_mlp_layernorm}/scale
  language_model/layers_j/self_attn/{q_proj (D, N, H)+bias (N, H), k_proj/v_proj (D, K, H)+bias, o_proj (N, H, D)}
  language_model/layers_j/mlp/gate_up/kernel (D, 2, F) [gate first], mlp/down/kernel (F, D)
  language_model/norm/scale
  lm_head/kernel (D, V)                                   absent when tie_word_embeddings
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Glm4vConfig
from .errors import Glm41vError

Path = tuple[str, ...]


class WeightsError(Glm41vError, ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape/dtype. The message names it."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor -> one Flax leaf."""

    hf_shape: tuple[int, ...]
    path: Path
    flax_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(out_shape: tuple[int, ...], in_shape: tuple[int, ...]):
    """torch Linear weight (out, in) <-> kernel in_shape + out_shape."""
    o, i = int(np.prod(out_shape)), int(np.prod(in_shape))

    def to_flax(w):
        return w.reshape(o, i).T.reshape(*in_shape, *out_shape)

    def to_hf(k):
        return k.reshape(i, o).T.reshape(o, i)

    return (o, i), in_shape + out_shape, to_flax, to_hf


def _same(shape: tuple[int, ...]):
    return shape, shape, (lambda a: a.reshape(shape)), (lambda a: a.reshape(shape))


def _reshape(hf_shape: tuple[int, ...], flax_shape: tuple[int, ...]):
    return hf_shape, flax_shape, (lambda a: a.reshape(flax_shape)), (lambda a: a.reshape(hf_shape))


def _conv3d_patch(dv: int, c: int, t: int, p: int):
    """Conv3d (Dv, C, T, p, p) -> kernel (C*T*p*p, Dv)."""
    hf = (dv, c, t, p, p)

    def to_flax(w):
        return w.reshape(dv, c * t * p * p).T

    def to_hf(k):
        return k.T.reshape(hf)

    return hf, (c * t * p * p, dv), to_flax, to_hf


def _conv2d_merge(do: int, dv: int, m: int):
    """Conv2d (Do, Dv, m, m) -> kernel (m*m*Dv, Do) with input flattened as (a, b, d)."""
    hf = (do, dv, m, m)

    def to_flax(w):
        return w.transpose(2, 3, 1, 0).reshape(m * m * dv, do)

    def to_hf(k):
        return k.reshape(m, m, dv, do).transpose(3, 2, 0, 1)

    return hf, (m * m * dv, do), to_flax, to_hf


def build_rules(cfg: Glm4vConfig) -> dict[str, Rule]:
    """The complete HF-name -> Rule table for a config."""
    t, v = cfg.text, cfg.vision
    d, n, k, h, f = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
    dv, nv, hv, m = v.hidden_size, v.num_heads, v.head_dim, v.spatial_merge_size
    do = v.out_hidden_size
    rules: dict[str, Rule] = {}

    def add(name: str, path: str, spec) -> None:
        hf_shape, flax_shape, to_flax, to_hf = spec
        rules[name] = Rule(tuple(hf_shape), tuple(path.split("/")), tuple(flax_shape), to_flax, to_hf)

    vp, lp = "model.visual.", "model.language_model."
    add(vp + "patch_embed.proj.weight", "visual/patch_embed/kernel",
        _conv3d_patch(dv, v.in_channels, v.temporal_patch_size, v.patch_size))
    add(vp + "patch_embed.proj.bias", "visual/patch_embed/bias", _same((dv,)))
    add(vp + "post_conv_layernorm.weight", "visual/post_conv_layernorm/scale", _same((dv,)))
    add(vp + "embeddings.position_embedding.weight", "visual/position_embedding",
        _same((v.num_positions_side**2, dv)))
    for i in range(v.depth):
        b, fb = f"{vp}blocks.{i}.", f"visual/blocks_{i}/"
        add(b + "norm1.weight", fb + "norm1/scale", _same((dv,)))
        add(b + "norm2.weight", fb + "norm2/scale", _same((dv,)))
        add(b + "attn.qkv.weight", fb + "attn/qkv/kernel", _linear((3, nv, hv), (dv,)))
        if v.attention_bias:
            add(b + "attn.qkv.bias", fb + "attn/qkv/bias", _reshape((3 * dv,), (3, nv, hv)))
        add(b + "attn.proj.weight", fb + "attn/proj/kernel", _linear((dv,), (nv, hv)))
        add(b + "mlp.gate_proj.weight", fb + "mlp/gate/kernel", _linear((do,), (dv,)))
        add(b + "mlp.up_proj.weight", fb + "mlp/up/kernel", _linear((do,), (dv,)))
        add(b + "mlp.down_proj.weight", fb + "mlp/down/kernel", _linear((dv,), (do,)))
    add(vp + "post_layernorm.weight", "visual/post_layernorm/scale", _same((dv,)))
    add(vp + "downsample.weight", "visual/downsample/kernel", _conv2d_merge(do, dv, m))
    add(vp + "downsample.bias", "visual/downsample/bias", _same((do,)))
    add(vp + "merger.proj.weight", "visual/merger/proj/kernel", _linear((do,), (do,)))
    add(vp + "merger.post_projection_norm.weight", "visual/merger/post_projection_norm/scale", _same((do,)))
    add(vp + "merger.post_projection_norm.bias", "visual/merger/post_projection_norm/bias", _same((do,)))
    add(vp + "merger.gate_proj.weight", "visual/merger/gate/kernel", _linear((v.intermediate_size,), (do,)))
    add(vp + "merger.up_proj.weight", "visual/merger/up/kernel", _linear((v.intermediate_size,), (do,)))
    add(vp + "merger.down_proj.weight", "visual/merger/down/kernel", _linear((do,), (v.intermediate_size,)))

    add(lp + "embed_tokens.weight", "language_model/embed_tokens/embedding", _same((t.vocab_size, d)))
    for j in range(t.num_hidden_layers):
        b, fb = f"{lp}layers.{j}.", f"language_model/layers_{j}/"
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            add(b + norm + ".weight", fb + norm + "/scale", _same((d,)))
        add(b + "self_attn.q_proj.weight", fb + "self_attn/q_proj/kernel", _linear((n, h), (d,)))
        add(b + "self_attn.q_proj.bias", fb + "self_attn/q_proj/bias", _reshape((n * h,), (n, h)))
        add(b + "self_attn.k_proj.weight", fb + "self_attn/k_proj/kernel", _linear((k, h), (d,)))
        add(b + "self_attn.k_proj.bias", fb + "self_attn/k_proj/bias", _reshape((k * h,), (k, h)))
        add(b + "self_attn.v_proj.weight", fb + "self_attn/v_proj/kernel", _linear((k, h), (d,)))
        add(b + "self_attn.v_proj.bias", fb + "self_attn/v_proj/bias", _reshape((k * h,), (k, h)))
        add(b + "self_attn.o_proj.weight", fb + "self_attn/o_proj/kernel", _linear((d,), (n, h)))
        add(b + "mlp.gate_up_proj.weight", fb + "mlp/gate_up/kernel", _linear((2, f), (d,)))
        add(b + "mlp.down_proj.weight", fb + "mlp/down/kernel", _linear((d,), (f,)))
    add(lp + "norm.weight", "language_model/norm/scale", _same((d,)))
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", "lm_head/kernel", _linear((t.vocab_size,), (d,)))
    return rules


def hf_param_shapes(cfg: Glm4vConfig) -> dict[str, tuple[int, ...]]:
    return {name: r.hf_shape for name, r in build_rules(cfg).items()}


# Names the published checkpoints may carry that hold no weights of ours (rotary buffers).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


def is_ignored_key(name: str, cfg: Glm4vConfig | None = None) -> bool:
    """Rotary buffers, and a tied lm_head's copy of the embedding, carry nothing to load."""
    if cfg is not None and cfg.tie_word_embeddings and name == "lm_head.weight":
        return True
    return bool(_IGNORED.match(name))


def set_path(tree: dict, path: Path, value: Any) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def get_path(tree: Mapping, path: Path) -> Any:
    node = tree
    for p in path:
        node = node[p]
    return node


def key_names(key_path: Any) -> Path:
    """A jax key path (`jax.tree_util.tree_flatten_with_path`) -> the names of its keys, as in `Path`."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def iter_leaves(tree: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    for key, val in tree.items():
        if isinstance(val, Mapping):
            yield from iter_leaves(val, prefix + (key,))
        else:
            yield prefix + (key,), val


def check_complete(rules: Mapping[str, Rule], seen: set[str], unexpected: list[str], source: str) -> None:
    missing = sorted(set(rules) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8
                                                                                            else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(sorted(unexpected)[:8])
                         + (" ..." if len(unexpected) > 8 else ""))
        raise WeightsError(f"{source}: " + "; ".join(parts))


def hf_to_flax(state: Mapping[str, np.ndarray], cfg: Glm4vConfig, dtype: Any = None, source: str = "state dict"
               ) -> dict:
    """Map a whole in-memory HF state dict to the Flax tree (for tests and small models)."""
    rules = build_rules(cfg)
    tree: dict = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, arr in state.items():
        rule = rules.get(name)
        if rule is None:
            if not is_ignored_key(name, cfg):
                unexpected.append(name)
            continue
        set_path(tree, rule.path, convert_tensor(name, arr, rule, dtype, source))
        seen.add(name)
    check_complete(rules, seen, unexpected, source)
    return tree


def convert_tensor(name: str, arr: np.ndarray, rule: Rule, dtype: Any, source: str) -> np.ndarray:
    if tuple(arr.shape) != rule.hf_shape:
        raise WeightsError(f"{source}: tensor '{name}' has shape {tuple(arr.shape)}, expected {rule.hf_shape} "
                           "from config.json")
    if arr.dtype.kind not in "fV" and str(arr.dtype) != "bfloat16":
        raise WeightsError(f"{source}: tensor '{name}' has dtype {arr.dtype}, expected a floating-point dtype")
    out = rule.to_flax(arr)
    if dtype is not None:
        out = out.astype(dtype)
    assert out.shape == rule.flax_shape, (name, out.shape, rule.flax_shape)
    return np.ascontiguousarray(out)


def flax_to_hf(params: Mapping, cfg: Glm4vConfig) -> dict[str, np.ndarray]:
    """The inverse map (unrolled layout), for export and tests."""
    out = {}
    for name, rule in build_rules(cfg).items():
        out[name] = np.ascontiguousarray(rule.to_hf(np.asarray(get_path(params, rule.path))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scanned <-> unrolled layouts.

LAYER_GROUPS = (  # (parent, name) of the layer stacks: name_0, name_1, ... <-> one stacked name
    ("visual", "blocks"), ("language_model", "layers"))


def stack_layers(params: Mapping) -> dict:
    """Unrolled (`layers_0`, ...) -> scanned (`layers` with a leading axis). Works on numpy or jax arrays."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()}
    for parent, name in LAYER_GROUPS:
        if parent not in out:
            continue
        sub = dict(out[parent])
        idx = sorted(int(k[len(name) + 1:]) for k in sub if re.fullmatch(rf"{name}_\d+", k))
        if not idx:
            continue
        layers = [sub.pop(f"{name}_{i}") for i in idx]
        sub[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        out[parent] = sub
    return out


def unstack_layers(params: Mapping) -> dict:
    """Scanned -> unrolled."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()}
    for parent, name in LAYER_GROUPS:
        if parent not in out or name not in out[parent]:
            continue
        sub = dict(out[parent])
        stacked = sub.pop(name)
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            sub[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[parent] = sub
    return out
