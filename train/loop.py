"""The SFT training run: `train(cfg)`, what one run does, and where each part lives.

    from glm41v_train.config import load_config
    from glm41v_train.loop import train
    summary = train(load_config("train.yaml", ["optim.peak_lr=2e-5"]))

What one run does (every process runs the same code):
  1. `jax.distributed.initialize` when several processes take part (coordinator flags, or automatic on TPU VMs;
     distributed.py).
  2. The run lock on output_dir (run_lock.py: one run per output_dir), the mesh (`mesh: data=D,fsdp=F,tensor=T`),
     the jitted step (step.py), the checkpoint manager (checkpoint.py); the `Trainer` (trainer.py) holds them.
  3. Resume (`resume: auto`): the latest checkpoint in output_dir/checkpoints (or `resume_step`) restores params,
     optimizer state, step, the loop's PRNG key and this host's data-iterator state. Otherwise the model's weights
     (HF dir, converted dir or hub id) are read on every host as NumPy and placed, fp32, stacked, sharded
     (params.py).
  4. Each host reads its own data shard (records host, host + n, ... of each epoch) and builds its `batch_size`
     rows; the global batch is assembled with `jax.make_array_from_process_local_data` (assembly.py).
  5. Steps: every host runs the same steps on identical shapes (static buckets: seq_len, batch_size, max_patches).
     The only cross-host decisions (stop for a preemption, stop when a finite dataset runs out) are taken together
     through a `HostReport` all-gathered before each step (distributed.py), so every host stops at the same step.
  6. Checkpoints every `save_every` steps and at the end (asynchronous, keep-last-K, atomic; checkpoint.py).
     SIGTERM: the step in flight finishes, a checkpoint of it is written (synchronously), and the process exits 0.
  7. Metrics on process 0: metrics.jsonl (one line per step), TensorBoard, a tqdm bar (metrics.py); the held-out
     loss every `eval.every` steps (evaluate.py).
  8. At the end, the final weights in the converted format: output_dir/final (`glm41v generate --model`), replaced
     atomically when it holds another step (final/training.json names its step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from .config import TrainConfig
from .distributed import initialize_distributed
from .trainer import Preemption, Trainer


def train(cfg: TrainConfig, *, coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, distributed: str = "auto") -> dict[str, Any]:
    """Run (or continue) a training run. Returns {"status": "completed" | "preempted" | "exhausted", "step",
    "output_dir", "final"}."""
    cfg = absolute_paths(cfg)
    with Preemption() as preempt, contextlib.ExitStack() as stack:  # SIGTERM from the very start
        initialize_distributed(coordinator, num_processes, process_id, distributed)
        return Trainer(cfg, preempt, stack).run()


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its file paths made absolute against the working directory, as a user typing them expects
    (not against the config file's folder): output_dir, model (when it names an existing local path; otherwise it is
    a hub id, or missing and reported by the loader), the data and eval files, media_root, the TFDS folders."""

    def absolute(p):
        if p is None:
            return None
        if isinstance(p, (tuple, list)):
            return tuple(absolute(x) for x in p)
        return os.path.abspath(os.path.expanduser(p))

    model = cfg.model
    if os.path.exists(os.path.expanduser(model)):
        model = absolute(model)
    data = dataclasses.replace(cfg.data, jsonl=absolute(cfg.data.jsonl), media_root=absolute(cfg.data.media_root),
                               tfds_dir=absolute(cfg.data.tfds_dir), tfds_data_dir=absolute(cfg.data.tfds_data_dir))
    ev = None if cfg.eval is None else dataclasses.replace(cfg.eval, jsonl=absolute(cfg.eval.jsonl))
    return dataclasses.replace(cfg, model=model, output_dir=absolute(cfg.output_dir), data=data, eval=ev)


__all__ = ["absolute_paths", "train"]
