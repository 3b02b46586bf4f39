"""One training run as an object: setup and resume, then `step`, `maybe_eval`, `maybe_save` until the end.

`Trainer(cfg, preempt, stack)` takes the run lock, builds the mesh, the jitted step, the checkpoint manager and the
data iterator, and restores the latest checkpoint or loads the model's weights. `run()` then loops. Before each step
the hosts agree on a `HostReport` (distributed.py), so that every host runs the same steps and stops at the same one.
The next step's batches are read while the device computes the current one.

Metrics are fetched from the device every `log_every` steps, before an eval and before a checkpoint; every step
still gets its own metrics.jsonl line. Non-finite steps (the step does not apply their update: train/step.py) are
seen in those fetched metrics: after more than `nonfinite_patience` in a row the run stops with
`TrainingDivergedError`, and no checkpoint or final weights are written from the streak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import yaml

from glm41v_jax.config import Glm4vConfig
from glm41v_jax.errors import Glm41vError
from glm41v_jax.loading import CheckpointError, resolve_model_dir
from glm41v_jax.lora import LoraError, with_lora
from glm41v_jax.quant_checkpoint import LORA_LATER, QuantizedCheckpointError, refuse_quantized
from glm41v_jax.sharding import MeshError, make_mesh

from .assembly import check_geometry, global_batch, sample_fingerprints
from .checkpoint import TrainCheckpointer, final_step, recover_final, write_final, write_final_adapters
from .config import TrainConfig, TrainConfigError
from .data import SftIterator, make_iterator
from .distributed import HostReport, allgather
from .evaluate import HeldOutEval
from .lora_step import LoraTrainStep, make_train_step
from .metrics import FlopCounter, MetricsWriter, device_peak_tflops, truncate_jsonl
from .params import abstract_state, load_params
from .run_lock import RunLock, RunLockedError
from .step import stack_batches


class TrainingDivergedError(Glm41vError):
    """The loss or the gradient norm became non-finite for more steps in a row than `nonfinite_patience` allows."""


class Preemption:
    """SIGTERM -> a flag the loop checks between steps (the previous handler is restored on exit)."""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self) -> Preemption:
        with contextlib.suppress(ValueError):  # not the main thread: no handler (the flag stays False)
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def resume_step(cfg: TrainConfig, ckpt: TrainCheckpointer) -> int | None:
    """The checkpoint to restore under `resume` / `resume_step`, or None to start from the model's weights."""
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


def take_lock(out_dir: str, stack: contextlib.ExitStack, primary: bool) -> str | None:
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
    ok = allgather(np.asarray([error is None], np.int32)).all()
    if error is not None:
        raise error
    if not ok:
        raise RunLockedError(f"output_dir {out_dir}: process 0 could not lock it (another training run uses it; "
                             "process 0's error names that run)")
    return lock.took_over if lock is not None else None


class Fetched(NamedTuple):
    """One step's batches as this host read them, with the iterator's stats and state right after them."""

    batch: dict[str, Any]  # the host batch (micro-batches stacked on a leading axis when accum_steps > 1)
    batch_stats: dict[str, float]  # FlopCounter.batch_stats of it
    iter_stats: dict[str, Any]  # the iterator's counters
    state: Any  # the iterator's state (JSON-able): what a checkpoint of this step holds


@dataclasses.dataclass
class NonfiniteStreak:
    """Consecutive non-finite steps as the fetched metrics show them; `stop` is set at the first step past the
    patience: (first step of the streak, this step, loss, grad_norm)."""

    patience: int
    run: int = 0
    first: int | None = None
    stop: tuple[int, int, float, float] | None = None

    def observe(self, rec: dict[str, Any]) -> None:
        if math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]):
            self.run, self.first = 0, None
            return
        rec["update_skipped"] = True  # (metrics.jsonl writes the non-finite values as null)
        self.run += 1
        self.first = self.first or rec["step"]
        if self.run > self.patience and self.stop is None:
            self.stop = (self.first, rec["step"], rec["loss"], rec["grad_norm"])


class Trainer:
    """The state of one run on this host. Every process builds one and calls the same methods in the same order."""

    def __init__(self, cfg: TrainConfig, preempt: Preemption, stack: contextlib.ExitStack) -> None:
        self.cfg, self.preempt = cfg, preempt
        self.host, self.n_hosts = jax.process_index(), jax.process_count()
        self.primary = self.host == 0
        if not self.primary:
            logging.getLogger("glm41v_train").setLevel(logging.WARNING)
        if os.path.isdir(cfg.model):  # before output_dir is made (hub ids: train/params.load_params refuses)
            try:
                if cfg.lora is None:  # LoRA trains adapters on a quantized base (QLoRA)
                    refuse_quantized(cfg.model, LORA_LATER)
                else:  # a target that matches nothing: one error, before anything is written
                    with_lora(Glm4vConfig.from_file(os.path.join(cfg.model, "config.json")), cfg.lora)
            except (QuantizedCheckpointError, LoraError) as e:
                raise TrainConfigError(f"model: {e}" if isinstance(e, QuantizedCheckpointError) else str(e)) from None
        self.out_dir = os.path.abspath(cfg.output_dir)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise TrainConfigError(f"output_dir {self.out_dir}: exists and is not a directory")
        os.makedirs(self.out_dir, exist_ok=True)
        took_over = take_lock(self.out_dir, stack, self.primary)  # before anything in output_dir is read or written
        self._build_step()
        self.ckpt = TrainCheckpointer(cfg.checkpoint_dir, keep_last=cfg.keep_last, async_save=cfg.async_save)
        stack.callback(self.ckpt.close)
        restore = resume_step(cfg, self.ckpt)
        self.it: SftIterator = make_iterator(cfg.data, self.model_dir, self.host, self.n_hosts, self.model_cfg)
        stack.callback(self.it.close)
        self.t0 = time.perf_counter()
        how = self._init_state(restore)
        self._open_outputs(stack, took_over, how)
        self.evaluator = (HeldOutEval(cfg, self.model_cfg, self.model_dir, self.mesh, self.ts) if cfg.eval is not None
                          else None)
        self.meta = {"process_count": self.n_hosts, "mesh": dict(self.mesh.shape), "config": cfg.to_dict()}
        self.data_state = json.loads(json.dumps(self.it.get_state()))  # the state as of `self.step_count`
        self.saved = set(self.ckpt.steps())
        self.records: list[dict[str, Any]] = []  # fetched, not yet written
        self.pending: list[tuple[dict[str, Any], Any]] = []  # (host-side record, device metrics) not yet fetched
        self.interval = {"t": None, "tokens": 0.0, "flops": 0.0, "steps": 0}  # throughput since the last fetch
        self.streak = NonfiniteStreak(cfg.nonfinite_patience)

    # -- setup ---------------------------------------------------------------------------------------------------

    def _build_step(self) -> None:
        cfg = self.cfg
        try:
            self.mesh = make_mesh(cfg.mesh)
        except MeshError as e:
            raise TrainConfigError(f"mesh: {str(e).removeprefix('--mesh: ')}") from None
        self.model_dir = resolve_model_dir(cfg.model)
        self.model_cfg = Glm4vConfig.from_file(os.path.join(self.model_dir, "config.json"))
        check_geometry(cfg, self.mesh, self.model_cfg)
        self.ts = make_train_step(self.model_cfg, cfg.optim, self.mesh, cfg.step, cfg.lora, self.model_dir,
                                  cfg.quant_request())
        self.lead = 1 if cfg.step.accum_steps > 1 else 0  # the micro-batch axis of a stacked host batch
        self.flops = self.ts.flop_counter(cfg.optim.freeze)
        self.peak = device_peak_tflops(jax.devices()[0].device_kind)

    def _init_state(self, restore: int | None) -> str:
        """params, opt_state, rng, the start step and the iterator's position: restored, or fresh. Returns how."""
        cfg, ckpt = self.cfg, self.ckpt
        if restore is not None and restore > cfg.steps:
            raise TrainConfigError(f"steps ({cfg.steps}) is below the step of the checkpoint to resume "
                                   f"({ckpt.path(restore)}); raise steps, or set resume_step to a checkpoint at or "
                                   f"below {cfg.steps}")
        if isinstance(self.ts, LoraTrainStep):  # the frozen base, restored or not (checkpoints hold the adapters)
            self.ts.load_base(self.model_dir)
        if restore is not None:
            a_params, a_opt = abstract_state(self.ts)
            r = ckpt.restore(restore, abstract_params=a_params, abstract_opt_state=a_opt)
            self.params, self.opt_state, self.rng, self.start = r["params"], r["opt_state"], r["rng"], r["step"]
            self.it.set_state(r["data_state"])
            how = f"resumed from {ckpt.path(restore)}"
        else:
            lora = isinstance(self.ts, LoraTrainStep)
            self.params = self.ts.init_adapters(cfg.seed) if lora else load_params(self.model_dir, self.ts)
            self.opt_state = self.ts.init_opt_state(self.params)
            self.rng = np.asarray(jax.random.key_data(jax.random.PRNGKey(cfg.seed)), np.uint32)
            self.start = 0
            how = f"started from {self.model_dir}"
        self.step_count = self.start
        return how

    def _open_outputs(self, stack: contextlib.ExitStack, took_over: str | None, how: str) -> None:
        """train_config.yaml, the samples log, the metrics writer, and the opening messages."""
        cfg = self.cfg
        if self.primary:
            with open(os.path.join(self.out_dir, "train_config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        self.samples_log = os.path.join(self.out_dir, f"samples.host{self.host}.jsonl") if cfg.log_samples else None
        if self.samples_log:
            truncate_jsonl(self.samples_log, self.start)
        self.writer = MetricsWriter(self.out_dir, total_steps=cfg.steps, start_step=self.start, enabled=self.primary,
                                    tensorboard=cfg.tensorboard, progress=cfg.progress)
        stack.callback(self.writer.close)
        if took_over:
            self.writer.message(f"output_dir {self.out_dir}: took over the lock of a run that ended without "
                                f"releasing it ({took_over})")
        note = recover_final(cfg.final_dir) if self.primary else None
        if note:
            self.writer.message(note)
        self.writer.message(
            f"{how} at step {self.start} in {time.perf_counter() - self.t0:.1f}s; {self.n_hosts} process(es), "
            f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh {dict(self.mesh.shape)}"
            + ("" if self.peak else "; no peak FLOP/s for this device: MFU is null"))

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Steps up to `steps` (or until a preemption, the end of a finite dataset, or a non-finite streak), then
        the last checkpoint and the final weights. Returns the summary `train()` returns."""
        cfg = self.cfg
        status = "completed"
        nxt = self._fetch() if self.step_count < cfg.steps else None
        while self.step_count < cfg.steps:
            agreed = self._report(nxt).agree()
            if agreed.preempted:
                status = "preempted"
                break
            if agreed.exhausted:
                status = "exhausted"
                self.writer.message(f"the data ran out after step {self.step_count} "
                                    f"(data.num_epochs={cfg.data.num_epochs}); stopping")
                break
            m = self.step(nxt, agreed)
            nxt = self._fetch() if self.step_count < cfg.steps else None  # while the device computes
            if self.step_count == self.start + 1:  # the first step includes compilation: time the rest
                jax.block_until_ready(m)
                self.writer.message(f"first step (compile + run) {time.perf_counter() - self.t0:.1f}s after start")
                self._flush()
            if self.step_count % cfg.log_every == 0 or self.step_count == cfg.steps:
                self._flush()
            self.maybe_eval()
            self._write()
            self.maybe_save()
            if self.streak.stop is not None:
                break
        return self._finish(status)

    def _fetch(self) -> Fetched | None:
        """The next step's `accum_steps` batches from this host's iterator (None: the data ran out)."""
        try:
            parts = [next(self.it) for _ in range(self.cfg.step.accum_steps)]
        except StopIteration:
            return None
        local = parts[0] if len(parts) == 1 else stack_batches(parts)
        return Fetched(local, FlopCounter.batch_stats(local), dict(self.it.stats),
                       json.loads(json.dumps(self.it.get_state())))

    def _report(self, nxt: Fetched | None) -> HostReport:
        if nxt is None:
            return HostReport(preempted=self.preempt.flag, exhausted=True)
        bst, ist = nxt.batch_stats, nxt.iter_stats
        return HostReport(preempted=self.preempt.flag, tokens=bst["tokens"], slots=bst["slots"],
                          flops=self.flops.step_flops(bst), read_tokens=ist.get("tokens", 0),
                          read_slots=ist.get("slots", 0), samples=ist.get("samples", 0))

    def step(self, nxt: Fetched, agreed: HostReport) -> Any:
        """Dispatch one optimizer step on the global batch; its metrics stay on the device until `_flush`."""
        gb = global_batch(nxt.batch, self.ts, self.cfg.data.max_patches, self.lead)
        self.params, self.opt_state, m = self.ts(self.params, self.opt_state, gb)
        self.step_count += 1
        self.data_state = nxt.state
        if self.samples_log:
            with open(self.samples_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step_count, "host": self.host,
                                    "samples": sample_fingerprints(nxt.batch)}) + "\n")
        rec = {"step": self.step_count, "tokens": int(agreed.tokens),
               "batch_efficiency": agreed.tokens / agreed.slots,
               "packing_efficiency": agreed.read_tokens / max(agreed.read_slots, 1.0),
               "samples": int(agreed.samples), "model_flops": agreed.flops}
        self.pending.append((rec, m))
        if self.interval["t"] is not None:
            self.interval["tokens"] += agreed.tokens
            self.interval["flops"] += agreed.flops
            self.interval["steps"] += 1
        return m

    def maybe_eval(self) -> None:
        """The held-out loss on eval steps, recorded on the step's metrics line (its time is not training time)."""
        if self.evaluator is None or self.step_count % self.evaluator.every:
            return
        self._flush()
        t_eval = time.perf_counter()
        loss, count = self.evaluator(self.params)
        self.records[-1].update(eval_loss=loss, eval_tokens=int(count))
        self.interval["t"] = (self.interval["t"] or 0.0) + (time.perf_counter() - t_eval)

    def maybe_save(self) -> None:
        """A checkpoint every `save_every` steps and at the last step, once the steps before it are known to be
        finite."""
        if self.step_count % self.cfg.save_every == 0 or self.step_count == self.cfg.steps:
            self._flush()
            self._write()
            self._save(self.step_count)

    def _save(self, at: int) -> None:
        if at in self.saved or self.streak.run or self.streak.stop is not None:  # no checkpoint during a non-finite
            return  # streak (its updates were skipped) or after the run stopped: the last one stays the good one
        self.ckpt.save(at, params=self.params, opt_state=self.opt_state, rng=self.rng, data_state=self.data_state,
                       meta=self.meta)
        self.saved.add(at)

    def _flush(self) -> None:
        """Fetch the pending steps' device metrics into records, with the throughput since the last fetch."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        now = time.perf_counter()
        tput = dict.fromkeys(("step_time_s", "tokens_per_s", "tflops_per_device", "mfu"))
        iv = self.interval
        if iv["t"] is not None and iv["steps"]:
            dt = now - iv["t"]
            tflops = iv["flops"] / dt / jax.device_count() / 1e12
            tput = {"step_time_s": dt / iv["steps"], "tokens_per_s": iv["tokens"] / dt, "tflops_per_device": tflops,
                    "mfu": tflops / self.peak[1] if self.peak else None}
        for (rec, _), m in zip(self.pending, fetched, strict=True):
            rec.update(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                       label_tokens=int(m["tokens"]), **tput)
            self.streak.observe(rec)
            self.records.append(rec)
        self.pending = []
        iv.update(t=now, tokens=0.0, flops=0.0, steps=0)

    def _write(self) -> None:
        self.writer.write(self.records)
        self.records = []

    def _finish(self, status: str) -> dict[str, Any]:
        """The end of the loop: stop on a non-finite streak, else the last checkpoint and the final weights."""
        self._flush()
        self._write()
        step = self.step_count
        if self.streak.stop is not None:
            self.ckpt.wait()  # the earlier (good) checkpoints are complete
            raise self._diverged()
        if status == "preempted":
            self.writer.message(f"SIGTERM: saving a checkpoint at step {step} and exiting" if not self.streak.run else
                                f"SIGTERM at step {step}, in a run of non-finite steps: no checkpoint of it (the "
                                "last one stays); exiting")
        if status != "completed" or step not in self.saved:
            self._save(step)
        self.ckpt.wait()
        final = None
        if status != "preempted":
            final = self.cfg.final_dir
            if final_step(final) == step:
                self.writer.message(f"final weights of step {step} already in {final}")
            elif isinstance(self.ts, LoraTrainStep):
                write_final_adapters(self.params, self.ts, final, model=self.cfg.model, step=step, status=status)
                self.writer.message(f"final adapters of step {step} in {final}")
            else:
                write_final(self.params, self.model_cfg, final, source_dir=self.model_dir,
                            dtype=self.cfg.final_dtype, step=step, status=status)
                self.writer.message(f"final weights ({self.cfg.final_dtype}) of step {step} in {final}")
        return {"status": status, "step": step, "output_dir": self.out_dir, "final": final}

    def _diverged(self) -> TrainingDivergedError:
        first, at, loss, gnorm = self.streak.stop
        good = [s for s in self.ckpt.steps() if s < first]
        return TrainingDivergedError(
            f"training stopped at step {at}: non-finite loss ({loss}) or gradient norm ({gnorm}) since step {first} "
            f"({at - first + 1} step(s) in a row; nonfinite_patience is {self.cfg.nonfinite_patience}). Those "
            f"updates were not applied, no checkpoint was written after step {first - 1} and no final weights; "
            + (f"the last good checkpoint is {self.ckpt.path(good[-1])}" if good else "there is no checkpoint")
            + ". Lower optim.peak_lr (or check the data), then rerun to resume from it")


__all__ = ["Fetched", "NonfiniteStreak", "Preemption", "Trainer", "TrainingDivergedError", "resume_step",
           "take_lock"]
