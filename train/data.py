"""SFT data: conversations (JSONL or TFDS) -> packed, fixed-shape batches, through grain.

    it = make_iterator(DataConfig(jsonl="train.jsonl", seq_len=4096, batch_size=8), checkpoint_dir)
    batch = next(it)   # input_ids, labels, segment_ids, positions, vision_index, vision
    it.stats           # samples, truncated, skipped_<reason>, packing_efficiency, ...

The parts: the records (sources.py: JSONL lines; tfds_builder.py: a TFDS dataset), one record -> one sample
(encode.py: chat template, labels, truncation, the bad-data policy), samples -> batches (packing.py). This module
builds the grain pipeline: `MapDataset.source(records).shuffle(seed)[shard::shards].repeat(epochs).map(encoder)`,
then `to_iter_dataset`, `mp_prefetch` (decoding in `worker_count` processes), then the packer. Order depends only
on the seed (each epoch reshuffled); each host reads only its slice; `get_state`/`set_state` resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
from absl import flags

from glm41v_jax.config import Glm4vConfig

from .encode import ConversationEncoder, EncodeRecords
from .packing import DataConfigError, PackedBatchDataset
from .sources import JsonlSource

# ---------------------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training config. Exactly one of `jsonl`, `tfds_dir`, `tfds_name` is set."""

    jsonl: str | tuple[str, ...] | None = None  # JSONL file(s); media relative to each file's folder
    tfds_dir: str | None = None  # a prepared TFDS dataset folder (.../name/config/version)
    tfds_name: str | None = None  # a registered TFDS dataset name ("name/config:version"), with tfds_data_dir
    tfds_data_dir: str | None = None
    split: str = "train"  # TFDS split
    media_root: str | None = None  # overrides the media root (JSONL: the file's folder; TFDS: embedded media only)
    seq_len: int = 4096  # tokens per row
    batch_size: int = 8  # rows per host batch
    max_patches: int = 16384  # vision patches per host batch (a multiple of merge**2); the static patch bucket
    packing: bool = True  # several samples per row; False: one sample per row, padded
    open_batches: int = 4  # the first-fit packer's buffer, in batches
    loss_on_thinking: bool = True
    on_error: str = "skip"  # "skip" (counted) | "raise"
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever (reshuffled each epoch)
    worker_count: int = 0  # grain worker processes that decode media and tokenise (0: in this process)
    worker_buffer_size: int = 2  # elements each worker prepares ahead
    read_threads: int = 1  # threads per process running the encoder (grain ReadOptions.num_threads)
    read_buffer: int = 8  # elements prefetched per process (grain ReadOptions.prefetch_buffer_size)

    def __post_init__(self) -> None:
        if isinstance(self.jsonl, list):
            object.__setattr__(self, "jsonl", tuple(self.jsonl))
        given = [k for k in ("jsonl", "tfds_dir", "tfds_name") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"data: set exactly one of jsonl, tfds_dir, tfds_name (got {given or 'none'})")
        for k in ("seq_len", "batch_size", "max_patches", "open_batches", "read_threads", "read_buffer"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ValueError(f"data.{k} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("worker_count", "worker_buffer_size"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise ValueError(f"data.{k} must be a non-negative integer, got {getattr(self, k)!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs <= 0):
            raise ValueError(f"data.num_epochs must be a positive integer or None, got {self.num_epochs!r}")


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.


def make_source(cfg: DataConfig) -> Any:
    """The grain source of the config's records: JSONL lines, or the examples of a TFDS dataset."""
    if cfg.jsonl:
        return JsonlSource(cfg.jsonl, cfg.media_root)
    from .tfds_builder import TfdsSource  # tensorflow-datasets is an optional dependency

    return TfdsSource(builder_dir=cfg.tfds_dir, name=cfg.tfds_name, data_dir=cfg.tfds_data_dir, split=cfg.split,
                      media_root=cfg.media_root)


def _source_name(cfg: DataConfig, section: str = "data") -> str:
    if cfg.jsonl:
        return f"{section}.jsonl " + ", ".join([cfg.jsonl] if isinstance(cfg.jsonl, str) else cfg.jsonl)
    return f"{section}.tfds {cfg.tfds_dir or cfg.tfds_name}"


def make_dataset(cfg: DataConfig, checkpoint_dir: str, shard_index: int | None = None,
                 shard_count: int | None = None, model_cfg: Any = None, section: str = "data") -> grain.IterDataset:
    """The grain pipeline: an IterDataset of (batch, stats) pairs (see packing.py for both). `section` names the
    config section in error messages ("data", "eval").

    Shards default to (jax.process_index(), jax.process_count()): host i reads records i, i + n, ... of each epoch's
    shuffled order."""
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if model_cfg is None:
        model_cfg = Glm4vConfig.from_file(checkpoint_dir)
    m2 = model_cfg.vision.spatial_merge_size**2
    if cfg.max_patches % m2:
        raise DataConfigError(f"data.max_patches ({cfg.max_patches}) must be a multiple of {m2} (spatial_merge_size^2 "
                              "of the model)")
    encoder = ConversationEncoder(checkpoint_dir, cfg.seq_len, cfg.max_patches, cfg.loss_on_thinking)
    pad_id = encoder.processor.pad_token_id  # also checks the checkpoint's tokenizer loads, before any worker starts
    source = make_source(cfg)
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds[shard_index::shard_count]
    if len(source) == 0:
        raise DataConfigError(f"{_source_name(cfg, section)}: no records (the data is empty or only blank lines)")
    if len(ds) == 0:
        raise DataConfigError(f"{_source_name(cfg, section)}: shard {shard_index} of {shard_count} has no records "
                              f"({len(source)} in all, fewer than the hosts)")
    per_epoch = len(ds)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(EncodeRecords(encoder, cfg.on_error))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if cfg.worker_count:
        # grain reads its absl flags when it starts workers; outside absl.app they are unparsed
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return PackedBatchDataset(it, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_patches=cfg.max_patches,
                              model_cfg=model_cfg, pad_id=pad_id, packing=cfg.packing, open_batches=cfg.open_batches,
                              records_per_epoch=per_epoch, name=_source_name(cfg, section))


class SftIterator(grain.DatasetIterator):
    """Yields batches (the train step's kwargs + labels); `stats` holds the counters as of the last batch.

    A grain DatasetIterator: `get_state()` / `set_state()` (JSON-able dicts) and orbax's
    `grain.checkpoint.CheckpointSave/CheckpointRestore` resume exactly."""

    def __init__(self, parent: grain.DatasetIterator) -> None:
        super().__init__(parent)
        self.stats: dict[str, Any] = {}

    def __next__(self) -> dict[str, Any]:
        batch, self.stats = next(self._parent)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def make_iterator(cfg: DataConfig, checkpoint_dir: str, shard_index: int | None = None,
                  shard_count: int | None = None, model_cfg: Any = None, section: str = "data") -> SftIterator:
    """`make_dataset(...)` as an iterator of batches; see SftIterator."""
    return SftIterator(iter(make_dataset(cfg, checkpoint_dir, shard_index, shard_count, model_cfg, section)))
