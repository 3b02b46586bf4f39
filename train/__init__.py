"""glm41v_train: supervised fine-tuning of GLM-4.1V on the glm41v_jax library.

Data (data.py, packing.py): conversations in the HF messages format (JSONL, or a TFDS dataset built by
tfds_builder.py) -> tokens with labels (chat template; assistant content + one <|endoftext|>) -> packed, fixed-shape
batches, read through grain (seeded order, per-host shards, checkpointable iterator state).

    it = make_iterator(DataConfig(jsonl="train.jsonl", seq_len=4096, batch_size=8), checkpoint_dir)
    batch = next(it)   # input_ids, labels, segment_ids, positions, vision_index, vision
    it.stats           # samples, truncated, skipped_<reason>, packing_efficiency, ...

The data names below are loaded on first use, so that modules which do not read data do not import grain.
"""

import importlib

_LAZY = {
    "ConversationEncoder": "data", "DataConfig": "data", "DataConfigError": "data", "DataError": "data",
    "JsonlSource": "data",
    "SKIP_REASONS": "data", "SftIterator": "data", "make_dataset": "data", "make_iterator": "data",
    "FirstFitPacker": "packing", "PackedBatchDataset": "packing", "assemble_batch": "packing",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
