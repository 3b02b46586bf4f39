"""The SFT training loop: config -> mesh -> params -> steps, with checkpoints, preemption, metrics, multi-host.

    from glm41v_train.config import load_config
    from glm41v_train.loop import train
    summary = train(load_config("train.yaml", ["optim.peak_lr=2e-5"]))

What one run does (every process runs the same code):
  1. `jax.distributed.initialize` when several processes take part (coordinator flags, or automatic on TPU VMs).
  2. The run lock on output_dir (train/run_lock.py: one run per output_dir), the mesh (`mesh: data=D,fsdp=F,tensor=T`),
     the jitted step (train/step.py), the checkpoint manager.
  3. Resume (`resume: auto`): the latest checkpoint in output_dir/checkpoints (or `resume_step`) restores params,
     optimizer state, step, the loop's PRNG key and this host's data-iterator state. Otherwise the model's weights
     (HF dir, converted dir or hub id) are read on every host as NumPy and placed, fp32, stacked, sharded.
  4. Each host reads its own data shard (records host, host + n, ... of each epoch) and builds its `batch_size`
     rows; the global batch is assembled with `jax.make_array_from_process_local_data` (`global_batch`).
  5. Steps: every host runs exactly `steps` steps on identical shapes (static buckets: seq_len, batch_size,
     max_patches). The only cross-host decisions (stop for a preemption, stop when a finite dataset runs out) are
     taken together: each step the hosts all-gather a few numbers (their flags, token and FLOP counts), so every
     host stops at the same step.
  6. Checkpoints every `save_every` steps and at the end (asynchronous, keep-last-K, atomic; train/checkpoint.py).
     SIGTERM: the step in flight finishes, a checkpoint of it is written (synchronously), and the process exits 0.
  7. Metrics on process 0: metrics.jsonl (one line per step), TensorBoard, a tqdm bar (train/metrics.py).
  8. At the end, the final weights in the converted format: output_dir/final (`glm41v generate --model`), replaced
     atomically when it holds another step (final/training.json names its step).
Non-finite steps: the step does not apply them (train/step.py); the loop reads them from the metrics it fetches
anyway (every log_every steps and before each checkpoint) and stops after `nonfinite_patience` in a row, with no
checkpoint or final weights written from them (TrainingDivergedError, exit code 2).

Multi-host batches. Host i holds rows [i*B, (i+1)*B) of the global batch and patches [i*P, (i+1)*P) of the global
vision pack (P = max_patches, the same static bucket on every host). Text arrays need no change (rows are
independent, segment ids and M-RoPE positions are per row). The vision pack is one flat sequence over all hosts, so
each host offsets its own (`offset_vision`): `vision_index` + i * P / merge^2 (the host's first merged vision token
in the global pack; -1 stays -1), and the vision `segment_ids` + i * P (a host's pack has at most P frames, so the
ranges never overlap; 0 = padding stays 0), so that the vision tower's attention never mixes patches of different
hosts. This needs the dense vision layout (what the packer emits) and the P axis sharded over the batch axes
(`step.vision_sharding: batch`, with P a multiple of merge^2 x the batch shards per host): each host's patches then
live on its own devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from glm41v_jax.errors import Glm41vError
from glm41v_jax.loading import CheckpointError, load, resolve_model_dir
from glm41v_jax.sharding import MeshError, make_mesh
from glm41v_jax.weights import get_path

from .checkpoint import TrainCheckpointer, save_final
from .config import TrainConfig, TrainConfigError
from .loss import loss_and_count
from .metrics import FlopCounter, MetricsWriter, device_peak_tflops
from .run_lock import RunLock, RunLockedError
from .step import TrainStep, stack_batches

logger = logging.getLogger("glm41v_train.loop")

_LAYER_GROUPS = {("language_model", "layers"), ("visual", "blocks")}


# ---------------------------------------------------------------------------------------------------------------
# Distributed setup.


def _on_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and \
        importlib.util.find_spec("libtpu") is not None


def check_coordinator(address: str) -> None:
    """`--coordinator` must be HOST:PORT (an IPv6 host in brackets: [::1]:1234), port in [1, 65535]."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    why = None
    if not sep:
        why = "expected HOST:PORT"
    elif not bare:
        why = "the host is empty (expected HOST:PORT)"
    elif any(c.isspace() for c in bare) or (":" in bare) != bracketed:
        why = "the host part is not a host name or address (an IPv6 address goes in brackets: [::1]:1234)"
    elif not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        why = f"the port {port!r} is not an integer in [1, 65535]"
    if why:
        raise TrainConfigError(f"--coordinator {address!r}: {why}")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, mode: str = "auto") -> None:
    """`jax.distributed.initialize` when several processes take part. Explicit: all three of coordinator
    (host:port), num_processes and process_id. `mode`: "auto" (initialize on Cloud TPU VMs, where jax finds the
    pod's hosts itself), "on" (always, with jax's cluster auto-detection), "off" (never, unless explicit)."""
    explicit = [coordinator, num_processes, process_id]
    if jax.distributed.is_initialized():
        return
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise TrainConfigError("--coordinator, --num-processes and --process-id go together (all three or none)")
        check_coordinator(coordinator)
        if num_processes < 1:
            raise TrainConfigError(f"--num-processes {num_processes}: expected an integer >= 1")
        if not 0 <= process_id < num_processes:
            raise TrainConfigError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return
    if mode == "on" or (mode == "auto" and _on_tpu_vm()):
        try:
            jax.distributed.initialize()
        except Exception as e:  # noqa: BLE001  (cluster detection failures come in many types)
            raise TrainConfigError(f"jax.distributed.initialize() failed ({type(e).__name__}: {e}); on a single "
                                   "host run with --distributed off, or pass --coordinator/--num-processes/"
                                   "--process-id") from None


def _allgather(x: np.ndarray) -> np.ndarray:
    """(n_processes, *x.shape) NumPy; the identity (with a leading axis) on one process."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


# ---------------------------------------------------------------------------------------------------------------
# Batch geometry and global assembly.


def batch_shards_per_host(mesh) -> int:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(n // jax.process_count(), 1)


def check_geometry(cfg: TrainConfig, mesh, model_cfg) -> None:
    """Shapes the multi-host assembly needs, checked before anything compiles (errors name the field)."""
    pc = jax.process_count()
    sources = [("data", cfg.data)] + ([("eval", cfg.eval)] if cfg.eval is not None else [])
    m2 = model_cfg.vision.spatial_merge_size ** 2
    for name, src in sources:
        p = src.max_patches or cfg.data.max_patches
        if p % m2:
            raise TrainConfigError(f"{name}.max_patches ({p}) must be a multiple of {m2} (the model's "
                                   f"spatial_merge_size^2: each merged vision token takes {m2} patches)")
    if pc == 1:
        return
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if n % pc:
        raise TrainConfigError(f"mesh: the batch axes data x fsdp = {n} must be a multiple of the process count {pc}"
                               " (each host feeds whole batch shards)")
    per_host = n // pc
    # Each host's devices must hold a contiguous block of batch shards, in process order.
    devs = np.asarray(mesh.devices)
    for d in range(devs.shape[0]):
        for f in range(devs.shape[1]):
            for dev in devs[d, f].reshape(-1):
                if dev.process_index != (d * devs.shape[1] + f) // per_host:
                    raise TrainConfigError("mesh: the device order does not give each host a contiguous block of "
                                           "batch shards; build the mesh from jax.devices() (process-major)")
    for name, src in sources:
        b = src.batch_size or cfg.data.batch_size
        p = src.max_patches or cfg.data.max_patches
        if b % per_host:
            raise TrainConfigError(f"{name}.batch_size ({b}) must be a multiple of the batch shards per host "
                                   f"({per_host} = data x fsdp / processes)")
        if p % (m2 * per_host):
            raise TrainConfigError(f"{name}.max_patches ({p}) must be a multiple of {m2 * per_host} (merge^2 x the "
                                   "batch shards per host) with several hosts: the vision pack is split by host")
    if cfg.step.vision_sharding != "batch":
        raise TrainConfigError("step.vision_sharding must be 'batch' with several hosts (each host's patches live "
                               "on its own devices)")


def offset_vision(batch: Mapping[str, Any], host: int, max_patches: int, merge2: int) -> dict[str, Any]:
    """Host `host`'s batch with its vision references moved into the global vision pack (module docstring)."""
    out = dict(batch)
    if host == 0:
        return out
    vis = dict(batch["vision"])
    if "attn_groups" in vis or "attn_inverse" in vis:
        raise ValueError("multi-host assembly needs the dense vision layout (no attn_groups)")
    seg = np.asarray(vis["segment_ids"])
    vis["segment_ids"] = np.where(seg > 0, seg + host * max_patches, 0).astype(seg.dtype)
    out["vision"] = vis
    vi = np.asarray(batch["vision_index"])
    out["vision_index"] = np.where(vi >= 0, vi + host * (max_patches // merge2), -1).astype(vi.dtype)
    return out


def global_shapes(batch: Mapping[str, Any], n_hosts: int, lead: int) -> dict[str, Any]:
    """The global shapes of a host batch: rows (text) and patches (vision) times the number of hosts."""

    def grow(x, axis):
        shape = list(np.shape(x))
        shape[axis] *= n_hosts
        return jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype)

    out = {}
    for key, val in batch.items():
        if key == "vision":
            out[key] = {k: grow(v, lead) for k, v in val.items()}
        elif key == "positions":
            out[key] = grow(val, lead + 1)
        else:
            out[key] = grow(val, lead)
    return out


def global_batch(batch: Mapping[str, Any], ts: TrainStep, max_patches: int, lead: int = 0) -> dict[str, Any]:
    """This host's NumPy batch -> global jax arrays (every host calls it with its own batch)."""
    host, n = jax.process_index(), jax.process_count()
    merge2 = ts.cfg.vision.spatial_merge_size ** 2
    local = offset_vision(batch, host, max_patches, merge2) if n > 1 else dict(batch)
    shapes = global_shapes(local, n, lead)
    shardings = ts.batch_shardings(shapes)
    return jax.tree.map(lambda x, s, g: jax.make_array_from_process_local_data(s, np.asarray(x), g.shape),
                        local, shardings, shapes)


def empty_batch(like: Mapping[str, Any]) -> dict[str, Any]:
    """A batch of padding with the shapes of `like`: no tokens, no labels (pads hosts with fewer eval batches)."""
    out = {k: np.zeros_like(v) for k, v in like.items() if k != "vision"}
    out["labels"] = np.full_like(like["labels"], -100)
    out["vision_index"] = np.full_like(like["vision_index"], -1)
    vis = {k: np.zeros_like(v) for k, v in like["vision"].items()}
    for k in ("seg_h", "seg_w"):
        if k in vis:
            vis[k] = np.ones_like(vis[k])
    out["vision"] = vis
    return out


def sample_fingerprints(batch: Mapping[str, Any]) -> list[str]:
    """sha1 (16 hex) of each packed sample's int32 input_ids, row-major: which samples a host's batch holds."""
    ids = np.asarray(batch["input_ids"])
    seg = np.asarray(batch["segment_ids"])
    ids, seg = ids.reshape(-1, ids.shape[-1]), seg.reshape(-1, seg.shape[-1])
    out = []
    for r in range(ids.shape[0]):
        for s in range(1, int(seg[r].max(initial=0)) + 1):
            out.append(hashlib.sha1(ids[r][seg[r] == s].astype(np.int32).tobytes()).hexdigest()[:16])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Params.


def place_unrolled(params: Mapping[str, Any], ts: TrainStep) -> Any:
    """Unrolled host params (NumPy, any float dtype) -> the step's stacked fp32 global arrays. Each device's shard
    is cut (and the layers stacked) on the host by `jax.make_array_from_callback`: no full fp32 or stacked copy
    is made, and it works the same on every host."""
    flat = jax.tree_util.tree_flatten_with_path(ts.abstract_params)[0]
    shardings = jax.tree.leaves(ts.param_shardings)
    leaves = []
    for (path, abstract), sharding in zip(flat, shardings, strict=True):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        if names[:2] in _LAYER_GROUPS:
            n_layers = abstract.shape[0]
            layers = [get_path(params, (names[0], f"{names[1]}_{i}") + names[2:]) for i in range(n_layers)]
            got = (n_layers, *np.shape(layers[0]))

            def cb(idx, layers=layers):
                sel = range(len(layers))[idx[0]]
                return np.stack([np.asarray(layers[i][idx[1:]], np.float32) for i in sel])
        else:
            leaf = get_path(params, names)
            got = tuple(np.shape(leaf))

            def cb(idx, leaf=leaf):
                return np.asarray(leaf[idx], np.float32)
        if got != tuple(abstract.shape):
            raise CheckpointError(f"param {'/'.join(names)}: shape {got}, expected {tuple(abstract.shape)}")
        leaves.append(jax.make_array_from_callback(tuple(abstract.shape), sharding, cb))
    return jax.tree.unflatten(jax.tree.structure(ts.abstract_params), leaves)


def load_params(model_dir: str, ts: TrainStep) -> Any:
    params, _ = load(model_dir, as_numpy=True)
    return place_unrolled(params, ts)


def abstract_state(ts: TrainStep) -> tuple[Any, Any]:
    """(params, opt_state) as ShapeDtypeStructs with their shardings: the restore targets."""
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    params = jax.tree.map(sds, ts.abstract_params, ts.param_shardings)
    opt = jax.eval_shape(ts.tx.init, ts.abstract_params)
    return params, jax.tree.map(sds, opt, ts.opt_shardings)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (also `glm41v loss`).


class LossEvaluator:
    """Token-weighted loss of a params tree over batches: sums and counts, added up in float64 on the host.

    Batches are NumPy host batches of one shape (they are assembled into global arrays like training batches)."""

    def __init__(self, ts: TrainStep, max_patches: int) -> None:
        if ts.sc.accum_steps != 1:
            raise ValueError("the evaluator runs one batch at a time (accum_steps=1)")
        self.ts, self.max_patches = ts, max_patches
        self._fns: dict[Any, Any] = {}

    def batch_loss(self, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        gb = global_batch(batch, self.ts, self.max_patches)
        key = jax.tree.structure(gb), tuple(x.shape for x in jax.tree.leaves(gb))
        fn = self._fns.get(key)
        if fn is None:
            cfg, chunk = self.ts.cfg, self.ts.sc.loss_chunk
            rep = NamedSharding(self.ts.mesh, PartitionSpec())
            fn = jax.jit(lambda p, b: loss_and_count(p, b, cfg, chunk_size=chunk),
                         in_shardings=(self.ts.param_shardings, self.ts.batch_shardings(gb)),
                         out_shardings=(rep, rep))
            self._fns[key] = fn
        return fn(params, gb)

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

    def __init__(self, cfg: TrainConfig, model_cfg: Any, model_dir: str, mesh) -> None:
        ec = cfg.eval
        self.every = ec.every
        self.data_cfg = dataclasses.replace(
            cfg.data, jsonl=ec.jsonl, tfds_dir=None, tfds_name=None, seq_len=ec.seq_len or cfg.data.seq_len,
            batch_size=ec.batch_size or cfg.data.batch_size, max_patches=ec.max_patches or cfg.data.max_patches,
            shuffle=False, num_epochs=1, worker_count=0)
        self.max_batches = ec.max_batches
        self.model_cfg, self.model_dir = model_cfg, model_dir
        self.ts = TrainStep(model_cfg, cfg.optim, mesh, dataclasses.replace(cfg.step, accum_steps=1))
        self.evaluator = LossEvaluator(self.ts, self.data_cfg.max_patches)
        # Read now, not at the first eval: a problem with the eval file stops the run before it trains.
        self._batches: list[dict[str, Any]] | None = self._load()

    def _load(self) -> list[dict[str, Any]]:
        from .data import make_iterator

        it = make_iterator(self.data_cfg, self.model_dir, jax.process_index(), jax.process_count(), self.model_cfg,
                           section="eval")
        batches = []
        for b in it:
            batches.append(b)
            if self.max_batches is not None and len(batches) >= self.max_batches:
                break
        it.close()
        counts = _allgather(np.asarray(len(batches), np.int32))
        n = int(counts.max())
        if n == 0:
            raise TrainConfigError(f"eval.jsonl {self.data_cfg.jsonl}: no usable samples")
        like = batches[0] if batches else None
        if like is None:  # this host's shard is all skipped samples: build the padding from the static shapes
            from .packing import assemble_batch

            like = assemble_batch([[] for _ in range(self.data_cfg.batch_size)], seq_len=self.data_cfg.seq_len,
                                  max_patches=self.data_cfg.max_patches, model_cfg=self.model_cfg, pad_id=0)
        batches += [empty_batch(like) for _ in range(n - len(batches))]
        return batches

    def __call__(self, params: Any) -> tuple[float, float]:
        if self._batches is None:
            self._batches = self._load()
        total, count, _ = self.evaluator.run(params, self._batches)
        return total / max(count, 1.0), count


# ---------------------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
    """SIGTERM -> a flag the loop checks between steps (the previous handler is restored on exit)."""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self) -> _Preemption:
        with contextlib.suppress(ValueError):  # not the main thread: no handler (the flag stays False)
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _resume_step(cfg: TrainConfig, ckpt: TrainCheckpointer) -> int | None:
    steps = ckpt.steps()
    where = ckpt.directory
    if cfg.resume_step is not None:
        if cfg.resume == "never":
            raise TrainConfigError("resume_step is set but resume is 'never'")
        if cfg.resume_step not in steps:
            raise CheckpointError(f"resume_step {cfg.resume_step}: no such checkpoint in {where} "
                                  f"(have: {steps or 'none'})")
        return cfg.resume_step
    if cfg.resume == "never":
        if steps:
            raise CheckpointError(f"{where} already holds checkpoints {steps} and resume is 'never'; use another "
                                  "output_dir, remove them, or set resume: auto")
        return None
    if not steps:
        if cfg.resume == "required":
            raise CheckpointError(f"resume is 'required' but {where} holds no checkpoint")
        return None
    return steps[-1]


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(ln).get("step", 0) <= last_step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class TrainingDivergedError(Glm41vError):
    """The loss or the gradient norm became non-finite for more steps in a row than `nonfinite_patience` allows."""


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


def _take_lock(out_dir: str, stack: contextlib.ExitStack, primary: bool) -> str | None:
    """Process 0 locks output_dir for the job (train/run_lock.py); every process learns the outcome, so that all
    start or all stop. Returns the dead holder taken over, if any."""
    error, lock = None, None
    if primary:
        lock = RunLock(out_dir, processes=jax.process_count())
        try:
            lock.acquire()
            stack.callback(lock.release)
        except (RunLockedError, OSError) as e:
            error = e
    ok = _allgather(np.asarray([error is None], np.int32)).all()
    if error is not None:
        raise error
    if not ok:
        raise RunLockedError(f"output_dir {out_dir}: process 0 could not lock it (another training run uses it; "
                             "process 0's error names that run)")
    return lock.took_over if lock is not None else None


FINAL_INFO = "training.json"  # in output_dir/final: the step (and status) the final weights are from


def final_step(final: str) -> int | None:
    """The step of the weights in output_dir/final, from its training.json (None: no final, or not recorded)."""
    try:
        with open(os.path.join(final, FINAL_INFO), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _recover_final(final: str) -> str | None:
    """Leftovers of a final/ replacement cut by a kill (the run lock is held): the new copy in the making is removed;
    if the kill fell between the two renames, the previous final/ is put back. Returns a note, or None."""
    shutil.rmtree(final + ".tmp-new", ignore_errors=True)
    old = final + ".old"
    if os.path.isdir(old):
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
            return f"restored {final} (a replacement was interrupted)"
    return None


def _write_final(params: Any, model_cfg: Any, final: str, *, source_dir: str, dtype: str, step: int,
                 status: str) -> None:
    """output_dir/final <- the weights of `step`, replaced atomically: written beside it, then swapped in with two
    renames (a kill between them is repaired by `_recover_final` on the next start). All processes call it."""
    from .checkpoint import _sync

    new = final + ".tmp-new"
    if jax.process_index() == 0:
        shutil.rmtree(new, ignore_errors=True)
    _sync("glm41v_final_tmp")
    save_final(params, model_cfg, new, source_dir=source_dir, dtype=dtype)
    if jax.process_index() == 0:
        with open(os.path.join(new, FINAL_INFO), "w", encoding="utf-8") as f:
            json.dump({"step": step, "status": status}, f)
        if os.path.isdir(final):
            os.rename(final, final + ".old")
        os.rename(new, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    _sync("glm41v_final_swapped")


def train(cfg: TrainConfig, *, coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, distributed: str = "auto") -> dict[str, Any]:
    """Run (or continue) a training run. Returns {"status": "completed" | "preempted" | "exhausted", "step",
    "output_dir", "final"}."""
    cfg = absolute_paths(cfg)
    with _Preemption() as preempt, contextlib.ExitStack() as stack:  # SIGTERM from the very start
        initialize_distributed(coordinator, num_processes, process_id, distributed)
        return _train(cfg, preempt, stack)


def _train(cfg: TrainConfig, preempt: _Preemption, stack: contextlib.ExitStack) -> dict[str, Any]:
    from .data import make_iterator

    host, n_hosts = jax.process_index(), jax.process_count()
    primary = host == 0
    if not primary:
        logging.getLogger("glm41v_train").setLevel(logging.WARNING)
    out_dir = os.path.abspath(cfg.output_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainConfigError(f"output_dir {out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    took_over = _take_lock(out_dir, stack, primary)  # before anything in output_dir is read or written
    try:
        mesh = make_mesh(cfg.mesh)
    except MeshError as e:
        raise TrainConfigError(f"mesh: {str(e).removeprefix('--mesh: ')}") from None
    model_dir = resolve_model_dir(cfg.model)
    from glm41v_jax.config import Glm4vConfig

    model_cfg = Glm4vConfig.from_file(os.path.join(model_dir, "config.json"))
    check_geometry(cfg, mesh, model_cfg)
    ts = TrainStep(model_cfg, cfg.optim, mesh, cfg.step)
    lead = 1 if cfg.step.accum_steps > 1 else 0
    flops = FlopCounter(ts.cfg, ts.abstract_params, cfg.optim.freeze)
    peak = device_peak_tflops(jax.devices()[0].device_kind)

    ckpt = TrainCheckpointer(cfg.checkpoint_dir, keep_last=cfg.keep_last, async_save=cfg.async_save)
    stack.callback(ckpt.close)
    restore_step = _resume_step(cfg, ckpt)
    it = make_iterator(cfg.data, model_dir, host, n_hosts, model_cfg)
    stack.callback(it.close)
    t0 = time.perf_counter()
    if restore_step is not None and restore_step > cfg.steps:
        raise TrainConfigError(f"steps ({cfg.steps}) is below the step of the checkpoint to resume "
                               f"({ckpt.path(restore_step)}); raise steps, or set resume_step to a checkpoint at or "
                               f"below {cfg.steps}")
    if restore_step is not None:
        a_params, a_opt = abstract_state(ts)
        r = ckpt.restore(restore_step, abstract_params=a_params, abstract_opt_state=a_opt)
        params, opt_state, rng, start = r["params"], r["opt_state"], r["rng"], r["step"]
        it.set_state(r["data_state"])
        how = f"resumed from {ckpt.path(restore_step)}"
    else:
        params = load_params(model_dir, ts)
        opt_state = ts.init_opt_state(params)
        rng = np.asarray(jax.random.key_data(jax.random.PRNGKey(cfg.seed)), np.uint32)
        start = 0
        how = f"started from {model_dir}"
    if primary:
        import yaml

        with open(os.path.join(out_dir, "train_config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    samples_log = os.path.join(out_dir, f"samples.host{host}.jsonl") if cfg.log_samples else None
    if samples_log:
        _truncate_jsonl(samples_log, start)
    writer = MetricsWriter(out_dir, total_steps=cfg.steps, start_step=start, enabled=primary,
                           tensorboard=cfg.tensorboard, progress=cfg.progress)
    stack.callback(writer.close)
    if took_over:
        writer.message(f"output_dir {out_dir}: took over the lock of a run that ended without releasing it "
                       f"({took_over})")
    note = _recover_final(cfg.final_dir) if primary else None
    if note:
        writer.message(note)
    writer.message(f"{how} at step {start} in {time.perf_counter() - t0:.1f}s; {n_hosts} process(es), "
                   f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh {dict(mesh.shape)}"
                   + ("" if peak else "; no peak FLOP/s for this device: MFU is null"))
    evaluator = HeldOutEval(cfg, model_cfg, model_dir, mesh) if cfg.eval is not None else None
    meta = {"process_count": n_hosts, "mesh": dict(mesh.shape), "config": cfg.to_dict()}

    def fetch():
        try:
            parts = [next(it) for _ in range(cfg.step.accum_steps)]
        except StopIteration:
            return None
        local = parts[0] if len(parts) == 1 else stack_batches(parts)
        stats = dict(it.stats)
        state = json.loads(json.dumps(it.get_state()))
        return local, FlopCounter.batch_stats(local), stats, state

    status = "completed"
    step = start
    data_state = json.loads(json.dumps(it.get_state()))  # the state as of `step`
    saved = set(ckpt.steps())
    records: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Any]] = []  # (host-side record, device metrics) not yet fetched
    interval = {"t": None, "tokens": 0.0, "flops": 0.0, "steps": 0}
    # Non-finite steps (their update is not applied: train/step.py), as the fetched metrics show them: the length of
    # the current streak, its first step, and (step, loss, grad_norm) of the first step past the patience.
    nonfinite: dict[str, Any] = {"run": 0, "first": None, "stop": None}

    def save(at: int) -> None:
        if at in saved or nonfinite["run"] or nonfinite["stop"] is not None:  # no checkpoint during a non-finite
            return  # streak (its updates were skipped) or after the run stopped: the last one stays the good one
        ckpt.save(at, params=params, opt_state=opt_state, rng=rng, data_state=data_state, meta=meta)
        saved.add(at)

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        tput = dict.fromkeys(("step_time_s", "tokens_per_s", "tflops_per_device", "mfu"))
        if interval["t"] is not None and interval["steps"]:
            dt = now - interval["t"]
            tflops = interval["flops"] / dt / jax.device_count() / 1e12
            tput = {"step_time_s": dt / interval["steps"], "tokens_per_s": interval["tokens"] / dt,
                    "tflops_per_device": tflops, "mfu": tflops / peak[1] if peak else None}
        for (rec, _), m in zip(pending, fetched, strict=True):
            rec.update(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                       label_tokens=int(m["tokens"]), **tput)
            if math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]):
                nonfinite.update(run=0, first=None)
            else:
                rec["update_skipped"] = True  # (metrics.jsonl writes the non-finite values as null)
                nonfinite["run"] += 1
                nonfinite["first"] = nonfinite["first"] or rec["step"]
                if nonfinite["run"] > cfg.nonfinite_patience and nonfinite["stop"] is None:
                    nonfinite["stop"] = (nonfinite["first"], rec["step"], rec["loss"], rec["grad_norm"])
            records.append(rec)
        pending = []
        interval.update(t=now, tokens=0.0, flops=0.0, steps=0)

    nxt = fetch() if start < cfg.steps else None
    while step < cfg.steps:
        local_vec = np.zeros(8, np.float32)
        local_vec[0] = float(preempt.flag)
        local_vec[1] = float(nxt is None)
        if nxt is not None:
            _, bst, ist, _ = nxt
            local_vec[2:8] = (bst["tokens"], bst["slots"], flops.step_flops(bst), ist.get("tokens", 0),
                              ist.get("slots", 0), ist.get("samples", 0))
        agreed = _allgather(local_vec).sum(0)
        if agreed[0] > 0:
            status = "preempted"
            break
        if agreed[1] > 0:
            status = "exhausted"
            writer.message(f"the data ran out after step {step} (data.num_epochs={cfg.data.num_epochs}); "
                           "stopping")
            break
        local, _, ist, state = nxt
        gb = global_batch(local, ts, cfg.data.max_patches, lead)
        params, opt_state, m = ts(params, opt_state, gb)
        step += 1
        data_state = state
        if samples_log:
            with open(samples_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "host": host, "samples": sample_fingerprints(local)}) + "\n")
        rec = {"step": step, "tokens": int(agreed[2]), "batch_efficiency": float(agreed[2] / agreed[3]),
               "packing_efficiency": float(agreed[5] / max(agreed[6], 1.0)), "samples": int(agreed[7]),
               "model_flops": float(agreed[4])}
        pending.append((rec, m))
        if interval["t"] is not None:
            interval["tokens"] += float(agreed[2])
            interval["flops"] += float(agreed[4])
            interval["steps"] += 1
        nxt = fetch() if step < cfg.steps else None
        if step == start + 1:  # the first step includes compilation: time the rest
            jax.block_until_ready(m)
            writer.message(f"first step (compile + run) {time.perf_counter() - t0:.1f}s after start")
            flush()
        do_eval = evaluator is not None and step % evaluator.every == 0
        if do_eval or step % cfg.log_every == 0 or step == cfg.steps:
            flush()
        if do_eval:
            t_eval = time.perf_counter()
            loss, count = evaluator(params)
            records[-1].update(eval_loss=loss, eval_tokens=int(count))
            interval["t"] = (interval["t"] or 0.0) + (time.perf_counter() - t_eval)  # eval time is not training
        writer.write(records)
        records = []
        if step % cfg.save_every == 0 or step == cfg.steps:
            flush()  # a checkpoint is only written once the steps before it are known to be finite
            writer.write(records)
            records = []
            save(step)
        if nonfinite["stop"] is not None:
            break
    flush()
    writer.write(records)
    if nonfinite["stop"] is not None:
        ckpt.wait()  # the earlier (good) checkpoints are complete
        first, at, loss, gnorm = nonfinite["stop"]
        good = [s for s in ckpt.steps() if s < first]
        raise TrainingDivergedError(
            f"training stopped at step {at}: non-finite loss ({loss}) or gradient norm ({gnorm}) since step {first} "
            f"({at - first + 1} step(s) in a row; nonfinite_patience is {cfg.nonfinite_patience}). Those updates "
            f"were not applied, no checkpoint was written after step {first - 1} and no final weights; "
            + (f"the last good checkpoint is {ckpt.path(good[-1])}" if good else "there is no checkpoint")
            + ". Lower optim.peak_lr (or check the data), then rerun to resume from it")
    if status == "preempted":
        writer.message(f"SIGTERM: saving a checkpoint at step {step} and exiting" if not nonfinite["run"] else
                       f"SIGTERM at step {step}, in a run of non-finite steps: no checkpoint of it (the last one "
                       "stays); exiting")
    if status != "completed" or step not in saved:
        save(step)
    ckpt.wait()
    final = None
    if status != "preempted":
        final = cfg.final_dir
        if final_step(final) == step:
            writer.message(f"final weights of step {step} already in {final}")
        else:
            _write_final(params, model_cfg, final, source_dir=model_dir, dtype=cfg.final_dtype, step=step,
                         status=status)
            writer.message(f"final weights ({cfg.final_dtype}) of step {step} in {final}")
    return {"status": status, "step": step, "output_dir": out_dir, "final": final}


__all__ = ["HeldOutEval", "LossEvaluator", "TrainingDivergedError", "abstract_state", "absolute_paths",
           "check_geometry", "empty_batch", "final_step", "global_batch",
           "initialize_distributed", "load_params", "offset_vision", "place_unrolled", "sample_fingerprints", "train"]
