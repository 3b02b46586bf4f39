"""Several processes, one run: `jax.distributed` setup, the hosts' all-gather, and what they agree on each step.

Every decision that stops the loop (a SIGTERM, a finite dataset running out) is taken by all hosts together: before
each step each host sends a `HostReport` and every host reads the same combined report, so every host runs the same
steps and stops at the same one, and no host waits in a collective that the others never reach.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
from collections.abc import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from .config import TrainConfigError


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


def allgather(x: np.ndarray) -> np.ndarray:
    """(n_processes, *x.shape) NumPy; the identity (with a leading axis) on one process."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def sync(name: str) -> None:
    """A barrier of all processes (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class HostReport:
    """What one host tells the others before a step, and (`agree`) what they all then know.

    Flags combine with "any", counts with a sum. The vector travels as float32 (jax's all-gather without x64):
    counts are exact up to 2^24 per step and keep 7 significant digits in the run totals, which only feed metrics.
    """

    preempted: bool = False  # SIGTERM received
    exhausted: bool = False  # the data ran out (finite num_epochs) before this step's batches
    tokens: float = 0.0  # real tokens of the step's batch
    slots: float = 0.0  # token slots of the step's batch (tokens + padding)
    flops: float = 0.0  # model FLOPs of the step (metrics.FlopCounter)
    read_tokens: float = 0.0  # real tokens the data iterator has emitted so far (its stats)
    read_slots: float = 0.0  # token slots the data iterator has emitted so far
    samples: float = 0.0  # samples the data iterator has read so far (including those waiting in the packer)

    @classmethod
    def width(cls) -> int:
        return len(dataclasses.fields(cls))

    def to_vector(self) -> np.ndarray:
        return np.asarray([float(getattr(self, f.name)) for f in dataclasses.fields(self)], np.float32)

    @classmethod
    def from_vector(cls, vec: np.ndarray) -> HostReport:
        vec = np.asarray(vec)
        if vec.shape != (cls.width(),):
            raise ValueError(f"a HostReport vector has shape ({cls.width()},), got {vec.shape}")
        values = {}
        for f, v in zip(dataclasses.fields(cls), vec.tolist(), strict=True):
            values[f.name] = v > 0 if f.type in (bool, "bool") else float(v)
        return cls(**values)

    @classmethod
    def combine(cls, reports: Iterable[HostReport]) -> HostReport:
        """The hosts' reports as one: a flag is set if any host set it; counts are summed."""
        reports = list(reports)
        values = {}
        for f in dataclasses.fields(cls):
            got = [getattr(r, f.name) for r in reports]
            values[f.name] = any(got) if f.type in (bool, "bool") else float(sum(got))
        return cls(**values)

    def agree(self) -> HostReport:
        """All hosts' reports combined (every process calls it at the same point; a collective)."""
        return HostReport.combine(HostReport.from_vector(row) for row in allgather(self.to_vector()))


__all__ = ["HostReport", "allgather", "check_coordinator", "initialize_distributed", "sync"]
