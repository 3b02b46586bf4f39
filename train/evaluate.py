"""Held-out loss: the token-weighted mean loss of params over a data file (`glm41v loss`, and `eval:` in training).

Sums of token losses and label counts are added up in float64 on the host, so the mean is over all label tokens of
the file, packed or not. In training each host reads its shard of the eval file once, at the start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .assembly import empty_batch, global_batch
from .config import TrainConfig, TrainConfigError
from .data import make_iterator
from .distributed import allgather
from .packing import assemble_batch
from .step import TrainStep


class LossEvaluator:
    """Token-weighted loss of a params tree over batches: sums and counts, added up in float64 on the host.

    Batches are NumPy host batches of one shape (they are assembled into global arrays like training batches)."""

    def __init__(self, ts: TrainStep, max_patches: int) -> None:
        if ts.sc.accum_steps != 1:
            raise ValueError("the evaluator runs one batch at a time (accum_steps=1)")
        self.ts, self.max_patches = ts, max_patches

    def batch_loss(self, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        gb = global_batch(batch, self.ts, self.max_patches)
        return self.ts.loss_fn(gb)(params, gb)  # (a LoRA step: params are the adapters, on its base)

    def run(self, params: Any, batches) -> tuple[float, float, int]:
        """(sum of token losses, label tokens, batches) over an iterable of host batches."""
        total, count, n = 0.0, 0.0, 0
        pending = []
        for batch in batches:
            pending.append(self.batch_loss(params, batch))
            n += 1
            if len(pending) >= 8:  # bound the number of in-flight results
                for s, c in jax.device_get(pending):
                    total, count = total + float(s), count + float(c)
                pending = []
        for s, c in jax.device_get(pending):
            total, count = total + float(s), count + float(c)
        return total, count, n


class HeldOutEval:
    """The `eval:` section: every host reads its shard of the eval file once, at the start (kept in memory), hosts
    pad to the same number of batches with empty ones, and the loss is the token-weighted mean over the whole
    file."""

    def __init__(self, cfg: TrainConfig, model_cfg: Any, model_dir: str, mesh, step: TrainStep | None = None
                 ) -> None:
        ec = cfg.eval
        self.every = ec.every
        self.data_cfg = dataclasses.replace(
            cfg.data, jsonl=ec.jsonl, tfds_dir=None, tfds_name=None, seq_len=ec.seq_len or cfg.data.seq_len,
            batch_size=ec.batch_size or cfg.data.batch_size, max_patches=ec.max_patches or cfg.data.max_patches,
            shuffle=False, num_epochs=1, worker_count=0)
        self.max_batches = ec.max_batches
        self.model_cfg, self.model_dir = model_cfg, model_dir
        # the training step's program with accum_steps=1 (a LoRA step shares its base)
        self.ts = step.for_eval() if step is not None else TrainStep(model_cfg, cfg.optim, mesh,
                                                                      dataclasses.replace(cfg.step, accum_steps=1))
        self.evaluator = LossEvaluator(self.ts, self.data_cfg.max_patches)
        # Read now, not at the first eval: a problem with the eval file stops the run before it trains.
        self._batches: list[dict[str, Any]] | None = self._load()

    def _load(self) -> list[dict[str, Any]]:
        it = make_iterator(self.data_cfg, self.model_dir, jax.process_index(), jax.process_count(), self.model_cfg,
                           section="eval")
        batches = []
        for b in it:
            batches.append(b)
            if self.max_batches is not None and len(batches) >= self.max_batches:
                break
        it.close()
        counts = allgather(np.asarray(len(batches), np.int32))
        n = int(counts.max())
        if n == 0:
            raise TrainConfigError(f"eval.jsonl {self.data_cfg.jsonl}: no usable samples")
        like = batches[0] if batches else None
        if like is None:  # this host's shard is all skipped samples: build the padding from the static shapes
            like = assemble_batch([[] for _ in range(self.data_cfg.batch_size)], seq_len=self.data_cfg.seq_len,
                                  max_patches=self.data_cfg.max_patches, model_cfg=self.model_cfg, pad_id=0)
        batches += [empty_batch(like) for _ in range(n - len(batches))]
        return batches

    def __call__(self, params: Any) -> tuple[float, float]:
        if self._batches is None:
            self._batches = self._load()
        total, count, _ = self.evaluator.run(params, self._batches)
        return total / max(count, 1.0), count


__all__ = ["HeldOutEval", "LossEvaluator"]
