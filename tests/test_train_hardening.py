"""Hostile inputs and faults of `glm41v train` / `glm41v loss` (issue 10): config numbers, config files, the
coordinator flag, the run lock, bad records, non-finite training, a full disk, a corrupt checkpoint, the final
weights of a continued run, paths relative to another working directory with spaces.

Every failure must be one `error:` line with exit code 2, no traceback, and nothing lost: the earlier checkpoints
stay, no final weights are written from a bad state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing

import jax
import numpy as np
import pytest
from test_train_loop import SMOKE, _committed, _env, _finish, _metrics, _start, _tail, _yaml

from glm41v_train.config import INT_MAX, TrainConfig, TrainConfigError, _section_types, config_from_dict, load_config
from glm41v_train.run_lock import LOCK_NAME, RunLock, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_DATA = os.path.join(REPO, "train", "configs", "smoke_data")
BASE = "model: tiny\noutput_dir: out\nsteps: 5\ndata: {jsonl: d.jsonl, seq_len: 64}\n"
QUIET = ["--set", "eval=null", "--set", "progress=false"]


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert "Traceback" not in text, text[-3000:]
    assert lines and lines[-1].startswith("error: "), text[-3000:]
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# Config numbers: one rule per type for every numeric field of every section, then the ranges of the optimizer.


def _numeric_fields():
    """(dotted name, 'int' | 'float') of every int / float field of TrainConfig and its sections."""
    out = []
    sections = _section_types()
    for prefix, cls in [("", TrainConfig)] + [(k + ".", v) for k, v in sections.items()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in sections and cls is TrainConfig:
                continue
            args = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            kind = "int" if int in args else "float" if float in args else None
            if kind:
                out.append((prefix + f.name, kind))
    return out


NUMERIC = _numeric_fields()


def test_every_numeric_field_is_checked(tmp_path):
    assert {"steps", "seed", "nonfinite_patience", "data.seq_len", "optim.peak_lr", "optim.b2",
            "step.accum_steps", "eval.every"} <= {n for n, _ in NUMERIC}
    base = _yaml(tmp_path, BASE + "eval: {jsonl: v.jsonl}\n")
    for name, kind in NUMERIC:
        bad = [".nan", ".inf", "-.inf", "1e400"] if kind == "float" else ["-1", str(INT_MAX + 1), "10**30",
                                                                           "100000000000000000000000000000"]
        for value in bad:
            with pytest.raises(TrainConfigError) as e:
                load_config(base, [f"{name}={value}"])
            assert name in str(e.value), (name, value, str(e.value))


@pytest.mark.parametrize("override,field,why", [
    ("optim.peak_lr=-1e-5", "optim.peak_lr", ">= 0"),
    ("optim.end_lr=-1", "optim.end_lr", ">= 0"),
    ("optim.b1=1.0", "optim.b1", "[0, 1)"),
    ("optim.b2=-0.1", "optim.b2", "[0, 1)"),
    ("optim.eps=0", "optim.eps", "> 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay", ">= 0"),
    ("optim.clip_norm=-1", "optim.clip_norm", ">= 0"),
    ("optim.warmup_steps=9", "optim", "warmup_steps (9) <= total_steps (5)"),
    ('data.jsonl="a\\0b"', "data.jsonl", "NUL"),  # a YAML escape: the string holds a NUL
    ("output_dir=", "output_dir", "expected a string"),
    ("output_dir=''", "output_dir", "expected a non-empty string"),
    ("optim.clip_norm=.nan", "optim.clip_norm", "expected a finite number"),
])
def test_optimizer_ranges(tmp_path, override, field, why):
    with pytest.raises(TrainConfigError) as e:
        load_config(_yaml(tmp_path, BASE), [override])
    assert field in str(e.value) and why in str(e.value), str(e.value)


def test_warmup_equal_to_steps_trains(tmp_path):
    """`steps <= 100` without a warmup gives warmup_steps == total_steps: the schedule is the warmup alone."""
    from glm41v_train.optim import lr_schedule

    cfg = load_config(_yaml(tmp_path, BASE))
    assert cfg.optim.warmup_steps == cfg.optim.total_steps == 5
    lrs = [float(lr_schedule(cfg.optim)(i)) for i in range(5)]
    np.testing.assert_allclose(lrs, [1e-5 * i / 5 for i in range(5)], rtol=1e-6)


def test_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """`model` (when it names a local path), output_dir, the data and eval files and media_root are taken relative to
    the working directory, not to the config file's folder; a hub id stays as it is."""
    from glm41v_train.loop import absolute_paths

    (tmp_path / "my model").mkdir()
    (tmp_path / "conf").mkdir()
    cfg_path = _yaml(tmp_path / "conf", "model: my model\noutput_dir: runs/a b\nsteps: 5\n"
                     "data: {jsonl: [d 1.jsonl, sub/d2.jsonl], media_root: media, seq_len: 64}\n"
                     "eval: {jsonl: v.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(os.path.join("conf", "c.yaml")))
    assert cfg_path.startswith(str(tmp_path))
    assert cfg.model == str(tmp_path / "my model") and cfg.output_dir == str(tmp_path / "runs" / "a b")
    assert cfg.data.jsonl == (str(tmp_path / "d 1.jsonl"), str(tmp_path / "sub" / "d2.jsonl"))
    assert cfg.data.media_root == str(tmp_path / "media") and cfg.eval.jsonl == str(tmp_path / "v.jsonl")
    hub = absolute_paths(load_config(os.path.join("conf", "c.yaml"), ["model=THUDM/GLM-4.1V-9B-Thinking"]))
    assert hub.model == "THUDM/GLM-4.1V-9B-Thinking"


def test_config_file_hostile(tmp_path, run_cli):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(BASE.encode() + b"# caf\xe9\n")
    rc, _, err = run_cli("train", "--config", str(bad))
    assert rc == 2 and str(bad) in err and "not UTF-8" in _one_error_line(err)
    rc, _, err = run_cli("train", "--config", str(tmp_path))
    assert rc == 2 and "is a directory" in _one_error_line(err)
    rc, _, err = run_cli("train", "--config", _yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    assert rc == 2 and "expected a mapping at the top level" in _one_error_line(err)
    rc, _, err = run_cli("train", "--config", _yaml(tmp_path, "a: [" * 3000 + "]" * 3000, "deep.yaml"))
    assert rc == 2 and "deep.yaml" in _one_error_line(err)


@pytest.mark.parametrize("address,why", [
    ("host", "expected HOST:PORT"),
    ("host:port:x", "the host part"),
    (":99999", "the host is empty"),
    ("host:99999", "not an integer in [1, 65535]"),
    ("host:http", "not an integer in [1, 65535]"),
])
def test_malformed_coordinator(tmp_path, run_cli, address, why):
    rc, _, err = run_cli("train", "--config", _yaml(tmp_path, BASE), "--coordinator", address, "--num-processes", "2",
                         "--process-id", "0")
    line = _one_error_line(err)
    assert rc == 2 and "--coordinator" in line and why in line, line


def test_values_that_crashed_later(tmp_path, run_cli):
    """max_patches not a multiple of merge^2, an empty data file: one line naming the field, exit 2."""
    out = str(tmp_path / "o")
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", "data.max_patches=130",
                         *QUIET)
    line = _one_error_line(err)
    assert rc == 2 and "data.max_patches (130) must be a multiple of 4" in line, line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", f"data.jsonl={empty}",
                         *QUIET)
    line = _one_error_line(err)
    assert rc == 2 and str(empty) in line and "no records" in line, line
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", f"eval.jsonl={empty}",
                         "--set", "progress=false")
    line = _one_error_line(err)
    assert rc == 2 and f"eval.jsonl {empty}: no records" in line, line
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", f"data.jsonl={tmp_path}",
                         *QUIET)
    assert rc == 2 and f"{tmp_path}: is a directory" in _one_error_line(err)
    rc, _, err = run_cli("loss", "--model", "tiny", "--data", str(empty), "--seq-len", "64", "--mesh", "none")
    assert rc == 2 and "no records" in _one_error_line(err)
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={empty}", *QUIET)
    assert rc == 2 and "not a directory" in _one_error_line(err)
    # every record bad, epochs repeating forever: an error once two epochs in a row gave nothing, not a spin
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(_hostile_lines()[1:-1]) + b"\n")
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", f"data.jsonl={bad}",
                         *QUIET)
    line = _one_error_line(err)
    assert rc == 2 and f"data.jsonl {bad}: no usable record" in line and "malformed_json: " in line, line


@pytest.mark.parametrize("override,why", [("resume_step=5", "resume_step 5: no such checkpoint"),
                                          ("resume=required", "resume is 'required'")])
def test_early_error_is_the_whole_stderr(tmp_path, tiny_cache_dir, override, why):
    """An error right after the checkpoint manager opened: nothing of orbax's background work may print after the
    line (its temporary-directory cleanup thread used to outlive the run and print a traceback at exit)."""
    r = subprocess.run([sys.executable, "-m", "glm41v_jax", "train", "--config", SMOKE, "--set",
                        f"output_dir={tmp_path / 'o'}", "--set", override, *QUIET], cwd=REPO,
                       env=_env(tiny_cache_dir, str(tmp_path / "jc")), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [_one_error_line(r.stderr)], r.stderr[-3000:]
    assert why in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad records: whatever a record holds, it is a bad record under the policy.


def _hostile_lines():
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    return [
        good.encode(),
        b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",  # json.loads raises RecursionError
        b'{"messages": [{"role": ' + b"[" * 900 + b"]" * 900 + b"}]}",  # parses; its repr would recurse
        b'{"messages": [{"role": "user", "content": "\xff\xfe caf\xe9"}]}',  # not UTF-8
        b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
        b'{"messages": [{"role": "user", "content": 1' + b"0" * 5000 + b'}]}',  # an int past the digit limit
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
        good.encode(),
    ]


def test_hostile_records_are_skipped(tmp_path, run_cli, monkeypatch):
    d = tmp_path / "data dir"
    d.mkdir()
    path = d / "bad data.jsonl"
    path.write_bytes(b"\n".join(_hostile_lines()) + b"\n")
    monkeypatch.chdir(d)  # a relative path with a space, from the data's folder
    rc, out, err = run_cli("loss", "--model", "tiny", "--data", "bad data.jsonl", "--seq-len", "64", "--mesh", "none",
                           "--json")
    assert rc == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["samples"] == 2 and got["skipped"] == 6
    rc, _, err = run_cli("loss", "--model", "tiny", "--data", str(path), "--seq-len", "64", "--mesh", "none",
                         "--on-error", "raise")
    line = _one_error_line(err)
    assert rc == 2 and f"{path}:2:" in line and "nested too deeply" in line, line
    for flag, value in (("--seq-len", "0"), ("--batch-size", "1000000"), ("--max-patches", str(2**40))):
        rc, _, err = run_cli("loss", "--model", "tiny", "--data", str(path), flag, value)
        assert rc == 2 and f"{flag} {value}: expected an integer in [1, " in _one_error_line(err)


def test_oversized_line_is_a_bad_record(tmp_path, monkeypatch):
    from glm41v_train import encode, sources

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 100)
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": []}\n' + json.dumps({"messages": [{"role": "user", "content": "x" * 200}]}) + "\n")
    src = sources.JsonlSource(str(path))
    enc = encode.ConversationEncoder("unused", 64, 64)
    with pytest.raises(encode.DataError) as e:
        enc(src[1])
    assert e.value.reason == "bad_record" and "over the" in str(e.value) and e.value.where.endswith(":2")


# ---------------------------------------------------------------------------------------------------------------
# The run lock.

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from glm41v_train.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_refuses_live_run_and_takes_over_a_dead_one(tmp_path, run_cli):
    out = str(tmp_path / "run")
    os.makedirs(out)
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER.format(repo=REPO))
    holder = subprocess.Popen([sys.executable, str(script), out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            RunLock(out).acquire()
        assert f"pid {holder.pid}" in str(e.value) and "host " in str(e.value)
        # the CLI refuses before touching anything in output_dir
        rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", *QUIET)
        line = _one_error_line(err)
        assert rc == 2 and "in use by another training run" in line and f"pid {holder.pid}" in line, line
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()  # kill -9: the kernel releases the lock; the file still names the dead holder
        holder.wait()
    lock = RunLock(out).acquire()
    try:
        assert lock.took_over is not None and f"pid {holder.pid}" in lock.took_over
        with open(os.path.join(out, LOCK_NAME)) as f:
            assert json.load(f)["pid"] == os.getpid()
    finally:
        lock.release()
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert f.read() == ""  # released: emptied, not deleted
    again = RunLock(out).acquire()
    assert again.took_over is None
    again.release()


def test_lock_without_file_locks_falls_back_to_the_pid(tmp_path, monkeypatch):
    """On a filesystem without flock (mocked: the call fails with ENOLCK, as on such mounts), a lock file naming a
    dead pid on this host is taken over, a live one (this test's parent) is refused, another host's is refused."""
    import errno
    import fcntl
    import socket

    from glm41v_train import run_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    assert fcntl.flock is no_locks
    path = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, host, ok in [(dead.pid, socket.gethostname(), True), (os.getppid(), socket.gethostname(), False),
                          (dead.pid, "elsewhere", False)]:
        path.write_text(json.dumps({"host": host, "pid": pid}))
        if ok:
            lock = RunLock(str(tmp_path)).acquire()
            assert f"pid {pid}" in lock.took_over
            lock.release()
        else:
            with pytest.raises(RunLockedError) as e:
                RunLock(str(tmp_path)).acquire()
            assert f"host {host}, pid {pid}" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite training: the step skips the update; the loop stops after the patience, keeps the last good checkpoint.


def test_step_skips_a_nonfinite_update(tiny_cache_dir):
    from glm41v_jax import load, tiny
    from glm41v_train.data import DataConfig, make_iterator
    from glm41v_train.optim import OptimConfig
    from glm41v_train.step import StepConfig, TrainStep

    ckpt = tiny.materialize_tiny_checkpoint(os.path.join(tiny_cache_dir, "hardening_ckpt"))
    params, mcfg = load(ckpt, as_numpy=True)
    ts = TrainStep(mcfg, OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=4), None,
                   StepConfig(compute_dtype="float32", remat_policy="none", loss_chunk=64))
    it = make_iterator(DataConfig(jsonl=os.path.join(SMOKE_DATA, "train.jsonl"), seq_len=64, batch_size=1,
                                  max_patches=64), ckpt, 0, 1, mcfg)
    batch = next(it)
    it.close()
    p = ts.place_params(params)
    opt = ts.init_opt_state(p)
    p, opt, m = ts(p, opt, ts.shard_batch(batch))  # one finite step
    assert np.isfinite(float(m["loss"]))
    # one non-finite weight: loss and gradient norm are NaN; applied, the update would turn every weight NaN
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.nan if "embed_tokens" in jax.tree_util.keystr(path) else x, p)
    before = jax.tree.map(np.asarray, (p, opt))
    p, opt, m = ts(p, opt, ts.shard_batch(batch))
    assert not np.isfinite(float(m["loss"])) or not np.isfinite(float(m["grad_norm"]))
    after = jax.tree.map(np.asarray, (p, opt))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # params and optimizer state (its step count too) unchanged
    assert np.isfinite(np.asarray(p["lm_head"]["kernel"])).all()


NAN_SET = ["--set", "optim.peak_lr=1e30", "--set", "optim.warmup_steps=0", "--set", "save_every=1", "--set",
           "log_every=3", "--set", "steps=6", *QUIET]


@pytest.mark.slow
@pytest.mark.parametrize("patience", [0, 2])
def test_nonfinite_loss_stops_the_run(tmp_path, tiny_cache_dir, jit_cache, patience):
    """peak_lr 1e30 (finite, valid): step 1 (loss finite) moves the weights by ~1e30, and from step 2 on the loss
    is NaN. The run exits 2 naming the step, keeps checkpoint 1, writes no checkpoint after it and no final/."""
    out = str(tmp_path / "run")
    log = out + ".log"
    p = _start(["train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", f"nonfinite_patience={patience}",
                *NAN_SET], log, _env(tiny_cache_dir, jit_cache))
    assert _finish(p) == 2, _tail(log)
    line = _one_error_line(_tail(log, 100000))
    stop = 2 + patience
    assert f"training stopped at step {stop}: non-finite loss" in line and "since step 2" in line, line
    assert f"the last good checkpoint is {out}/checkpoints/1" in line
    assert _committed(out) == [1] and not os.path.exists(os.path.join(out, "final"))
    m = _metrics(out)
    assert np.isfinite(m[0]["loss"]) and [r["step"] for r in m][:stop] == list(range(1, stop + 1))
    assert all(r["loss"] is None and r["update_skipped"] for r in m[1:stop])


# ---------------------------------------------------------------------------------------------------------------
# A full disk (mocked) and a corrupt checkpoint: one line, the earlier checkpoints kept.

_ENOSPC = """
import builtins, errno, io, os, sys
# A real full disk cannot be made here (no root, no small filesystem to mount): the Python-level file writes of
# checkpoint 4 fail with ENOSPC, as they would on a full disk (orbax writes its metadata files this way).
_open = builtins.open
def fake_open(file, mode="r", *a, **k):
    p = str(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
    if any(c in mode for c in "wax") and "/checkpoints/4" in p:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p)
    return _open(file, mode, *a, **k)
builtins.open = io.open = fake_open
from glm41v_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_full_disk_during_a_checkpoint(tmp_path, tiny_cache_dir, jit_cache):
    out = str(tmp_path / "run")
    script = tmp_path / "enospc.py"
    script.write_text(_ENOSPC)
    argv = ["train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", "save_every=2", *QUIET]
    env = _env(tiny_cache_dir, jit_cache)
    r = subprocess.run([sys.executable, str(script), *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert f"checkpoint {out}/checkpoints/4 could not be written" in line and "No space left" in line, line
    assert f"the last complete checkpoint is {out}/checkpoints/2" in line
    assert sum(ln.startswith("error:") for ln in r.stderr.splitlines()) == 1
    assert _committed(out) == [2] and not os.path.exists(os.path.join(out, "final"))
    # space is back: the same command resumes from checkpoint 2
    log = out + ".2.log"
    p = _start(argv, log, env)
    assert _finish(p) == 0, _tail(log)
    assert f"resumed from {out}/checkpoints/2 at step 2" in _tail(log, 100000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_cache_dir, jit_cache):
    """A finished 4-step smoke run, from another working directory, with relative paths holding spaces."""
    cwd = tmp_path_factory.mktemp("cwd")
    shutil.copytree(SMOKE_DATA, cwd / "my data")
    with open(cwd / "my data" / "train.jsonl", "ab") as f:  # hostile records in the training data too
        f.write(b"\n".join(_hostile_lines()[1:-1]) + b"\n")
    with open(SMOKE, encoding="utf-8") as f:
        text = f.read().replace("train/configs/smoke_data/train.jsonl", "my data/train.jsonl")
    (cwd / "my config.yaml").write_text(text.replace("output_dir: runs/cpu_smoke", "output_dir: runs/my run"))
    argv = ["train", "--config", "my config.yaml", "--set", "steps=4", "--set", "save_every=2", *QUIET]
    env = _env(tiny_cache_dir, jit_cache)
    r = subprocess.run([sys.executable, "-m", "glm41v_jax", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(cwd), argv, env, r


@pytest.mark.slow
def test_relative_paths_from_another_cwd(finished):
    cwd, _, _, r = finished
    out = os.path.join(cwd, "runs", "my run")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == {"status": "completed", "step": 4, "output_dir": out, "final": os.path.join(out, "final")}
    assert _committed(out) == [2, 4] and [x["step"] for x in _metrics(out)] == [1, 2, 3, 4]
    with open(os.path.join(out, "final", "training.json")) as f:
        assert json.load(f)["step"] == 4


@pytest.mark.slow
def test_raising_steps_rewrites_final(finished, tiny_cache_dir, run_cli):
    from glm41v_jax import load

    cwd, argv, env, _ = finished
    out = os.path.join(cwd, "runs", "my run")
    before, _ = load(os.path.join(out, "final"), as_numpy=True)
    r = subprocess.run([sys.executable, "-m", "glm41v_jax", *argv, "--set", "steps=6"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 6
    with open(os.path.join(out, "final", "training.json")) as f:
        assert json.load(f)["step"] == 6
    assert sorted(n for n in os.listdir(out) if n.startswith("final")) == ["final"]
    after, _ = load(os.path.join(out, "final"), as_numpy=True)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    # the new final weights load
    rc, stdout, err = run_cli("loss", "--model", os.path.join(out, "final"), "--data",
                              os.path.join(SMOKE_DATA, "train.jsonl"), "--seq-len", "128", "--mesh", "none", "--json")
    assert rc == 0, err
    # lowering steps below the checkpoint is refused, naming the field
    r = subprocess.run([sys.executable, "-m", "glm41v_jax", *argv, "--set", "steps=3"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    line = _one_error_line(r.stderr)
    assert r.returncode == 2 and "steps (3) is below the step of the checkpoint" in line, line


@pytest.mark.slow
def test_corrupt_checkpoint_prints_one_line(finished, tmp_path, tiny_cache_dir, jit_cache):
    """A damaged OCDBT manifest: orbax gives up while TensorStore reads are in flight; no "Event loop is closed"
    report may follow the error line."""
    cwd, argv, env, _ = finished
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(cwd, "runs", "my run"), out)
    last = _committed(out)[-1]
    bad = os.path.join(out, "checkpoints", str(last))
    with open(os.path.join(bad, "state", "manifest.ocdbt"), "r+b") as f:
        f.truncate(3)
    r = subprocess.run([sys.executable, "-m", "glm41v_jax", "train", "--config", SMOKE, "--set", f"output_dir={out}",
                        "--set", f"steps={last + 2}", *QUIET], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [_one_error_line(r.stderr)], r.stderr[-3000:]
    assert f"checkpoint {bad} cannot be restored" in r.stderr and "Event loop" not in r.stderr


@pytest.mark.parametrize("steps,message", [(-1, "steps: expected an integer in [0, 2147483647], got -1"),
                                           (0, "steps must be a positive integer, got 0")])
def test_bad_steps_is_named_as_steps(steps, message):
    """`steps` is copied into optim.total_steps only when it is valid: a bad value is reported under the name the
    user wrote, not under optim.total_steps."""
    with pytest.raises(TrainConfigError) as e:
        config_from_dict({"model": "m", "output_dir": "o", "data": {"jsonl": "a.jsonl"}, "steps": steps})
    assert str(e.value) == message


def test_unretrieved_task_errors_of_a_failed_restore_are_dropped_others_kept():
    """A failed Orbax restore leaves sibling read tasks whose storage error nobody retrieves; asyncio logs each one
    with a traceback when the garbage collector finalises it, at any later time (the CI failure this guards against
    had a plain `_wrap_awaitable` task, no orbax frame in its repr). Those reports are dropped for the whole process;
    an unretrieved task with any other error still reaches the log."""
    import asyncio
    import gc
    import logging

    from glm41v_jax.integrity import install_restore_noise_filters

    install_restore_noise_filters()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(str(record.exc_info[1]) if record.exc_info else record.getMessage())

    async def fails(e: Exception) -> None:
        raise e

    handler = Keep()
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        data_loss = ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading "rng/.zarray" in OCDBT database '
                               'at local file "/x/6/state/": Error decoding manifest: Encoded length (3) is less than '
                               "minimum length (16) [tensorstore_spec='{}']")
        for e in (data_loss, RuntimeError("an unrelated bug")):
            loop = asyncio.new_event_loop()

            async def start(e=e) -> None:
                asyncio.ensure_future(fails(e))
                await asyncio.sleep(0)

            loop.run_until_complete(start())
            loop.close()
            gc.collect()
    finally:
        log.removeHandler(handler)
    assert seen == ["an unrelated bug"]
