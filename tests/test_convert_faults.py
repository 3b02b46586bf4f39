"""The converter under faults: two runs to one destination, a destination that appears meanwhile, SIGTERM and
SIGKILL, a full disk, a failing write, and out-of-range --flush-gb. Each gives one true `error:` line and leaves either
nothing or a complete DST, never a `DST.tmp-<pid>` folder or a lock file."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys

import pytest

from glm41v_convert.hf_to_orbax import convert
from glm41v_jax import loading, tiny
from glm41v_jax.cli import main
from glm41v_jax.loading import CheckpointError

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """A small-vocab fp32 HF dir (56 tensors, 1.4 MB)."""
    return tiny.write_random_hf_dir(tmp_path_factory.mktemp("faults") / "hf", 11, vocab_size=512)


def _left(parent) -> list[str]:
    return sorted(os.listdir(parent))


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV, **kw)


def _complete(dst: str) -> None:
    assert main(["verify", dst]) == 0


# ---------------------------------------------------------------------------------------------------------------
# One writer per destination.


def test_two_runs_to_one_destination(src, tmp_path, capsys):
    """Both start together: one converts, the other stops with a true message (the lock is held, or DST exists if
    it started after the first finished). Nothing else is left."""
    dst = str(tmp_path / "out")
    cmd = ["-m", "glm41v_convert.main", src, dst, "--no-progress"]
    procs = [subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = _one_error(next(err for rc, err in results if rc == 2))
    assert (f"{dst}: another conversion to this destination is running (pid " in loser
            or f"{dst}: destination already exists" in loser), loser
    assert _left(tmp_path) == ["out"]
    _complete(dst)


def test_held_lock_refuses_at_once(src, tmp_path):
    dst = str(tmp_path / "out")
    fd = os.open(dst + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        with pytest.raises(CheckpointError, match=rf"^{dst}: another conversion to this destination is running "
                                                  rf"\(pid 4242 holds {dst}\.lock\)"):
            convert(src, dst, progress=False)
    finally:
        os.close(fd)
    assert _left(tmp_path) == ["out.lock"]  # ours: the converter neither wrote nor removed anything


@pytest.mark.parametrize("contents", [[], ["mine.txt"]])
def test_destination_appearing_meanwhile_is_left_alone(src, tmp_path, contents):
    """Another program creates DST during the conversion: DST is not replaced (not even an empty directory: the
    rename is no-replace), our output is discarded and the message says exactly that."""
    dst = tmp_path / "out"

    def appear(name: str) -> None:
        if not dst.exists():
            dst.mkdir()
            for c in contents:
                (dst / c).write_text("user data")

    with pytest.raises(CheckpointError, match=rf"^{dst}: the destination was created by another program while "
                                              r"converting; it was left untouched and this conversion's output was "
                                              r"discarded$"):
        convert(src, str(dst), progress=False, on_tensor=appear)
    assert _left(tmp_path) == ["out"]
    assert _left(dst) == contents and all((dst / c).read_text() == "user data" for c in contents)


# ---------------------------------------------------------------------------------------------------------------
# Signals.

_SIGTERM_AT_30TH_READ = """
import os, signal, sys
from glm41v_jax import loading
read, n = loading.HFCheckpoint.read, [0]
def counting_read(self, name):
    n[0] += 1
    if n[0] == 30:  # after several partial saves (--flush-gb below is ~100 KB)
        os.kill(os.getpid(), signal.SIGTERM)
    return read(self, name)
loading.HFCheckpoint.read = counting_read
from glm41v_jax.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--no-progress", "--flush-gb", "0.0001"]))
"""

_SIGKILL_AT_30TH_TENSOR = """
import os, signal, sys
from glm41v_convert.hf_to_orbax import convert
n = [0]
def hook(name):
    n[0] += 1
    if n[0] == 30:
        os.kill(os.getpid(), signal.SIGKILL)
convert(sys.argv[1], sys.argv[2], progress=False, flush_bytes=1 << 16, on_tensor=hook)
"""


def test_sigterm_removes_partial_output(src, tmp_path):
    dst = str(tmp_path / "out")
    p = _run(["-c", _SIGTERM_AT_30TH_READ, src, dst])
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert _one_error(p.stderr) == "error: terminated (SIGTERM); partial output removed"
    assert _left(tmp_path) == []


def test_sigkill_leftover_is_cleared_by_the_next_run(src, tmp_path, capsys):
    dst = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "-c", _SIGKILL_AT_30TH_TENSOR, src, dst], env=ENV)
    assert p.wait(timeout=300) == -signal.SIGKILL
    tmp = f"{dst}.tmp-{p.pid}"
    assert len(os.listdir(tmp)) > 1  # what kill -9 leaves behind: side files and partial saves
    with pytest.raises(CheckpointError, match=r"an unfinished conversion \(params/ but no glm41v_jax\.json"):
        loading.load(tmp)
    live = subprocess.Popen(["sleep", "60"])  # a folder named after a running process is kept
    alive = f"{dst}.tmp-{live.pid}"
    os.makedirs(alive)
    try:
        assert convert(src, dst, progress=False) == dst
    finally:
        live.kill()
        live.wait()
    notes = capsys.readouterr().err.splitlines()
    assert (f"note: removed {tmp}, the partial output of an interrupted conversion (pid {p.pid} is no longer "
            "running)") in notes
    assert f"note: {alive} belongs to process {live.pid}, which is still running; left in place" in notes
    assert _left(tmp_path) == sorted(["out", os.path.basename(alive)])
    _complete(dst)


# ---------------------------------------------------------------------------------------------------------------
# Write failures.


def test_full_disk_is_one_line(src, tmp_path, capsys, monkeypatch):
    """ENOSPC from the storage layer. A full filesystem cannot be made here without root (no tmpfs or loop
    device), so the final Orbax step raises the OSError a full disk gives; the real TensorStore write failure is
    the RLIMIT_FSIZE test below."""
    from orbax.checkpoint.experimental.v1 import partial

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(partial, "finalize", full)
    dst = str(tmp_path / "new folder" / "deeper" / "out")  # the folders this run makes go too
    assert main(["convert", src, dst, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) == (f"error: {dst}: no space left on device while writing the converted checkpoint (the "
                               "output needs about 0.00 GiB); the partial output was removed")
    assert _left(tmp_path) == []


def test_real_write_failure_is_one_line(src, tmp_path):
    """TensorStore's own write fails (files are capped at 256 KiB with RLIMIT_FSIZE): one line, nothing left, and
    none of the tracebacks Orbax's writer threads used to log."""
    dst = str(tmp_path / "out")
    # bash: SIGXFSZ ignored (a write past the limit then fails with EFBIG instead of killing), 256 KiB per file.
    limited = "trap '' XFSZ; ulimit -f 256; exec \"$@\""
    p = subprocess.run(["bash", "-c", limited, "bash", sys.executable, "-m", "glm41v_convert.main", src, dst,
                        "--no-progress"], capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 2
    line = _one_error(p.stderr)
    assert line.startswith(f"error: {dst}: could not write the converted checkpoint (") and "File too large" in line
    assert line.endswith("; the partial output was removed") and "tensorstore_spec" not in line
    assert _left(tmp_path) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e400", "abc"])
def test_flush_gb_out_of_range(src, tmp_path, capsys, value):
    assert main(["convert", src, str(tmp_path / "o"), f"--flush-gb={value}"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert line.startswith(f"error: argument --flush-gb: expected a finite number in (0, 1024], got '{value}'")
    assert _left(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"flush_bytes must be a positive number of bytes"):
        convert(src, str(tmp_path / "o"), flush_bytes=0)


def test_empty_destination(src, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", src, ""]) == 2
    assert _one_error(capsys.readouterr().err) == "error: the destination path is empty"
    assert _left(tmp_path) == []


def test_destination_under_a_file(src, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["convert", src, str(tmp_path / "file" / "out")]) == 2
    assert _one_error(capsys.readouterr().err) == (f"error: {tmp_path}/file/out: cannot create it: {tmp_path}/file "
                                                   "is not a directory")
    assert _left(tmp_path) == ["file"]


def test_converted_output_loads_after_faults(src, tmp_path):
    """The same source converts and loads normally after all of the above (no state left anywhere)."""
    params, _ = loading.load(convert(src, str(tmp_path / "ok"), progress=False), as_numpy=True, verify=True)
    assert params["lm_head"]["kernel"].shape == (64, 512)


def test_filesystem_without_locks(src, tmp_path, monkeypatch, capsys):
    """flock unsupported (some network filesystems, simulated: such a filesystem is not available here): the run
    says it cannot guard against a concurrent conversion, and a dead run's folder is reported, not removed (it may
    belong to a live run on another host)."""
    import glm41v_convert.hf_to_orbax as h

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(h.fcntl, "flock", no_locks)
    dead = subprocess.Popen(["true"])
    dead.wait()
    dst = str(tmp_path / "out")
    os.makedirs(f"{dst}.tmp-{dead.pid}")
    convert(src, dst, progress=False)
    notes = capsys.readouterr().err.splitlines()
    assert (f"note: {dst}.lock: this filesystem has no file locks; not guarding against a concurrent conversion to "
            "the same destination") in notes
    assert (f"note: {dst}.tmp-{dead.pid} looks like the partial output of an interrupted conversion (pid {dead.pid} "
            f"is not running here); remove it unless another host is converting to {dst}") in notes
    assert os.path.isdir(f"{dst}.tmp-{dead.pid}")
    _complete(dst)
