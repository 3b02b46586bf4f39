"""GLM-4.1V: vision tower + projector + GLM decoder, as one Linen module, plus the host-side input preparation.

Entry points (pure functions of `params` and arrays):
  * `Glm4v.__call__`      embeddings (+ vision tokens merged in) -> decoder -> logits; with or without a KV cache.
  * `prepare_inputs`      HF-processor arrays -> the static-shape arrays the compiled programs take (M-RoPE
                          positions, segment ids, packed-patch metadata, vision-token gather index), NumPy.
  * `forward`             the HF-comparable forward: the arrays `Glm4vProcessor` returns -> logits.

Vision tokens are merged by a gather index rather than `masked_scatter`: position (b, t) takes vision token
`vision_index[b, t]` (-1 = keep the text embedding). Image placeholders take image tokens in order, video-frame
placeholders take video tokens in order, over the flattened batch — the same as HF whenever HF is defined.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import Glm4vConfig
from .layers import Dense
from .rope import frame_grids, get_rope_index, mrope_cos_sin, vision_patch_positions
from .text import TextModel
from .vision import VisionModel
from .vision import attention_layout as vision_attention_layout


class Glm4v(nn.Module):
    cfg: Glm4vConfig

    def setup(self) -> None:
        rt = self.cfg.runtime
        self.visual = VisionModel(self.cfg)
        self.language_model = TextModel(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Dense((self.cfg.text.vocab_size,), ("embed", "vocab"), name="lm_head",
                                 layout=rt.kernel_layout, dtype=jnp.dtype(rt.dtype),
                                 param_dtype=jnp.dtype(rt.param_dtype))

    def encode_vision(self, pixel_values, hpos, wpos, segment_ids, seg_h, seg_w, attn_groups=None,
                      attn_inverse=None) -> jax.Array:
        return self.visual(pixel_values, hpos, wpos, segment_ids, seg_h, seg_w, attn_groups, attn_inverse)

    def logits(self, h: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return self.language_model.attend(h)
        return self.lm_head(h)

    def __call__(
        self,
        input_ids: jax.Array,  # (B, T)
        positions: jax.Array,  # (3, B, T) M-RoPE positions
        segment_ids: jax.Array,  # (B, T) 0 = padding
        vision: dict[str, jax.Array] | None = None,  # packed patches + metadata (see prepare_inputs)
        vision_index: jax.Array | None = None,  # (B, T) index into the vision tokens, -1 = text
        cache: dict[str, Any] | None = None,
        cache_index: jax.Array | None = None,  # scalar slot where these T tokens are written
        kv_segment_ids: jax.Array | None = None,  # (B, S) for the cache after this write; None with a cache: the
        #                                        cache is empty before this write (prefill: attend to new tokens only)
        logits_index: jax.Array | None = None,  # (B,) compute logits only at these positions
        return_hidden: bool = False,
    ):
        t = self.cfg.text
        dtype = jnp.dtype(self.cfg.runtime.dtype)
        x = self.language_model.embed(input_ids)
        if vision is not None:
            with jax.named_scope("vision"):
                vt = self.encode_vision(**vision).astype(dtype)
            idx = jnp.clip(vision_index, 0, vt.shape[0] - 1)
            x = jnp.where((vision_index >= 0)[..., None], vt[idx], x)
        b, n = input_ids.shape
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rotary_dim, t.rope_theta, t.mrope_section, dtype)
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            h, new_cache = self.language_model(x, cos, sin, segment_ids, slots, segment_ids, slots)
        else:
            q_slots = cache_index + jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            kv_slots = None
            if kv_segment_ids is not None:
                kv_slots = jnp.broadcast_to(jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32), kv_segment_ids.shape)
            h, new_cache = self.language_model(x, cos, sin, segment_ids, q_slots, kv_segment_ids, kv_slots,
                                               cache, cache_index)
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
    dtype = jnp.dtype(dtype or cfg.runtime.dtype)
    shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
    if cfg.runtime.scan_layers:
        z = jnp.zeros((t.num_hidden_layers, *shape), dtype)
        return {"k": z, "v": z}
    return {"k": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)]}


# ---------------------------------------------------------------------------------------------------------------
# Host-side preparation (NumPy).


def mm_token_types(input_ids: np.ndarray, cfg: Glm4vConfig) -> np.ndarray:
    """The processor's rule: 2 for <|image|> inside a video span, 1 for other <|image|>, 0 otherwise."""
    ids = np.asarray(input_ids)
    is_img = ids == cfg.image_token_id
    depth = np.cumsum(ids == cfg.video_start_token_id, axis=-1) - np.cumsum(ids == cfg.video_end_token_id, axis=-1)
    return np.where(is_img, np.where(depth > 0, 2, 1), 0).astype(np.int32)


@dataclasses.dataclass
class ModelInputs:
    """Everything one compiled program needs, as NumPy arrays with static (bucketed) shapes."""

    input_ids: np.ndarray  # (B, T) int32
    positions: np.ndarray  # (3, B, T) int32
    segment_ids: np.ndarray  # (B, T) int32
    rope_deltas: np.ndarray  # (B,) int32
    vision: dict[str, Any] | None  # pack_vision's dict (packed patches, metadata, attention layout)
    vision_index: np.ndarray | None  # (B, T) int32

    def as_kwargs(self) -> dict[str, Any]:
        return dict(input_ids=self.input_ids, positions=self.positions, segment_ids=self.segment_ids,
                    vision=self.vision, vision_index=self.vision_index)


def pack_vision(cfg: Glm4vConfig, pixel_values: np.ndarray | None, image_grid_thw: np.ndarray | None,
                pixel_values_videos: np.ndarray | None, video_grid_thw: np.ndarray | None,
                pad_to: int | None = None, attention_layout: str = "auto") -> dict[str, Any] | None:
    """Images then video frames as one packed patch sequence with per-patch metadata; padded rows get segment 0.

    `attention_layout` ("auto" | "dense" | "grouped", see vision.py) adds the grouped attention layout arrays
    `attn_groups` (tuple of int32 (n_g, L_g)) and `attn_inverse` (int32 (P,)) when it is chosen; their shapes are
    the layout's statics, so they are part of every compile key.
    """
    v = cfg.vision
    pix = [p for p in (pixel_values, pixel_values_videos) if p is not None and len(p)]
    if not pix:
        return None
    pixels = np.concatenate([np.asarray(p, np.float32).reshape(-1, v.patch_dim) for p in pix], axis=0)
    grids = frame_grids(image_grid_thw, video_grid_thw)
    n = int(sum(h * w for _, h, w in grids))
    if n != pixels.shape[0]:
        raise ValueError(f"pixel rows ({pixels.shape[0]}) do not match the grids (sum of t*h*w = {n})")
    hpos, wpos = vision_patch_positions(grids, v.spatial_merge_size)
    sizes = grids[:, 1] * grids[:, 2]
    seg = np.repeat(np.arange(1, len(grids) + 1), sizes).astype(np.int32)
    seg_h = np.repeat(grids[:, 1], sizes).astype(np.int32)
    seg_w = np.repeat(grids[:, 2], sizes).astype(np.int32)
    m2 = v.spatial_merge_size**2
    total = n if pad_to is None else pad_to
    if total < n or total % m2:
        raise ValueError(f"vision pad length {total} must be >= {n} and a multiple of {m2}")
    pad = total - n

    def padded(a, fill=0):
        return np.concatenate([a, np.full((pad, *a.shape[1:]), fill, a.dtype)]) if pad else a

    out = {"pixel_values": padded(pixels), "hpos": padded(hpos), "wpos": padded(wpos),
           "segment_ids": padded(seg), "seg_h": padded(seg_h, 1), "seg_w": padded(seg_w, 1)}
    out.update(vision_attention_layout(sizes.tolist(), total, attention_layout))
    return out


def prepare_inputs(
    cfg: Glm4vConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    mm_token_type_ids: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    vision_pad_to: int | None = None,
    vision_attention: str = "auto",
) -> ModelInputs:
    """HF-processor arrays -> ModelInputs. Checks that placeholders and vision tokens agree.

    `vision_attention`: the vision tower's attention layout, "auto" (cheaper of dense / grouped), "dense" or
    "grouped" (see vision.py)."""
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    types = mm_token_types(ids, cfg) if mm_token_type_ids is None else np.asarray(mm_token_type_ids, np.int32)
    types = np.where(mask > 0, types, 0)
    m2 = cfg.vision.spatial_merge_size**2
    positions, deltas = get_rope_index(ids, types, image_grid_thw, video_grid_thw, mask, cfg.vision.spatial_merge_size)
    vision = pack_vision(cfg, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, vision_pad_to,
                         vision_attention)
    vision_index = None
    n_img = int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // m2 if image_grid_thw is not None else 0
    n_vid = int(np.prod(np.asarray(video_grid_thw), axis=-1).sum()) // m2 if video_grid_thw is not None else 0
    if int((types == 1).sum()) != n_img or int((types == 2).sum()) != n_vid:
        raise ValueError(f"placeholder tokens do not match the media: {(types == 1).sum()} image tokens for "
                         f"{n_img} image features, {(types == 2).sum()} video tokens for {n_vid} video features")
    if vision is not None:
        flat = types.reshape(-1)
        idx = np.full(flat.shape, -1, np.int64)
        idx[flat == 1] = np.arange(n_img)
        idx[flat == 2] = n_img + np.arange(n_vid)
        vision_index = idx.reshape(types.shape).astype(np.int32)
    return ModelInputs(ids, positions, mask, deltas, vision, vision_index)


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
    m2 = cfg.vision.spatial_merge_size**2
    n = 8
    vision = {"pixel_values": jnp.zeros((m2, cfg.vision.patch_dim), jnp.float32),
              "hpos": jnp.zeros((m2,), jnp.int32), "wpos": jnp.zeros((m2,), jnp.int32),
              "segment_ids": jnp.ones((m2,), jnp.int32), "seg_h": jnp.full((m2,), 2, jnp.int32),
              "seg_w": jnp.full((m2,), 2, jnp.int32)}
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
