"""Packing samples into fixed-shape batches (NumPy, host side), and the grain stage that does it.

Batch (per host; B rows of T tokens; every shape static), the contract with the train step:
    input_ids     (B, T) int32    padding: the tokenizer's pad id
    labels        (B, T) int32    aligned with input_ids (the loss shifts: logits at t predict labels[t+1]);
                                  -100 = ignored; the first token of every segment is never a label
    segment_ids   (B, T) int32    1, 2, ... per sample in the row; 0 = padding
    positions     (3, B, T) int32 M-RoPE (t, h, w): each sample's own `get_rope_index` positions, restarting at 0
    vision_index  (B, T) int32    -1 = text; else the index of the vision token (merged patch group) this position
                                  takes, in the order of `vision`
    vision        VisionInputs    `glm41v_jax.inputs.pack_vision` of all images of the batch (row-major sample
                                  order), then all video frames (row-major), padded to `max_patches` rows, dense
                                  attention plan; always present (all padding when the batch has no media)
`Glm4v.apply({"params": p}, **{k: v for k, v in batch.items() if k != "labels"})` runs it.

Packing (first fit, deterministic): up to `open_batches` batches are open at once. A sample goes into the first open
batch with room for its patches (`max_patches` per batch) and, in it, the first row with room for its tokens (unpacked
mode: the first empty row). When it fits nowhere, all open batches are emitted, in the order they were opened, and
a new group starts with that sample. Iterator state: the parent's state at the start of the group being emitted,
the number of its batches already emitted and the counters at that point; restoring re-reads the group from the
parent (its samples are decoded again) and skips what was already emitted, so a resumed run yields the same batches.

Stats (with every batch, cumulative over this iterator's life): records, samples, truncated, skipped and
skipped_<reason>, batches, tokens (real tokens emitted), slots (B*T per batch), label_tokens,
packing_efficiency = tokens / slots, batch_efficiency (this batch).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import grain
import numpy as np

from glm41v_jax.errors import Glm41vError
from glm41v_jax.inputs import ModelInputs, VisionInputs, mm_token_types, pack_vision, vision_index

from .loss import IGNORE_INDEX

logger = logging.getLogger("glm41v_train.packing")


class DataConfigError(Glm41vError, ValueError):
    """A data configuration problem (not a bad record): an empty file or shard, a bad `max_patches`, a chat
    template that cannot be split by turn, data of which no record is usable. Always raised, whatever `on_error`
    says."""


_READ_KEYS = ("records", "samples", "truncated", "skipped")
_EMIT_KEYS = ("batches", "tokens", "slots", "label_tokens")


# ---------------------------------------------------------------------------------------------------------------
# First-fit packer (pure Python over sample dicts).


class FirstFitPacker:
    """Assigns samples to rows of open batches; `take()` returns the batches (lists of rows of samples)."""

    def __init__(self, seq_len: int, batch_size: int, max_patches: int, packing: bool = True,
                 open_batches: int = 1) -> None:
        self.seq_len, self.batch_size, self.max_patches = seq_len, batch_size, max_patches
        self.packing, self.open_batches = packing, open_batches
        self._batches: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, sample: dict[str, Any]) -> bool:
        """Place the sample; False if it fits in no open batch and no new batch may be opened."""
        n, p = len(sample["input_ids"]), num_patches(sample)
        if n > self.seq_len or p > self.max_patches:
            raise ValueError(f"{sample.get('where')}: sample of {n} tokens / {p} patches exceeds the row "
                             f"({self.seq_len} tokens) or batch ({self.max_patches} patches) budget")
        for b in self._batches:
            if b["patches"] + p > self.max_patches:
                continue
            for r, row in enumerate(b["rows"]):
                if (not row if not self.packing else b["lengths"][r] + n <= self.seq_len):
                    row.append(sample)
                    b["lengths"][r] += n
                    b["patches"] += p
                    return True
        if len(self._batches) >= self.open_batches:
            return False
        self._batches.append({"rows": [[] for _ in range(self.batch_size)], "lengths": [0] * self.batch_size,
                              "patches": 0})
        return self.add(sample)

    def take(self) -> list[list[list[dict[str, Any]]]]:
        out = [b["rows"] for b in self._batches]
        self._batches = []
        return out


def num_patches(sample: dict[str, Any]) -> int:
    return len(sample["pixel_values"]) + len(sample["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------------------------
# Batch assembly.


def assemble_batch(rows: list[list[dict[str, Any]]], *, seq_len: int, max_patches: int, model_cfg: Any,
                   pad_id: int) -> dict[str, Any]:
    """Rows of samples (as encoded by encode.ConversationEncoder) -> the batch dict (module docstring)."""
    b = len(rows)
    pads = ModelInputs.pad_values()
    input_ids = np.full((b, seq_len), pad_id, np.int32)
    labels = np.full((b, seq_len), IGNORE_INDEX, np.int32)
    segment_ids = np.full((b, seq_len), pads["segment_ids"], np.int32)
    positions = np.full((3, b, seq_len), pads["positions"], np.int32)
    index = np.full((b, seq_len), pads["vision_index"], np.int32)
    m2 = model_cfg.vision.spatial_merge_size**2
    samples = [s for row in rows for s in row]
    n_img_tokens = sum(int(np.prod(s["image_grid_thw"], -1).sum()) // m2 for s in samples)
    img_base, vid_base = 0, n_img_tokens
    for r, row in enumerate(rows):
        t = 0
        for seg, s in enumerate(row, 1):
            n = len(s["input_ids"])
            sl = slice(t, t + n)
            input_ids[r, sl] = s["input_ids"]
            labels[r, sl] = s["labels"]
            labels[r, t] = IGNORE_INDEX  # the first token of a segment is never a label (nothing predicts it)
            segment_ids[r, sl] = seg
            positions[:, r, sl] = s["positions"]
            types = mm_token_types(s["input_ids"], model_cfg)
            index[r, sl] = vision_index(types, img_base, vid_base)
            img_base += int((types == 1).sum())
            vid_base += int((types == 2).sum())
            t += n
    if img_base != n_img_tokens:
        raise ValueError(f"image placeholder tokens ({img_base}) do not match the image grids ({n_img_tokens})")

    def cat(key, width):
        parts = [s[key] for s in samples if len(s[key])]
        return np.concatenate(parts).reshape(-1, width) if parts else None

    patch_dim = model_cfg.vision.patch_dim
    vision = pack_vision(model_cfg, cat("pixel_values", patch_dim), cat("image_grid_thw", 3),
                         cat("pixel_values_videos", patch_dim), cat("video_grid_thw", 3), pad_to=max_patches,
                         vision_attention="dense")
    if vision is None:
        vision = VisionInputs.empty(max_patches, patch_dim)
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "positions": positions,
            "vision_index": index, "vision": vision}


def batch_counts(rows: list[list[dict[str, Any]]], seq_len: int) -> dict[str, int]:
    """Emission counters of one batch (computed from the samples, so a restore can account skipped batches)."""
    samples = [s for row in rows for s in row]
    return {"batches": 1, "tokens": sum(len(s["input_ids"]) for s in samples), "slots": len(rows) * seq_len,
            "label_tokens": sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)}


# ---------------------------------------------------------------------------------------------------------------
# The grain stage.


class PackedBatchDataset(grain.IterDataset):
    """samples (or {"skip": reason, ...} records) -> (batch, stats) pairs."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, max_patches: int, model_cfg: Any,
                 pad_id: int, packing: bool = True, open_batches: int = 4, records_per_epoch: int | None = None,
                 name: str = "the data") -> None:
        super().__init__(parent)
        self.spec = dict(seq_len=seq_len, batch_size=batch_size, max_patches=max_patches, model_cfg=model_cfg,
                         pad_id=pad_id, packing=packing, open_batches=open_batches,
                         records_per_epoch=records_per_epoch, name=name)

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), **self.spec)

    def __str__(self) -> str:
        s = self.spec
        return (f"PackedBatchDataset(seq_len={s['seq_len']}, batch_size={s['batch_size']}, "
                f"max_patches={s['max_patches']}, packing={s['packing']})")


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, batch_size: int, max_patches: int,
                 model_cfg: Any, pad_id: int, packing: bool, open_batches: int, records_per_epoch: int | None = None,
                 name: str = "the data") -> None:
        super().__init__(parent)
        self._seq_len, self._batch_size, self._max_patches = seq_len, batch_size, max_patches
        # Consecutive skipped records. 2 x an epoch of them in a row means that no record is usable (any window of
        # 2 epochs holds a whole one): with repeating epochs the reader would otherwise skip forever.
        self._records_per_epoch, self._name, self._skip_run = records_per_epoch, name, 0
        self._model_cfg, self._pad_id = model_cfg, pad_id
        self._packer = FirstFitPacker(seq_len, batch_size, max_patches, packing, open_batches)
        self._reset(self._parent.get_state(), dict.fromkeys(_READ_KEYS, 0), dict.fromkeys(_EMIT_KEYS, 0))

    def _reset(self, start: Any, read: dict[str, int], emit: dict[str, int], skip: int = 0) -> None:
        self._start, self._start_read, self._start_emit = start, dict(read), dict(emit)
        self._read, self._emit = dict(read), dict(emit)
        self._packer.take()
        self._ready: list[list[list[dict[str, Any]]]] = []  # finalized batches not yet emitted
        self._emitted = 0  # batches of the current group already emitted
        self._skip = skip  # batches to drop after a restore (already emitted before the checkpoint)
        self._next_start: tuple[Any, dict[str, int]] | None = None
        self._exhausted = False

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start, "emitted": self._emitted + self._skip, "read": dict(self._start_read),
                "emit": dict(self._start_emit)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._reset(copy.deepcopy(state["parent"]), state["read"], state["emit"], int(state["emitted"]))

    def _count(self, elem: dict[str, Any]) -> None:
        self._read["records"] += 1
        self._skip_run = self._skip_run + 1 if "skip" in elem else 0
        if self._records_per_epoch and self._skip_run >= 2 * self._records_per_epoch:
            why = ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in sorted(self._read.items())
                            if k.startswith("skipped_"))
            raise DataConfigError(f"{self._name}: no usable record; every record of this host's shard "
                                  f"({self._records_per_epoch} per epoch) was skipped, twice over ({why}, then "
                                  f"{elem.get('skip')}: {elem.get('message')}); see the skipped records logged above")
        if "skip" in elem:
            self._read["skipped"] += 1
            key = f"skipped_{elem['skip']}"
            self._read[key] = self._read.get(key, 0) + 1
            logger.warning("skipped %s (%s): %s", elem["where"], elem["skip"], elem["message"])
        else:
            self._read["samples"] += 1
            self._read["truncated"] += bool(elem["truncated"])

    def _fill(self) -> None:
        """Read samples until a group of batches is finalized (or the parent is exhausted)."""
        while not self._ready and not self._exhausted:
            prior, prior_read = self._parent.get_state(), dict(self._read)
            try:
                elem = next(self._parent)
            except StopIteration:
                self._exhausted = True
                self._ready = self._packer.take()
                self._next_start = (prior, prior_read)
                if not self._ready:  # nothing pending: the state is the end state
                    self._start, self._start_read, self._start_emit = prior, prior_read, dict(self._emit)
                break
            self._count(elem)
            if "skip" in elem or self._packer.add(elem):
                continue
            self._ready = self._packer.take()
            self._next_start = (prior, prior_read)  # the next group starts by re-reading this sample
            if not self._packer.add(elem):
                raise AssertionError("a sample that fits the budgets must fit an empty packer")

    def _pop(self) -> list[list[dict[str, Any]]]:
        rows = self._ready.pop(0)
        for k, v in batch_counts(rows, self._seq_len).items():
            self._emit[k] += v
        self._emitted += 1
        if not self._ready:  # the group is done: the state moves to the start of the next one
            self._start, self._start_read = self._next_start
            self._start_emit = dict(self._emit)
            self._emitted = 0
        return rows

    def __next__(self) -> tuple[dict[str, Any], dict[str, Any]]:
        while True:
            self._fill()
            if not self._ready:
                raise StopIteration
            if not self._skip:
                break
            self._pop()
            self._skip -= 1
        rows = self._pop()
        batch = assemble_batch(rows, seq_len=self._seq_len, max_patches=self._max_patches,
                               model_cfg=self._model_cfg, pad_id=self._pad_id)
        this = batch_counts(rows, self._seq_len)
        stats: dict[str, Any] = {**self._read, **self._emit}
        stats["packing_efficiency"] = stats["tokens"] / stats["slots"]
        stats["batch_efficiency"] = this["tokens"] / this["slots"]
        return batch, stats

    def __str__(self) -> str:
        return f"PackedBatchIterator(seq_len={self._seq_len}, batch_size={self._batch_size})"
