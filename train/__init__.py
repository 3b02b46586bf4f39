"""glm41v_train: supervised fine-tuning of GLM-4.1V on the glm41v_jax library.

Data: conversations in the HF messages format (sources.py: JSONL lines; tfds_builder.py: a TFDS dataset) -> tokens
with labels (encode.py: chat template; assistant content + one <|endoftext|>) -> packed, fixed-shape batches
(packing.py), read through grain (data.py: seeded order, per-host shards, checkpointable iterator state).

Training: `loop.train(cfg)` runs a `trainer.Trainer` (config.py, the jitted step.py with loss.py and optim.py,
distributed.py for the hosts' agreement, assembly.py for the global batch, params.py, checkpoint.py, evaluate.py,
metrics.py, run_lock.py).

    it = make_iterator(DataConfig(jsonl="train.jsonl", seq_len=4096, batch_size=8), checkpoint_dir)
    batch = next(it)   # input_ids, labels, segment_ids, positions, vision_index, vision
    it.stats           # samples, truncated, skipped_<reason>, packing_efficiency, ...

The data names below are loaded on first use, so that modules which do not read data do not import grain.
"""

import importlib

_LAZY = {
    "ConversationEncoder": "encode", "DataError": "encode", "SKIP_REASONS": "encode",
    "DataConfig": "data", "SftIterator": "data", "make_dataset": "data", "make_iterator": "data",
    "JsonlSource": "sources",
    "DataConfigError": "packing",
    "FirstFitPacker": "packing", "PackedBatchDataset": "packing", "assemble_batch": "packing",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
