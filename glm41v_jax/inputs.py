"""The host-side input contract: the arrays every compiled program takes, and the rules that build them (NumPy).

* `VisionInputs`: every image and video frame of a batch as one packed patch sequence (P rows, images first, then
  video frames; padding rows at the end) with its per-patch metadata and the attention plan (vision_plan.py).
* `ModelInputs`: the text arrays, the vision pack and the vision-token gather index of one static-shape batch.

Both are `flax.struct` pytrees (jit, device_put and tree_map take them whole). Each array field declares its logical
axes (names of `sharding.LOGICAL_RULES`; the packed patch axis P is a "batch" axis: its rows are independent outside
attention) and its padding value in the field's metadata, so shardings and padding derive from the fields
(`map_with_axes`, `pad_values`), never from key names.

The rules, each written once here:
  * token types (`token_types`): 2 for `<|image|>` inside a `<|begin_of_video|>` span, 1 for any other
    `<|image|>`, else 0 (docs/MODEL.md §5.3);
  * the vision-token gather index (`vision_index`): position (b, t) takes vision token `vision_index[b, t]`, -1 =
    keep the text embedding. Image tokens take the image features in order, video tokens the video features in
    order, over the flattened batch (the same as transformers' `masked_scatter` whenever that is defined);
  * padding values: the `pad` of each field (P rows of padding: segment 0, grid 1 x 1; text: segment 0, index -1);
  * the prompt's M-RoPE positions (`get_rope_index`, docs/MODEL.md §4.4) and the packed patch positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import numpy as np

from .config import Glm4vConfig
from .errors import Glm41vError
from .vision_plan import PLANS, plan_tables


class InputError(Glm41vError, ValueError):
    """Model inputs that do not agree with each other (placeholder tokens vs media grids, pixel rows vs grids, a
    vision pad length that does not fit); the message says what was expected."""


def _field(axes: tuple[str | None, ...], pad: int | float | None = 0, **kw: Any) -> Any:
    """An array field with its logical axes and its padding value (None: derived, see the class)."""
    return flax.struct.field(pytree_node=True, metadata={"axes": axes, "pad": pad}, **kw)


def _array_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "axes" in f.metadata]


# ---------------------------------------------------------------------------------------------------------------
# The vision pack.


@flax.struct.dataclass
class VisionInputs:
    """Packed patches (P rows, a multiple of merge**2) and their metadata; padding rows have segment 0.

    `attn_groups` / `attn_inverse` hold the grouped attention plan (vision_plan.py): `()` and None for the dense
    plan. Their shapes are statics of the compiled programs, like P.
    """

    pixel_values: Any = _field(("batch", None), 0.0)  # (P, C*T*p*p) float32, rows ordered (C, T, py, px)
    hpos: Any = _field(("batch",))  # (P,) int32 patch row inside its image/frame
    wpos: Any = _field(("batch",))  # (P,) int32 patch column
    segment_ids: Any = _field(("batch",))  # (P,) int32 1, 2, ... per image/frame; 0 = padding
    seg_h: Any = _field(("batch",), 1)  # (P,) int32 the segment's height in patches (padding: 1)
    seg_w: Any = _field(("batch",), 1)  # (P,) int32 the segment's width in patches (padding: 1)
    attn_groups: tuple[Any, ...] = _field((None, None), -1, default=())  # (n_g, L_g) int32 packed rows, -1 empty
    attn_inverse: Any = _field(("batch",), None, default=None)  # (P,) int32 slot of each row; padding: one past

    @property
    def grouped(self) -> bool:
        return bool(self.attn_groups)

    @property
    def num_patches(self) -> int:
        return int(np.shape(self.pixel_values)[-2])

    def _pad_of(self, f: dataclasses.Field) -> Any:
        if f.name == "attn_inverse":  # padding rows point one past the last slot of the concatenated groups
            return sum(int(np.prod(np.shape(g)[-2:])) for g in self.attn_groups)
        return f.metadata["pad"]

    def map_with_axes(self, fn: Callable[[tuple[str | None, ...], Any], Any]) -> VisionInputs:
        """The same structure with `fn(logical_axes, array)` at every array (e.g. its sharding)."""
        out = {}
        for f in _array_fields(type(self)):
            val = getattr(self, f.name)
            if f.name == "attn_groups":
                out[f.name] = tuple(fn(f.metadata["axes"], g) for g in val)
            else:
                out[f.name] = None if val is None else fn(f.metadata["axes"], val)
        return VisionInputs(**out)

    def pad_to(self, total: int) -> VisionInputs:
        """P -> `total` rows of padding at the end (the plan's tables stay valid: padding is in no group)."""
        n = self.num_patches
        if total < n:
            raise InputError(f"vision pad length {total} is shorter than the {n} packed patches")
        if total == n:
            return self

        def pad(f: dataclasses.Field, a: np.ndarray) -> np.ndarray:
            a = np.asarray(a)
            return np.concatenate([a, np.full((total - n, *a.shape[1:]), self._pad_of(f), a.dtype)])

        return self.replace(**{f.name: pad(f, getattr(self, f.name)) for f in _array_fields(type(self))
                               if f.name != "attn_groups" and getattr(self, f.name) is not None})

    def empty_like(self) -> VisionInputs:
        """All padding, with this pack's structure, shapes and dtypes (e.g. a host's missing eval batch)."""
        return self.replace(**{f.name: (tuple(np.full_like(g, self._pad_of(f)) for g in getattr(self, f.name))
                                        if f.name == "attn_groups" else
                                        np.full_like(getattr(self, f.name), self._pad_of(f)))
                               for f in _array_fields(type(self)) if getattr(self, f.name) is not None})

    @classmethod
    def empty(cls, patches: int, patch_dim: int) -> VisionInputs:
        """`patches` rows of padding, dense plan: the pack of a batch without media."""
        z = np.zeros((patches,), np.int32)
        return cls(np.zeros((patches, patch_dim), np.float32), z, z, z, z, z).empty_like()

    def offset(self, segments: int) -> VisionInputs:
        """Segment ids moved up by `segments` (0 stays padding): packs concatenated along P (several hosts' packs in
        one global one) must not share a segment id, since the dense plan masks by segment equality over all P."""
        if self.grouped:
            raise InputError("packs with the grouped vision attention plan cannot be concatenated; use the dense "
                             "plan (vision_attention='dense')")
        seg = np.asarray(self.segment_ids)
        return self.replace(segment_ids=np.where(seg > 0, seg + segments, 0).astype(seg.dtype))


def frame_grids(image_grid_thw: np.ndarray | None, video_grid_thw: np.ndarray | None) -> np.ndarray:
    """Per-frame (1, h, w) segments in the packing order of the vision tower: all images, then video frames."""
    rows = []
    for grids in (image_grid_thw, video_grid_thw):
        if grids is not None:
            for t, h, w in np.asarray(grids).reshape(-1, 3):
                rows += [(1, h, w)] * int(t)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def vision_patch_positions(grids: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-major (row, col) of every patch, segment after segment (docs/MODEL.md §3.2)."""
    hs, ws = [], []
    for t, h, w in np.asarray(grids).reshape(-1, 3):
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        r = r.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        c = c.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        hs.append(np.tile(r, int(t)))
        ws.append(np.tile(c, int(t)))
    if not hs:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
    return np.concatenate(hs).astype(np.int32), np.concatenate(ws).astype(np.int32)


def pack_vision(cfg: Glm4vConfig, pixel_values: np.ndarray | None, image_grid_thw: np.ndarray | None,
                pixel_values_videos: np.ndarray | None, video_grid_thw: np.ndarray | None,
                pad_to: int | None = None, vision_attention: str = "auto") -> VisionInputs | None:
    """Images then video frames as one VisionInputs (None without media), padded to `pad_to` rows.

    `vision_attention`: the attention plan, "auto" (the cheaper of dense and grouped), "dense" or "grouped"
    (vision_plan.py)."""
    if vision_attention not in PLANS:
        raise InputError(f"vision_attention must be one of {', '.join(PLANS)}; got {vision_attention!r}")
    v = cfg.vision
    pix = [p for p in (pixel_values, pixel_values_videos) if p is not None and len(p)]
    if not pix:
        return None
    pixels = np.concatenate([np.asarray(p, np.float32).reshape(-1, v.patch_dim) for p in pix], axis=0)
    grids = frame_grids(image_grid_thw, video_grid_thw)
    n = int(sum(h * w for _, h, w in grids))
    if n != pixels.shape[0]:
        raise InputError(f"pixel rows ({pixels.shape[0]}) do not match the grids (sum of t*h*w = {n})")
    m2 = v.spatial_merge_size**2
    total = n if pad_to is None else int(pad_to)
    if total < n or total % m2:
        raise InputError(f"vision pad length {total} must be >= {n} (the patches) and a multiple of {m2}")
    hpos, wpos = vision_patch_positions(grids, v.spatial_merge_size)
    sizes = grids[:, 1] * grids[:, 2]
    per_patch = lambda a: np.repeat(a, sizes).astype(np.int32)  # noqa: E731
    groups, inverse = plan_tables(sizes.tolist(), total, vision_attention)
    packed = VisionInputs(pixels, hpos, wpos, per_patch(np.arange(1, len(grids) + 1)), per_patch(grids[:, 1]),
                          per_patch(grids[:, 2]))
    return packed.pad_to(total).replace(attn_groups=groups, attn_inverse=inverse)


# ---------------------------------------------------------------------------------------------------------------
# Token rules.


def token_types(input_ids: np.ndarray, image_token_id: int, video_start_id: int, video_end_id: int) -> np.ndarray:
    """The processor's rule (per row, int32): 2 for `<|image|>` inside a video span, 1 for other `<|image|>`,
    0 otherwise."""
    ids = np.asarray(input_ids)
    is_img = ids == image_token_id
    depth = np.cumsum(ids == video_start_id, axis=-1) - np.cumsum(ids == video_end_id, axis=-1)
    return np.where(is_img, np.where(depth > 0, 2, 1), 0).astype(np.int32)


def mm_token_types(input_ids: np.ndarray, cfg: Glm4vConfig) -> np.ndarray:
    """`token_types` with the config's token ids."""
    return token_types(input_ids, cfg.image_token_id, cfg.video_start_token_id, cfg.video_end_token_id)


def vision_index(types: np.ndarray, image_base: int = 0, video_base: int = 0) -> np.ndarray:
    """Token types -> the int32 gather index into the vision tokens (-1 = text): image tokens, in row-major order,
    take image_base, image_base + 1, ...; video tokens video_base, video_base + 1, ..."""
    t = np.asarray(types)
    flat = t.reshape(-1)
    idx = np.full(flat.shape, -1, np.int64)
    idx[flat == 1] = image_base + np.arange(int((flat == 1).sum()))
    idx[flat == 2] = video_base + np.arange(int((flat == 2).sum()))
    return idx.reshape(t.shape).astype(np.int32)


def offset_vision_index(index: np.ndarray, tokens: int) -> np.ndarray:
    """A gather index moved up by `tokens` vision tokens (-1 stays text): the pack it points into now starts later."""
    index = np.asarray(index)
    return np.where(index >= 0, index + tokens, -1).astype(index.dtype)


def get_rope_index(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, S) int32 M-RoPE positions and (B,) rope deltas, as `Glm4vModel.get_rope_index` (docs/MODEL.md §4.4).

    Runs of text advance all three rows together; each image / video-frame run of merged grid (h', w') gets
    t = cur, h = cur + i, w = cur + j and then cur += max(h', w'). Padded slots get 0.
    delta[b] = max position + 1 - (number of real tokens), so decode token s has position s + delta on all rows.
    """
    input_ids = np.asarray(input_ids)
    types = np.asarray(mm_token_type_ids)
    b, s = input_ids.shape
    mask = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {1: iter(frame_grids(image_grid_thw, None)), 2: iter(frame_grids(None, video_grid_thw))}
    pos = np.zeros((3, b, s), np.int64)
    deltas = np.zeros((b,), np.int64)
    m = spatial_merge_size
    for row in range(b):
        tt = types[row][mask[row]]
        chunks = []
        cur = 0
        i = 0
        n = tt.shape[0]
        while i < n:
            j = i
            while j < n and tt[j] == tt[i]:
                j += 1
            kind = int(tt[i])
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
            else:
                try:
                    _, gh, gw = next(grids[kind])
                except StopIteration:
                    raise InputError(f"more {'image' if kind == 1 else 'video'} token runs than grids") from None
                hh, ww = gh // m, gw // m
                if hh * ww != j - i:
                    raise InputError(f"a {'image' if kind == 1 else 'video frame'} run of {j - i} tokens does not "
                                     f"match its grid ({gh}x{gw} patches = {hh * ww} tokens)")
                r, c = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
                chunks.append(np.stack([np.full(hh * ww, cur), cur + r.reshape(-1), cur + c.reshape(-1)]))
                cur += max(hh, ww)
            i = j
        p = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        pos[:, row, mask[row]] = p
        deltas[row] = (p.max() + 1 - n) if n else 0
    return pos.astype(np.int32), deltas.astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# The model's inputs.


@flax.struct.dataclass
class ModelInputs:
    """Everything one compiled forward/prefill takes, with static (bucketed) shapes."""

    input_ids: Any = _field(("batch", "length"), 0)  # (B, T) int32; padding: any id (segment 0 masks it)
    positions: Any = _field((None, "batch", "length"))  # (3, B, T) int32 M-RoPE (t, h, w); padding 0
    segment_ids: Any = _field(("batch", "length"))  # (B, T) int32 0 = padding
    vision_index: Any = _field(("batch", "length"), -1, default=None)  # (B, T) int32 -1 = text (None: no media)
    vision: VisionInputs | None = flax.struct.field(pytree_node=True, default=None)
    rope_deltas: Any = _field(("batch",), default=None)  # (B,) int32 decode offset (host only, not a model input)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Glm4v.__call__`."""
        return dict(input_ids=self.input_ids, positions=self.positions, segment_ids=self.segment_ids,
                    vision=self.vision, vision_index=self.vision_index)

    @classmethod
    def axes(cls) -> dict[str, tuple[str | None, ...]]:
        """Logical axes of each text array, by field name."""
        return {f.name: f.metadata["axes"] for f in _array_fields(cls)}

    @classmethod
    def pad_values(cls) -> dict[str, int]:
        """Padding value of each text array, by field name."""
        return {f.name: f.metadata["pad"] for f in _array_fields(cls)}


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

    `vision_attention`: the vision tower's attention plan, "auto", "dense" or "grouped" (vision_plan.py)."""
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    types = mm_token_types(ids, cfg) if mm_token_type_ids is None else np.asarray(mm_token_type_ids, np.int32)
    types = np.where(mask > 0, types, 0)
    m2 = cfg.vision.spatial_merge_size**2
    positions, deltas = get_rope_index(ids, types, image_grid_thw, video_grid_thw, mask, cfg.vision.spatial_merge_size)
    vision = pack_vision(cfg, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, vision_pad_to,
                         vision_attention)
    n_img = int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // m2 if image_grid_thw is not None else 0
    n_vid = int(np.prod(np.asarray(video_grid_thw), axis=-1).sum()) // m2 if video_grid_thw is not None else 0
    if int((types == 1).sum()) != n_img or int((types == 2).sum()) != n_vid:
        raise InputError(f"placeholder tokens do not match the media: {(types == 1).sum()} image tokens for "
                         f"{n_img} image features, {(types == 2).sum()} video tokens for {n_vid} video features")
    index = None if vision is None else vision_index(types, 0, n_img)
    return ModelInputs(ids, positions, mask, index, vision, deltas)
