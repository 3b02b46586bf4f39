"""Host side of a generation request: processor arrays in, a bucketed `PreparedBatch` out, results back.

`collate` merges per-request processor outputs into one batch; `prepare_batch` re-lays it out left-padded to the
buckets of `buckets.py` and checks every limit before any device work; `synthetic_inputs` builds processor-like
arrays of given sizes, so `Engine.warmup` can compile programs for them. `GenerationError` is the error of a request
that cannot be served; `GenerationResult` is one generated sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .buckets import bucket_length, cache_length, round_up, vision_bucket
from .config import Glm4vConfig
from .errors import Glm41vError
from .inputs import prepare_inputs


class GenerationError(Glm41vError, ValueError):
    """A request that cannot be served (too long for the context, bad arguments, ...). The message says why."""


@dataclasses.dataclass
class GenerationResult:
    """One generated sequence. `token_ids` includes the stopping eos id, if one was produced (as HF does)."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    timings: dict[str, float]
    num_compiles: int


def read_eos_ids(checkpoint_dir: str | os.PathLike | None, cfg: Glm4vConfig) -> tuple[int, ...]:
    """generation_config.json's eos_token_id when present, else the model config's eos ids."""
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError):
                eos = None
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list) and eos and all(isinstance(e, int) for e in eos):
                return tuple(eos)
    return tuple(cfg.text.eos_token_ids)


_HF_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(encoded: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Per-request processor outputs (one prompt each) -> one left-padded batch, media concatenated in row order.

    The result is what the processor returns for several prompts at once: the vision features of row 0's images come
    first, then row 1's, ...; videos likewise (after all images, as the model packs them).
    """
    if not encoded:
        raise GenerationError("no requests to collate")
    rows, types = [], []
    for i, enc in enumerate(encoded):
        ids = np.asarray(enc["input_ids"])
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise GenerationError(f"request {i}: expected one prompt, got input_ids of shape {ids.shape}")
        mask = np.asarray(enc.get("attention_mask", np.ones_like(ids))).reshape(ids.shape) > 0
        rows.append(ids[0][mask[0]])
        tt = enc.get("mm_token_type_ids")
        types.append(None if tt is None else np.asarray(tt).reshape(ids.shape)[0][mask[0]])
    n = max(len(r) for r in rows)
    out: dict[str, Any] = {
        "input_ids": np.full((len(rows), n), pad_token_id, np.int64),
        "attention_mask": np.zeros((len(rows), n), np.int64),
    }
    for b, r in enumerate(rows):
        out["input_ids"][b, n - len(r):] = r
        out["attention_mask"][b, n - len(r):] = 1
    if all(t is not None for t in types):
        out["mm_token_type_ids"] = np.zeros((len(rows), n), np.int64)
        for b, t in enumerate(types):
            out["mm_token_type_ids"][b, n - len(t):] = t
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [(np.asarray(e[pix]), np.asarray(e[grid])) for e in encoded if e.get(grid) is not None
                 and len(e[grid])]
        if parts:
            out[pix] = np.concatenate([p for p, _ in parts], axis=0)
            out[grid] = np.concatenate([g for _, g in parts], axis=0)
    return out


@dataclasses.dataclass
class PreparedBatch:
    """A left-padded, bucketed batch ready for the prefill program."""

    model_kwargs: dict[str, Any]  # input_ids, positions, segment_ids, vision, vision_index (NumPy)
    prompt_token_ids: list[list[int]]  # the real rows (batch padding rows excluded)
    next_positions: np.ndarray  # (B,) M-RoPE position of the first generated token
    limits: np.ndarray  # (B,) max new tokens per row (padding rows: 1)
    prompt_len: int  # T, the padded prompt length
    max_len: int  # S, cache slots


def _as_limits(max_new_tokens: int | Sequence[int], n: int) -> np.ndarray:
    if isinstance(max_new_tokens, (int, np.integer)):
        lim = np.full((n,), int(max_new_tokens), np.int64)
    else:
        lim = np.asarray(list(max_new_tokens), np.int64)
        if lim.shape != (n,):
            raise GenerationError(f"max_new_tokens: expected one int or {n} ints (one per row), got {lim.shape[0]}")
    if (lim < 1).any():
        raise GenerationError(f"max_new_tokens must be >= 1, got {int(lim.min())}")
    return lim


def prepare_batch(cfg: Glm4vConfig, inputs: Mapping[str, Any], max_new_tokens: int | Sequence[int],
                  prompt_bucket: Callable[[int], int] = bucket_length,
                  patch_bucket: Callable[[int], int] | None = vision_bucket,
                  max_context: int | None = None, pad_batch_to: int | None = None) -> PreparedBatch:
    """Processor output (input_ids, attention_mask, mm_token_type_ids, pixel_values, ...) -> PreparedBatch.

    Rows are re-laid-out left-padded (whatever padding side they came with) to `prompt_bucket(longest)`. With
    `pad_batch_to`, extra one-token rows (limit 1, no media) fill the batch to that many rows. Every limit is checked
    here, before any device work.
    """
    if "input_ids" not in inputs:
        raise GenerationError("inputs have no 'input_ids'")
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise GenerationError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask).reshape(ids.shape)
    types = inputs.get("mm_token_type_ids")
    types = None if types is None else np.asarray(types).reshape(ids.shape)
    rows = [ids[b][mask[b] > 0] for b in range(ids.shape[0])]
    if any(len(r) == 0 for r in rows):
        raise GenerationError("empty prompt (a row has no tokens)")
    limits = _as_limits(max_new_tokens, len(rows))
    limit = cfg.text.max_position_embeddings if max_context is None else int(max_context)
    for b, r in enumerate(rows):
        if len(r) + limits[b] > limit:
            raise GenerationError(f"{'prompt' if len(rows) == 1 else f'row {b}: prompt'} of {len(r)} tokens + "
                                  f"max_new_tokens {int(limits[b])} = {len(r) + int(limits[b])} is too long for the "
                                  f"context of {limit} tokens")
    n_real_rows = len(rows)
    if pad_batch_to is not None:
        if pad_batch_to < n_real_rows:
            raise GenerationError(f"batch of {n_real_rows} rows does not fit pad_batch_to={pad_batch_to}")
        filler = np.asarray([cfg.text.pad_token_id])
        rows += [filler] * (pad_batch_to - n_real_rows)
        limits = np.concatenate([limits, np.ones((pad_batch_to - n_real_rows,), np.int64)])
    longest = max(len(r) for r in rows)
    t = prompt_bucket(longest)
    bsz = len(rows)
    new_ids = np.full((bsz, t), cfg.text.pad_token_id, np.int32)
    new_mask = np.zeros((bsz, t), np.int32)
    new_types = None if types is None else np.zeros((bsz, t), np.int32)
    for b, r in enumerate(rows):
        new_ids[b, t - len(r):] = r
        new_mask[b, t - len(r):] = 1
        if types is not None and b < n_real_rows:
            new_types[b, t - len(r):] = types[b][mask[b] > 0]
    media = {k: (None if inputs.get(k) is None else np.asarray(inputs[k])) for k in _HF_KEYS}
    n_patches = sum(int(np.prod(g, axis=-1).sum()) for g in (media["image_grid_thw"], media["video_grid_thw"])
                    if g is not None)
    m2 = cfg.vision.spatial_merge_size**2
    pad_to = None
    if n_patches and patch_bucket is not None:
        pad_to = patch_bucket(n_patches)
    try:
        mi = prepare_inputs(cfg, new_ids, new_mask, new_types, media["pixel_values"], media["image_grid_thw"],
                            media["pixel_values_videos"], media["video_grid_thw"],
                            vision_pad_to=None if pad_to is None else round_up(pad_to, m2))
    except ValueError as e:
        raise GenerationError(str(e)) from e
    n_real = new_mask.sum(-1).astype(np.int32)
    next_pos = (n_real + mi.rope_deltas).astype(np.int32)
    reach = next_pos.astype(np.int64) + limits
    if int(reach.max()) > cfg.text.max_position_embeddings:
        b = int(reach.argmax())
        raise GenerationError(f"prompt positions reach {int(next_pos[b])} + max_new_tokens {int(limits[b])} exceeds "
                              f"the model's {cfg.text.max_position_embeddings} positions")
    return PreparedBatch(mi.as_kwargs(), [r.astype(int).tolist() for r in rows[:n_real_rows]], next_pos,
                         limits.astype(np.int32), t, cache_length(t, int(limits.max())))


def synthetic_inputs(cfg: Glm4vConfig, batch: int = 1, prompt_tokens: int = 32, images: Sequence[Sequence[int]] = (),
                     videos: Sequence[Sequence[int]] = (), **_: Any) -> dict[str, np.ndarray]:
    """Processor-like arrays of the given sizes (zero pixels, placeholder tokens in row 0) for `Engine.warmup`.

    images: (height, width) in pixels after resizing; videos: (frames, height, width)."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    m2 = v.spatial_merge_size**2

    def grid(t: int, h: int, w: int) -> list[int]:
        if h % unit or w % unit or h <= 0 or w <= 0:
            raise GenerationError(f"warmup: media sizes must be positive multiples of {unit} px, got {h}x{w}")
        return [max(t // v.temporal_patch_size, 1), h // v.patch_size, w // v.patch_size]

    img_grids = [grid(v.temporal_patch_size, int(h), int(w)) for h, w in images]
    vid_grids = [grid(int(f), int(h), int(w)) for f, h, w in videos]
    toks: list[int] = []
    for g in img_grids:
        toks += [cfg.image_start_token_id] + [cfg.image_token_id] * (int(np.prod(g)) // m2) + [cfg.image_end_token_id]
    for g in vid_grids:
        toks.append(cfg.video_start_token_id)
        for _ in range(g[0]):
            toks += [cfg.image_start_token_id] + [cfg.image_token_id] * (g[1] * g[2] // m2)
            toks.append(cfg.image_end_token_id)
        toks.append(cfg.video_end_token_id)
    n = max(int(prompt_tokens), len(toks) + 1)
    ids = np.zeros((batch, n), np.int64)
    ids[0, : len(toks)] = toks
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if img_grids:
        out["image_grid_thw"] = np.asarray(img_grids, np.int64)
        out["pixel_values"] = np.zeros((int(np.prod(out["image_grid_thw"], -1).sum()), v.patch_dim), np.float32)
    if vid_grids:
        out["video_grid_thw"] = np.asarray(vid_grids, np.int64)
        out["pixel_values_videos"] = np.zeros((int(np.prod(out["video_grid_thw"], -1).sum()), v.patch_dim),
                                              np.float32)
    return out
