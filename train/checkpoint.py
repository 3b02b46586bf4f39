"""Training checkpoints (orbax CheckpointManager) and the final weights (the converted format).

Layout of `output_dir/checkpoints/<step>/` (one orbax composite checkpoint per saved step):
    state/   params (fp32, scanned layout), opt_state, step, rng: each host writes the shards it holds
    data/    process_<i>-of-<n>.json: host i's data-iterator state (grain's checkpoint handler; every host its own)
    meta/    JSON: step, process count, mesh, the whole training config

Atomicity is orbax's: a save is written into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once every host
has finished, so a kill at any moment leaves the previous checkpoints intact (`TrainCheckpointer` removes the
unfinished temporary directory when it next opens). Saves are asynchronous: `save` returns once the arrays are
copied to host memory; the files are written in the background while training goes on. `keep_last` checkpoints are
kept.

A checkpoint that cannot be restored (files removed or damaged, a different parameter tree or process count) raises
`CheckpointCorruptError` naming its directory. Nothing falls back silently: remove the checkpoint (the previous one
is then the latest) or restore another with `resume_step`.

Final weights (`save_final`): the params, cast to `final_dtype`, unstacked, written in the converted format that
`glm41v generate --model DIR` loads (config.json + processor files + params/ + the completion marker). One process:
`glm41v_convert.hf_to_orbax.save_converted`. Several: every host writes its shards of params/ into a shared
temporary directory, then process 0 writes the side files and the marker and renames it (glm41v_jax.checkpoint_files,
as the converter does). `write_final` replaces output_dir/final atomically (written beside it, swapped in with two
renames; `recover_final` repairs a kill between them) and records the step in final/training.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import grain.checkpoint as gc
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1

from glm41v_convert.hf_to_orbax import save_converted
from glm41v_jax.checkpoint_files import copy_side_files, finish_converted
from glm41v_jax.checkpoint_format import FORMAT_NAME, FORMAT_VERSION, PARAMS_SUBDIR, CheckpointError
from glm41v_jax.errors import one_line
from glm41v_jax.integrity import install_restore_noise_filters
from glm41v_jax.weights import iter_leaves, unstack_layers

from .distributed import sync

ITEMS = ("state", "data", "meta")


class CheckpointCorruptError(CheckpointError):
    """A training checkpoint exists but cannot be restored; the message names its directory."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, permissions); the earlier checkpoints are intact."""


# Failures of the storage while writing: OSErrors, and the status codes TensorStore (which writes the arrays) puts in
# its ValueErrors. Anything else raised by a save is a bug and keeps its traceback.
_STORAGE_STATUS = re.compile(r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|No space left|quota",
                             re.IGNORECASE)


def _storage_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, ValueError) and bool(_STORAGE_STATUS.search(str(e))))


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's own tracebacks of a storage failure (logged from its writer threads): the failure reaches the
    loop as an exception and is reported once, as one line naming the checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and _storage_failure(exc))


class DataState:
    """A data-iterator state captured at a given step, in the shape grain's orbax handler saves and restores (JSON
    bytes through get_state / set_state). The loop captures the state right after taking a step's batches, so the
    checkpoint of that step holds it even though the iterator has already moved on to the next step's batches."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


def _why(e: BaseException) -> str:
    """The cause for a message: the class and the folded message, cut (orbax and TensorStore dump whole specs)."""
    return f"{type(e).__name__}: {one_line(e)[:400]}"


class TrainCheckpointer:
    """orbax CheckpointManager for the training state. All processes call every method (multi-host)."""

    def __init__(self, directory: str, *, keep_last: int, async_save: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        # Unfinished saves (a kill during a save) are removed here, synchronously, by process 0 (the run lock is
        # held): orbax's own cleanup runs in a thread that can outlive a run stopping at once on a config error.
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        sync("glm41v_checkpoint_tmp_cleanup")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=False)
        self._quiet = _QuietOrbaxErrors()
        logging.getLogger("absl").addFilter(self._quiet)
        self._writing: int | None = None  # the step of the save in flight
        self._failed = False
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "data": gc.CheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})
        except Exception as e:
            logging.getLogger("absl").removeFilter(self._quiet)
            if _storage_failure(e):
                raise CheckpointWriteError(f"checkpoint directory {self.directory} cannot be opened "
                                           f"({_why(e)})") from None
            raise

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, *, params: Any, opt_state: Any, rng: np.ndarray, data_state: Any,
             meta: Mapping[str, Any]) -> None:
        """Start saving (asynchronous unless async_save=False); the arrays are on host before this returns."""
        state = {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int64),
                 "rng": np.asarray(rng, np.uint32)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=gc.CheckpointSave(DataState(data_state)),
                                  meta=ocp.args.JsonSave(dict(meta, step=int(step))))
        previous, self._writing = self._writing, step
        with self._writes(previous):  # the previous save's failure surfaces here, or this one's
            self.manager.save(step, args=args, force=True)

    @contextlib.contextmanager
    def _writes(self, previous: int | None = None):
        """Storage failures of a save (this one or the one in flight) -> CheckpointWriteError, one line."""
        try:
            yield
        except Exception as e:
            if not _storage_failure(e):
                raise
            self._failed = True
            committed = self._committed()
            failed = [s for s in (previous, self._writing) if s is not None and s not in committed]
            step = min(failed) if failed else self._writing
            steps = [s for s in committed if s != step]
            kept = (f"the last complete checkpoint is {self.path(steps[-1])}" if steps
                    else "there is no complete checkpoint yet")
            what = f"checkpoint {self.path(step)}" if step is not None else f"a checkpoint in {self.directory}"
            raise CheckpointWriteError(f"{what} could not be written ({_why(e)}); {kept}, and the run stopped. "
                                       "Free space (or fix the storage) and rerun the same command to resume") from None

    def _committed(self) -> list[int]:
        with contextlib.suppress(OSError):
            return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        return []

    def read_meta(self, step: int) -> dict[str, Any]:
        path = os.path.join(self.path(step), "meta")
        install_restore_noise_filters()
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001  (any failure to read it: one clear error)
            raise CheckpointCorruptError(f"checkpoint {self.path(step)}: its metadata ({path}) cannot be read "
                                         f"({_why(e)}); the checkpoint is corrupt or incomplete. Remove it to "
                                         "resume from the previous one, or set resume_step") from None
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointCorruptError(f"checkpoint {self.path(step)}: its metadata says step "
                                         f"{meta.get('step') if isinstance(meta, dict) else meta!r}, not {step}")
        return meta

    def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any) -> dict[str, Any]:
        """{"params", "opt_state", "step", "rng", "data_state", "meta"} of checkpoint `step`, arrays placed with the
        shardings in the abstract trees (jax.ShapeDtypeStruct with .sharding)."""
        meta = self.read_meta(step)
        n = jax.process_count()
        if meta.get("process_count", n) != n:
            raise CheckpointCorruptError(
                f"checkpoint {self.path(step)} was written by {meta.get('process_count')} processes and this run has "
                f"{n}: the per-host data iterator states cannot be redistributed; resume with "
                f"{meta.get('process_count')} processes")
        target = {"params": abstract_params, "opt_state": abstract_opt_state, "step": np.zeros((), np.int64),
                  "rng": np.zeros((2,), np.uint32)}
        install_restore_noise_filters()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     data=gc.CheckpointRestore(DataState())))
        except Exception as e:  # noqa: BLE001  (any failure to read it: one clear error)
            raise CheckpointCorruptError(f"checkpoint {self.path(step)} cannot be restored ({_why(e)}); it is "
                                         "corrupt, incomplete or from a different model/optimizer. Remove it to "
                                         "resume from the previous one, or set resume_step") from None
        state = out["state"]
        if int(state["step"]) != step:
            raise CheckpointCorruptError(f"checkpoint {self.path(step)} holds step {int(state['step'])}, not {step}")
        return {"params": state["params"], "opt_state": state["opt_state"], "step": step,
                "rng": np.asarray(state["rng"], np.uint32), "data_state": out["data"].state, "meta": meta}

    def wait(self) -> None:
        with self._writes():
            self.manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        """Finish the save in flight and release the manager. After a failure already reported (the run is ending
        with that error), a second report of it is dropped."""
        try:
            if self._failed:
                with contextlib.suppress(Exception):
                    self.manager.wait_until_finished()
                with contextlib.suppress(Exception):
                    self.manager.close()
            else:
                self.wait()
                with self._writes():
                    self.manager.close()
        finally:
            logging.getLogger("absl").removeFilter(self._quiet)


# ---------------------------------------------------------------------------------------------------------------
# Final weights.


def cast_params(params: Any, dtype: Any) -> Any:
    """Every leaf cast to `dtype`, keeping its sharding (one jitted program; works across hosts)."""
    dtype = jnp.dtype(dtype)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings)(params)


def save_final(params: Any, cfg: Any, dst: str, *, source_dir: str | None, dtype: Any = "bfloat16") -> str:
    """Write the final weights in the converted format (module docstring). All processes call it."""
    dst = os.path.abspath(dst)
    params = cast_params(params, dtype)
    if jax.process_count() == 1:
        return save_converted(params, cfg, dst, source_dir=source_dir)
    return _save_final_multihost(params, cfg, dst, source_dir)


def _save_final_multihost(params: Any, cfg: Any, dst: str, source_dir: str | None) -> str:
    primary = jax.process_index() == 0
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: destination already exists; remove it or choose another path")
    tmp = dst + ".tmp-final"
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sync("glm41v_final_prepare")
    unrolled = unstack_layers(params)
    ocp_v1.save(os.path.join(tmp, PARAMS_SUBDIR), unrolled)
    sync("glm41v_final_params")
    if primary:
        copied = copy_side_files(os.fspath(source_dir), tmp) if source_dir is not None else []
        if "config.json" not in copied:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg.to_hf(), f, indent=2)
        leaves = [leaf for _, leaf in iter_leaves(unrolled)]
        dtypes = sorted({str(np.dtype(x.dtype)) for x in leaves})
        fmt = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": "unrolled",
               "dtype": dtypes[0] if len(dtypes) == 1 else "mixed", "source": "training (multi-host)",
               "num_tensors": len(leaves), "num_bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)),
               "copied_files": copied}
        finish_converted(tmp, dst, fmt)
    sync("glm41v_final_done")
    return dst


FINAL_INFO = "training.json"  # in output_dir/final: the step (and status) the final weights are from


def final_step(final: str) -> int | None:
    """The step of the weights in output_dir/final, from its training.json (None: no final, or not recorded)."""
    try:
        with open(os.path.join(final, FINAL_INFO), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def recover_final(final: str) -> str | None:
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


def write_final_adapters(adapters: Any, ts: Any, final: str, *, model: str, step: int, status: str) -> None:
    """output_dir/final <- the adapter directory of `step` (glm41v_jax/lora.py: adapter.safetensors, its
    adapter_config.json with the base model's identity, and training.json), replaced atomically. All processes
    call it; the adapters are gathered (they are small) and process 0 writes."""
    from jax.experimental import multihost_utils

    from glm41v_jax.lora import save_adapters

    if jax.process_count() > 1:
        host = multihost_utils.process_allgather(adapters, tiled=True)
    else:
        host = jax.device_get(adapters)
    identity = ts.identity()
    if jax.process_index() == 0:
        save_adapters(final, host, ts.cfg, identity, model=model, files={FINAL_INFO: {"step": step, "status": status}})
    sync("glm41v_final_swapped")


def write_final(params: Any, model_cfg: Any, final: str, *, source_dir: str, dtype: str, step: int,
                status: str) -> None:
    """output_dir/final <- the weights of `step`, replaced atomically: written beside it, then swapped in with two
    renames (a kill between them is repaired by `recover_final` on the next start). All processes call it."""
    new = final + ".tmp-new"
    if jax.process_index() == 0:
        shutil.rmtree(new, ignore_errors=True)
    sync("glm41v_final_tmp")
    save_final(params, model_cfg, new, source_dir=source_dir, dtype=dtype)
    if jax.process_index() == 0:
        with open(os.path.join(new, FINAL_INFO), "w", encoding="utf-8") as f:
            json.dump({"step": step, "status": status}, f)
        if os.path.isdir(final):
            os.rename(final, final + ".old")
        os.rename(new, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    sync("glm41v_final_swapped")
