"""One training run per output_dir: a lock file, `output_dir/train.lock`.

The run takes an exclusive `flock` on the file and keeps it open for its whole life; the file holds who holds it
(host, pid, start time, process count, job id) for the messages. The kernel drops the lock when the process ends,
however it ends (kill -9 included), so a lock is never stale in the `flock` sense: a second run that gets the lock
while the file still names a previous holder knows that run died without releasing it, takes over and says so on
stderr. A second run that does not get it is refused with an error naming the holder. The file is emptied (never
deleted: deleting a locked file lets two runs hold locks on two different files) when the run ends.

Multi-host: process 0 alone takes the lock, for the whole job, and the processes agree on the outcome (all start,
or all stop with an error). A run restarted after a kill -9 on the same or on other hosts finds the lock free: the
dead process 0's kernel released it. `flock` locks hold across hosts on local disks and NFS (v4); on a FUSE mount
that only locks within one host (gcsfuse), two jobs on different hosts are not detected. On a filesystem with no
locks at all (`flock` fails), the file alone decides: a holder on this host whose pid is dead is taken over; a live
one, or one on another host (which cannot be checked from here), is refused (remove the file if that run is over).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any

from glm41v_jax.errors import Glm41vError

LOCK_NAME = "train.lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_JOB_ENV = ("GLM41V_JOB_ID", "SLURM_JOB_ID", "CLOUD_ML_JOB_ID", "JOB_ID")


class RunLockedError(Glm41vError):
    """output_dir is in use by another live training run; the message names it."""


def _describe(holder: dict[str, Any]) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("job"):
        parts.append(f"job {holder['job']}")
    return ", ".join(parts)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """`with RunLock(output_dir, processes=n) as lock:` (or acquire()/release()); `lock.took_over` names the dead
    holder whose lock was taken over, or is None."""

    def __init__(self, output_dir: str, *, processes: int = 1) -> None:
        self.path = os.path.join(os.path.abspath(output_dir), LOCK_NAME)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "processes": processes, "job": next((os.environ[k] for k in _JOB_ENV if os.environ.get(k)), None)}
        self.took_over: str | None = None
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any]:
        data = os.pread(fd, 1 << 16, 0)
        if not data.strip():
            return {}
        try:
            holder = json.loads(data)
        except ValueError:
            return {"host": "?", "pid": "?", "started": f"(unreadable lock file {self.path})"}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise RunLockedError(
                    f"output_dir {os.path.dirname(self.path)} is in use by another training run "
                    f"({_describe(self._read(fd))}); wait for it to finish or stop it, or use another output_dir"
                ) from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                locked = False  # a filesystem without file locks: the file's content decides
            holder = self._read(fd)
            if holder:
                if not locked:
                    same_host = holder.get("host") == self.info["host"]
                    if not same_host or (_pid_alive(holder.get("pid")) and holder.get("pid") != os.getpid()):
                        why = ("it is alive" if same_host else
                               "it runs on another host, which cannot be checked from here (the filesystem has no "
                               "file locks)")
                        raise RunLockedError(
                            f"output_dir {os.path.dirname(self.path)} is in use by another training run "
                            f"({_describe(holder)}): {why}; if that run is over, remove {self.path}")
                self.took_over = _describe(holder)
            data = json.dumps(self.info).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
