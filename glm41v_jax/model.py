"""GLM-4.1V: vision tower + projector + GLM decoder, as one Linen module.

Entry points (pure functions of `params` and arrays):
  * `Glm4v.__call__`      embeddings (+ vision tokens merged in) -> decoder -> logits; with or without a KV cache.
  * `forward`             the HF-comparable forward: the arrays `Glm4vProcessor` returns -> logits.
The inputs (`inputs.ModelInputs`, built on the host by `inputs.prepare_inputs`) are static-shape arrays.

Vision tokens are merged by a gather index rather than `masked_scatter`: position (b, t) takes vision token
`vision_index[b, t]` (-1 = keep the text embedding; the rule: `inputs.vision_index`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import Glm4vConfig
from .inputs import VisionInputs, prepare_inputs
from .layers import Dense
from .rope import mrope_cos_sin
from .text import LayerInputs, TextModel
from .vision import VisionModel


class Glm4v(nn.Module):
    cfg: Glm4vConfig

    def setup(self) -> None:
        rt = self.cfg.runtime
        self.visual = VisionModel(self.cfg)
        self.language_model = TextModel(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Dense((self.cfg.text.vocab_size,), ("embed", "vocab"), name="lm_head",
                                 kernel_layout=rt.kernel_layout, dtype=jnp.dtype(rt.compute_dtype),
                                 param_dtype=jnp.dtype(rt.param_dtype), quant=rt.quant_of("lm_head"),
                                 quant_group_size=rt.quant_group_size)

    def encode_vision(self, vision: VisionInputs) -> jax.Array:
        """The packed patches -> LLM tokens (P / merge**2, D)."""
        return self.visual(vision)

    def logits(self, h: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return self.language_model.attend(h)
        return self.lm_head(h)

    def __call__(
        self,
        input_ids: jax.Array,  # (B, T)
        positions: jax.Array,  # (3, B, T) M-RoPE positions
        segment_ids: jax.Array,  # (B, T) 0 = padding
        vision: VisionInputs | None = None,  # packed patches + metadata + attention plan
        vision_index: jax.Array | None = None,  # (B, T) index into the vision tokens, -1 = text
        cache: dict[str, Any] | None = None,
        cache_index: jax.Array | None = None,  # scalar slot where these T tokens are written
        kv_segment_ids: jax.Array | None = None,  # (B, S) for the cache after this write; None with a cache: the
        #                                        cache is empty before this write (prefill: attend to new tokens only)
        logits_index: jax.Array | None = None,  # (B,) compute logits only at these positions
        return_hidden: bool = False,
        vision_tokens: jax.Array | None = None,  # (P / merge**2, D) `encode_vision`'s output, instead of `vision`
    ):
        t = self.cfg.text
        dtype = jnp.dtype(self.cfg.runtime.compute_dtype)
        x = self.language_model.embed(input_ids)
        if vision is not None and vision_tokens is not None:
            raise ValueError("give vision (patches) or vision_tokens (already encoded), not both")
        vt = None if vision_tokens is None else vision_tokens.astype(dtype)
        if vision is not None:
            with jax.named_scope("vision"):
                vt = self.encode_vision(vision).astype(dtype)
        if vt is not None:
            idx = jnp.clip(vision_index, 0, vt.shape[0] - 1)
            x = jnp.where((vision_index >= 0)[..., None], vt[idx], x)
        b, n = input_ids.shape
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rotary_dim, t.rope_theta, t.mrope_section, dtype)
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            h, new_cache = self.language_model(x, LayerInputs(cos, sin, segment_ids, slots))
        else:
            q_slots = cache_index + jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            kv_slots = None
            if kv_segment_ids is not None:
                kv_slots = jnp.broadcast_to(jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32), kv_segment_ids.shape)
            h, new_cache = self.language_model(
                x, LayerInputs(cos, sin, segment_ids, q_slots, kv_segment_ids, kv_slots, cache_index), cache)
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
        out = h if return_hidden else self.logits(h)
        return out if cache is None else (out, new_cache)


def init_cache(cfg: Glm4vConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """Zeroed KV cache: per layer (B, K, S, H) (stacked (L, B, K, S, H) when scan_layers).

    Heads before slots: each (row, KV head) is one contiguous (S, H) matrix, the operand layout attention reads.
    With slots before heads, the TPU compiler re-laid out the whole cache of every layer on every decode step
    (K = 2 heads as the minor tile dimension; BENCHMARKS.md "TPU decode efficiency")."""
    t = cfg.text
    dtype = jnp.dtype(dtype or cfg.runtime.compute_dtype)
    shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
    if cfg.runtime.scan_layers:
        z = jnp.zeros((t.num_hidden_layers, *shape), dtype)
        return {"k": z, "v": z}
    return {"k": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)]}


@functools.lru_cache(maxsize=8)
def _forward_fn(cfg: Glm4vConfig):
    model = Glm4v(cfg)
    return jax.jit(lambda params, kw: model.apply({"params": params}, **kw))


def forward(params: Any, cfg: Glm4vConfig, input_ids: np.ndarray, **hf_arrays: Any) -> jax.Array:
    """Logits (B, T, V) for the arrays a `Glm4vProcessor` returns (attention_mask, mm_token_type_ids,
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)."""
    inputs = prepare_inputs(cfg, input_ids, **hf_arrays)
    return _forward_fn(cfg)(params, inputs.as_kwargs())


def _dummy_inputs(cfg: Glm4vConfig) -> dict[str, Any]:
    """One 2x2-patch image and 8 tokens (init reads only the shapes)."""
    m2 = cfg.vision.spatial_merge_size**2
    n = 8
    vision = VisionInputs.empty(m2, cfg.vision.patch_dim)
    return dict(input_ids=jnp.zeros((1, n), jnp.int32), positions=jnp.zeros((3, 1, n), jnp.int32),
                segment_ids=jnp.ones((1, n), jnp.int32), vision=vision, vision_index=jnp.zeros((1, n), jnp.int32))


def init_params(cfg: Glm4vConfig, rng: jax.Array | None = None, boxed: bool = False) -> Any:
    """Randomly initialised params (tests, benchmarks). `boxed` keeps the logical-axis metadata."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    variables = Glm4v(cfg).init(rng, **_dummy_inputs(cfg))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: Glm4vConfig) -> Any:
    """Shapes, dtypes and logical axes of every parameter, at no memory cost (jax.eval_shape; cached per config,
    the tree of ShapeDtypeStructs is immutable)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), boxed=True))


@functools.partial(jax.jit, static_argnums=1)
def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    return jnp.transpose(x, perm)


def _layout_permutation(path: str, src: nn.LogicallyPartitioned, dst: nn.LogicallyPartitioned
                        ) -> tuple[int, ...] | None:
    """The axis permutation taking a kernel from `src` to `dst` storage (None: the same), found from the logical
    names and shapes: a rotation of the in/out axes behind any shared leading axes (the scan's "layers")."""
    s_names, s_shape, d_names, d_shape = src.names, src.value.shape, dst.names, dst.value.shape
    if s_names == d_names and s_shape == d_shape:
        return None
    nd, found = len(s_shape), set()
    for lead in range(nd):
        if s_names[:lead] != d_names[:lead]:
            break
        for k in range(1, nd - lead):
            perm = (*range(lead), *range(lead + k, nd), *range(lead, lead + k))
            if tuple(s_names[i] for i in perm) == tuple(d_names) and tuple(s_shape[i] for i in perm) == d_shape:
                found.add(perm)
    if len(found) != 1:
        raise ValueError(f"{path}: cannot map kernel {s_names} {s_shape} onto {d_names} {d_shape} "
                         f"({len(found)} candidate permutations)")
    return found.pop()


def _release(old: Any, new: Any) -> None:
    """Delete the device array `old`, replaced by `new`, unless it is `new` or shares a buffer with it."""
    if not isinstance(old, jax.Array) or old is new or old.is_deleted():
        return
    shards = lambda a: {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}  # noqa: E731
    if not isinstance(new, jax.Array) or not shards(old) & shards(new):
        old.delete()


def to_kernel_layout(params: Any, cfg: Glm4vConfig, layout: str, shardings: Any = None, *, donate: bool = False
                     ) -> tuple[Any, Glm4vConfig]:
    """Re-store the text decoder's and lm_head's kernels in `layout` ("in_out" | "out_in", see layers.Dense).

    Returns (params, cfg with runtime.kernel_layout = layout). Host (NumPy) kernels are transposed as views and
    copied once by `device_put`; device kernels are transposed on their device(s) one at a time. With
    `shardings` (a tree for the new layout, e.g. `sharding.param_shardings(abstract_params(new_cfg), mesh)`)
    every leaf ends in its sharding. Converting back gives the original arrays bit for bit.

    `donate=True` consumes the caller's tree: each device array that is replaced (transposed or moved to another
    sharding) is deleted as soon as its replacement exists, so the device never holds a second copy of the weights
    (transient extra memory: one kernel). Without it, the caller's arrays stay valid and, while the caller keeps
    them, the replaced ones occupy the device twice.
    """
    dst_cfg = cfg.with_runtime(kernel_layout=layout)
    if layout == cfg.runtime.kernel_layout:
        if shardings is None:
            return params, dst_cfg
        leaves, treedef = jax.tree.flatten(params)
        out = []
        for x, sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
            y = jax.device_put(x, sh)
            if donate:
                _release(x, y)
            out.append(y)
        return jax.tree.unflatten(treedef, out), dst_cfg
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    src_abs = jax.tree_util.tree_leaves_with_path(abstract_params(cfg), is_leaf=is_box)
    dst_abs = jax.tree.leaves(abstract_params(dst_cfg), is_leaf=is_box)
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(src_abs):
        raise ValueError(f"params have {len(leaves)} arrays; the config describes {len(src_abs)}")
    sh_leaves = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    for x, (path, s) in zip(leaves, src_abs, strict=True):  # every shape checked before any array is consumed
        if np.shape(x) != s.value.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: shape {np.shape(x)}, the config's "
                             f"{cfg.runtime.kernel_layout!r} layout expects {s.value.shape}")
    out = []
    for x, (path, s), d, sh in zip(leaves, src_abs, dst_abs, sh_leaves, strict=True):
        perm = _layout_permutation(jax.tree_util.keystr(path), s, d) if is_box(s) else None
        if perm is None:
            y = x
        elif isinstance(x, np.ndarray):  # host params: a transposed view, copied once into place by device_put
            y = np.transpose(x, perm)
        else:
            y = _transpose(x, perm)
        if sh is not None:
            y = jax.device_put(y, sh)
        if donate:
            _release(x, y)
        out.append(y)
    return jax.tree.unflatten(treedef, out), dst_cfg
