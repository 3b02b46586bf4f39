"""The training program (train/loop.py, config.py, checkpoint.py, metrics.py, cli.py): `glm41v loss` against
transformers, the cpu_smoke config end to end, faults (kill -9, kill during a save, SIGTERM, a corrupt checkpoint),
multi-host (2 processes x 4 CPU devices against one process with 8), config errors, FLOP counting.

Training runs are subprocesses (`python -m glm41v_jax train`, one CPU device unless said otherwise) sharing one
persistent compilation cache, so only the first run of each program compiles. References are independent of the
code under test: transformers' model and processor with labels placed by hand (loss), an uninterrupted run (faults),
the step run with gradient accumulation over the two hosts' batches, unassembled (multi-host), the parameter shapes
of transformers' model (FLOPs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from test_train_data import _hand_labels, _mp4, _png, hf_proc  # noqa: F401  (hf_proc: a fixture)

from glm41v_jax import tiny
from glm41v_train.config import TrainConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "train", "configs", "cpu_smoke.yaml")
EOT = 151329


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def ckpt(tiny_cache_dir):
    return tiny.materialize_tiny_checkpoint(os.path.join(tiny_cache_dir, "loop_ckpt"))


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(tiny_cache_dir, jit_cache, devices=1):
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               GLM41V_CACHE=tiny_cache_dir, JAX_COMPILATION_CACHE_DIR=jit_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _start(argv, log, env):
    f = open(log, "w")  # noqa: SIM115  (closed by the caller through _finish)
    p = subprocess.Popen([sys.executable, "-m", "glm41v_jax", *argv], cwd=REPO, env=env, stdout=f,
                         stderr=subprocess.STDOUT)
    p._log = f  # noqa: SLF001
    return p


def _finish(p, timeout=300):
    try:
        rc = p.wait(timeout)
    finally:
        p._log.close()  # noqa: SLF001
    return rc


def _tail(log, n=3000):
    with open(log, errors="replace") as f:
        return f.read()[-n:]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _metrics(out)}


def _committed(out):
    d = os.path.join(out, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(cond, p, what, timeout=240, poll=0.05):
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"the run exited (rc {p.returncode}) before {what}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _last_step(out):
    try:
        m = _metrics(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return m[-1]["step"] if m else 0


FAULT_SET = ["--set", "eval=null", "--set", "save_every=2", "--set", "keep_last=3", "--set", "progress=false"]


def _fault_run(smoke, tmp_path, tiny_cache_dir, jit_cache):
    """(the uninterrupted smoke run's losses, output dir, argv, env) of a smoke run to interrupt."""
    out = str(tmp_path / "run")
    argv = ["train", "--config", SMOKE, "--set", f"output_dir={out}", *FAULT_SET]
    return _losses(smoke[0]), out, argv, _env(tiny_cache_dir, jit_cache)


# ---------------------------------------------------------------------------------------------------------------
# Config.


def _yaml(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BASE = "model: tiny\noutput_dir: out\nsteps: 5\ndata: {jsonl: d.jsonl, seq_len: 64}\n"


@pytest.mark.parametrize("text,overrides,field,why", [
    (BASE + "stepz: 3\n", [], "stepz", "unknown key"),
    (BASE, ["data.seq_lenn=3"], "data.seq_lenn", "unknown key"),
    (BASE, ["data.seq_len=abc"], "data.seq_len", "expected an integer"),
    (BASE, ["data.seq_len=-4"], "data.seq_len", "expected an integer in [0, "),
    (BASE, ["data.seq_len=0"], "data.seq_len", "positive integer"),
    (BASE, ["optim.peak_lr=fast"], "optim.peak_lr", "expected a number"),
    (BASE, ["optim.freeze=[visionn]"], "optim.freeze", "unknown group"),
    (BASE, ["step.accum_steps=0"], "step.accum_steps", ">= 1"),
    (BASE, ["async_save=maybe"], "async_save", "expected true or false"),
    (BASE, ["resume=sometimes"], "resume", "auto, required, never"),
    (BASE, ["eval.every=3"], "eval.jsonl", "required key is missing"),
    (BASE.replace("steps: 5\n", ""), [], "steps", "required key is missing"),
    (BASE, ["data=[1, 2]"], "data", "expected a mapping"),
    (BASE, ["nonsense"], "nonsense", "expected KEY=VALUE"),
])
def test_config_errors_name_the_field(tmp_path, text, overrides, field, why):
    with pytest.raises(TrainConfigError) as e:
        load_config(_yaml(tmp_path, text), overrides)
    msg = str(e.value)
    assert field in msg and why in msg, msg


def test_config_defaults_and_overrides(tmp_path, run_cli):
    cfg = load_config(_yaml(tmp_path, BASE), ["optim.peak_lr=2e-5", "optim.freeze=[vision]", "mesh=data=2,fsdp=4",
                                              "eval.jsonl=v.jsonl", "eval.every=2"])
    assert cfg.optim.total_steps == 5 and cfg.optim.warmup_steps == 5  # defaults follow `steps`
    assert cfg.optim.peak_lr == 2e-5 and cfg.optim.freeze == ("vision",) and cfg.mesh == "data=2,fsdp=4"
    assert cfg.data.seq_len == 64 and cfg.eval.jsonl == "v.jsonl" and cfg.eval.every == 2
    assert load_config(SMOKE).data.jsonl == "train/configs/smoke_data/train.jsonl"
    kaggle = load_config(os.path.join(REPO, "train", "configs", "kaggle_v5e8.yaml"))  # the examples are valid
    assert kaggle.optim.state_dtype == "bfloat16" and kaggle.step.grad_dtype == "bfloat16" and kaggle.mesh == "fsdp=8"
    pod = load_config(os.path.join(REPO, "train", "configs", "v5p_pod.yaml"))
    assert pod.data.max_patches % (4 * 4) == 0 and pod.data.batch_size % 4 == 0  # 4 chips per v5p host
    # through the CLI: one error line, exit code 2
    rc, out, err = run_cli("train", "--config", _yaml(tmp_path, BASE), "--set", "data.packing=yes please")
    assert rc == 2 and err.startswith("error: ") and "data.packing: expected true or false" in err
    rc, out, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={tmp_path}/o", "--set", "mesh=data=3")
    assert rc == 2 and "error: mesh: " in err and "8 are available" in err
    rc, out, err = run_cli("train", "--config", _yaml(tmp_path, BASE), "optim.b1=0.8", "--print-config")
    assert rc == 0 and "b1: 0.8" in out


def test_resume_required_without_checkpoint(tmp_path, run_cli):
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={tmp_path}/empty", "--set",
                         "resume=required")
    assert rc == 2 and "resume is 'required'" in err and "holds no checkpoint" in err


# ---------------------------------------------------------------------------------------------------------------
# glm41v loss against transformers.


@pytest.fixture(scope="module")
def loss_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss_data")
    _png(str(d / "img" / "a.png"), 56, 84, 1)
    _png(str(d / "img" / "b.png"), 84, 56, 2)
    os.makedirs(d / "vid")
    _mp4(str(d / "vid" / "v.mp4"))
    img = lambda n: {"type": "image", "image": f"img/{n}.png"}
    txt = lambda t: {"type": "text", "text": t}
    convs = [
        [{"role": "user", "content": [img("a"), txt("What is it?")]},
         {"role": "assistant", "content": "<think>Noise.</think><answer>static</answer>"}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [txt("Describe the clip."), {"type": "video", "video": "vid/v.mp4"}]},
         {"role": "assistant", "content": "<think>It flickers.</think><answer>flicker</answer>"}],
        [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"},
         {"role": "user", "content": [img("b"), txt("And this?")]},
         {"role": "assistant", "content": "<think>tall</think><answer>a tall one</answer>"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello!"}],
    ]
    path = d / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(d), str(path), convs


def _hf_sample(proc, root, msgs):
    """transformers' processor on the conversation (media decoded for HF as in test_processor.py) + the eos."""
    from test_processor import VIDEO_KW, _hf_meta

    from glm41v_jax.processing import load_video

    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    items = [it for m in msgs if isinstance(m["content"], list) for it in m["content"]]
    images = [Image.open(os.path.join(root, it["image"])).convert("RGB") for it in items if it["type"] == "image"]
    kw = {}
    vids = [os.path.join(root, it["video"]) for it in items if it["type"] == "video"]
    if vids:
        frames, meta = load_video(vids[0])
        kw = dict(videos=[frames], video_metadata=[_hf_meta(meta)], do_sample_frames=True, videos_kwargs=VIDEO_KW)
    out = dict(proc(text=[text], images=images or None, return_tensors="np", **kw))
    ids = [int(t) for t in out["input_ids"][0]] + [EOT]
    out["input_ids"] = np.asarray([ids])
    out["attention_mask"] = np.ones_like(out["input_ids"])
    out["mm_token_type_ids"] = np.concatenate([out["mm_token_type_ids"], [[0]]], axis=1)
    return ids, out


def test_loss_cli_matches_transformers(ckpt, loss_data, hf_proc, run_cli):  # noqa: F811
    import torch
    from transformers import Glm4vForConditionalGeneration

    root, path, convs = loss_data
    hf = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for msgs in convs:
        ids, arrays = _hf_sample(hf_proc, root, msgs)
        contents = [m["content"] for m in msgs if m["role"] == "assistant"]
        labels = _hand_labels(hf_proc, ids, contents, True)
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k != "token_type_ids"}
        with torch.no_grad():
            loss = hf(**kw, labels=torch.tensor([labels])).loss
        n = sum(x != -100 for x in labels[1:])
        total, count = total + float(loss) * n, count + n
    want = total / count
    assert any("video" in it.get("type", "") for m in convs[1] if isinstance(m["content"], list)
               for it in m["content"])
    for extra in ([], ["--no-packing", "--batch-size", "2"]):
        rc, out, err = run_cli("loss", "--model", ckpt, "--data", path, "--seq-len", "256", "--mesh", "none",
                               "--json", *extra)
        assert rc == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert got["samples"] == len(convs) and got["tokens"] == count and got["skipped"] == 0
        np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    # every sample exactly once: the file twice gives the same mean over twice the tokens
    rc, out, err = run_cli("loss", "--model", ckpt, "--data", path, "--data", path, "--seq-len", "256", "--mesh",
                           "none", "--json")
    got = json.loads(out.strip().splitlines()[-1])
    assert got["samples"] == 2 * len(convs) and got["tokens"] == 2 * count
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    rc, _, err = run_cli("loss", "--model", ckpt, "--data", path + ".missing", "--json")
    assert rc == 2 and "no such file" in err


# ---------------------------------------------------------------------------------------------------------------
# The cpu_smoke config end to end (also the uninterrupted reference of the fault tests).


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_cache_dir, jit_cache):
    out = str(tmp_path_factory.mktemp("smoke") / "run")
    log = out + ".log"
    p = _start(["train", "--config", SMOKE, "--set", f"output_dir={out}"], log, _env(tiny_cache_dir, jit_cache))
    rc = _finish(p)
    assert rc == 0, _tail(log)
    return out, log


def _read_tb_scalars(directory):
    """{tag: {step: value}} from TensorBoard event files, read with the TFRecord framing and the Event proto."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


@pytest.mark.slow
def test_cpu_smoke_end_to_end(smoke, run_cli):
    out, log = smoke
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9))
    assert m[-1]["loss"] < 0.7 * m[0]["loss"], [r["loss"] for r in m]
    for r in m[1:]:
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and r["mfu"] is None  # CPU: no peak
        assert 0 < r["batch_efficiency"] <= 1 and 0 < r["packing_efficiency"] <= 1 and r["grad_norm"] > 0
    assert m[0]["lr"] == 0.0 and m[2]["lr"] == pytest.approx(1e-3)  # warmup 2 steps to the peak
    assert "eval_loss" in m[3] and "eval_loss" in m[7] and "eval_loss" not in m[4]
    assert _committed(out) == [4, 8]  # save_every 4, keep_last 2
    tb = _read_tb_scalars(os.path.join(out, "tensorboard"))
    assert sorted(tb["train/loss"]) == list(range(1, 9))
    for r in m:
        assert tb["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert tb["eval/eval_loss"][8] == pytest.approx(m[7]["eval_loss"], rel=1e-6)
    # the final weights load in `glm41v loss` (the trained model: its loss is the loop's eval at step 8) and in
    # `glm41v generate`
    final = os.path.join(out, "final")
    rc, stdout, err = run_cli("loss", "--model", final, "--data", os.path.join(REPO, load_config(SMOKE).data.jsonl),
                              "--seq-len", "128", "--mesh", "none", "--json")
    assert rc == 0, err
    np.testing.assert_allclose(json.loads(stdout.splitlines()[-1])["loss"], m[7]["eval_loss"], rtol=1e-5)
    img = os.path.join(REPO, "train", "configs", "smoke_data", "images", "red_square.png")
    rc, stdout, err = run_cli("generate", "--model", final, "--prompt", "What color is this?", "--image", img,
                              "--max-new-tokens", "4", "--greedy", "--mesh", "none", "--json")
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert 1 <= len(res["token_ids"]) <= 4


# ---------------------------------------------------------------------------------------------------------------
# Faults.


@pytest.mark.slow
def test_kill9_after_checkpoint_then_resume_is_identical(smoke, tmp_path, tiny_cache_dir, jit_cache, run_cli):
    ref, out, argv, env = _fault_run(smoke, tmp_path, tiny_cache_dir, jit_cache)
    p = _start(argv, out + ".1.log", env)
    _wait_for(lambda: 2 in _committed(out) and _last_step(out) >= 3, p, "checkpoint 2 and step 3")
    # a second run on the same output_dir while the first is alive is refused, naming it; nothing is touched
    rc, _, err = run_cli(*argv)
    assert rc == 2 and "in use by another training run" in err and f"pid {p.pid}" in err, err
    assert "Traceback" not in err and p.poll() is None
    first = p.pid
    p.send_signal(signal.SIGKILL)
    assert _finish(p) == -signal.SIGKILL
    restored = _committed(out)[-1]
    assert restored < 8 and _last_step(out) < 8
    p = _start(argv, out + ".2.log", env)
    assert _finish(p) == 0, _tail(out + ".2.log")
    log = _tail(out + ".2.log", 100000)
    assert f"resumed from {out}/checkpoints/{restored} at step {restored}" in log
    assert "took over the lock of a run that ended without releasing it" in log and f"pid {first}" in log
    got = _losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # bit for bit: params, optimizer state and data order all resumed exactly


@pytest.mark.slow
def test_kill_during_save_then_sigterm(smoke, tmp_path, tiny_cache_dir, jit_cache):
    ref, out, argv, env = _fault_run(smoke, tmp_path, tiny_cache_dir, jit_cache)
    tmp4 = os.path.join(out, "checkpoints", "4.orbax-checkpoint-tmp")
    p = _start(argv, out + ".1.log", env)
    _wait_for(lambda: os.path.exists(tmp4), p, "the save of step 4 to start", poll=0.002)
    p.send_signal(signal.SIGKILL)
    assert _finish(p) == -signal.SIGKILL
    assert os.path.isdir(tmp4), "the save finished before the kill"
    assert _committed(out) == [2]  # the interrupted save is not a checkpoint
    # the previous checkpoint still restores: resume, then SIGTERM mid-run -> a checkpoint at the current step
    p = _start(argv, out + ".2.log", env)
    # (metrics.jsonl still holds the killed run's steps until the resumed run has truncated it: wait for that)
    _wait_for(lambda: "resumed from" in _tail(out + ".2.log", 100000) and _last_step(out) >= 4, p,
              "step 4 after the resume")
    p.send_signal(signal.SIGTERM)
    rc = _finish(p)
    log = _tail(out + ".2.log", 100000)
    assert rc == 0, log
    assert f"resumed from {out}/checkpoints/2 at step 2" in log and "SIGTERM" in log
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith("{")][-1])
    last = _last_step(out)
    assert summary["status"] == "preempted" and summary["step"] == last and 4 <= last < 8
    assert _committed(out)[-1] == last and not os.path.exists(tmp4)
    assert not os.path.exists(os.path.join(out, "final"))
    got = _losses(out)
    assert sorted(got) == list(range(1, last + 1)) and all(got[s] == ref[s] for s in got)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax reader futures
def test_corrupt_checkpoint_is_named(smoke, tmp_path, run_cli):
    out = str(tmp_path / "run")
    shutil.copytree(smoke[0], out)
    bad = os.path.join(out, "checkpoints", "8")
    for root, _, files in os.walk(os.path.join(bad, "state", "d")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(7)
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", "progress=false")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint ") and bad in line and "corrupt" in line
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}", "--set", "resume=never")
    assert rc == 2 and "already holds checkpoints" in err  # never silently starts over in a used output_dir
    shutil.rmtree(os.path.join(bad, "meta"))
    rc, _, err = run_cli("train", "--config", SMOKE, "--set", f"output_dir={out}")
    assert rc == 2 and bad in err and "metadata" in err


# ---------------------------------------------------------------------------------------------------------------
# Multi-host.


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _fingerprint(ids):
    return hashlib.sha1(np.asarray(ids, np.int32).tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def mh_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh_data")
    _png(str(d / "a.png"), 56, 84, 3)
    _png(str(d / "b.png"), 56, 56, 4)
    lines = []
    for i in range(43):  # one epoch: 22 records for host 0, 21 for host 1
        user = [{"type": "text", "text": f"Q{i}" + "x" * (i % 7)}]
        if i % 3 != 2:
            user.insert(0, {"type": "image", "image": "ab"[i % 2] + ".png"})
        lines.append({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": f"<think>t{i}</think>A{i}"}]})
    path = d / "mh.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:7]))
    return str(path), str(d / "eval.jsonl"), lines


def _mh_config(tmp_path, data_path, eval_path, out):
    return _yaml(tmp_path, f"""
model: tiny
output_dir: {out}
steps: 20                 # an upper bound: the single epoch ends first
mesh: data=2,fsdp=2,tensor=2
log_every: 1
save_every: 2
log_samples: true
final_dtype: float32
progress: false
data: {{jsonl: {data_path}, seq_len: 64, batch_size: 2, max_patches: 64, seed: 5, num_epochs: 1}}
optim: {{peak_lr: 1.0e-3, warmup_steps: 1, weight_decay: 0.0}}
step: {{compute_dtype: float32, loss_chunk: 64, accum_steps: 2}}
eval: {{jsonl: {eval_path}, every: 2}}
""", "mh.yaml")


@pytest.mark.slow
def test_multihost_two_processes_match_one(tmp_path, mh_data, ckpt, tiny_cache_dir, jit_cache):
    """2 processes x 4 CPU devices (jax.distributed on localhost), 2 micro-batches per step, against one process
    with 8 devices: the same losses, eval losses, stop step (the epoch runs out on one host: both stop together),
    and each process reads a disjoint part of the data, exactly what its shard's iterator yields."""
    import orbax.checkpoint as ocp

    from glm41v_jax import load
    from glm41v_jax.sharding import make_mesh
    from glm41v_jax.weights import unstack_layers
    from glm41v_train.data import make_iterator
    from glm41v_train.encode import ConversationEncoder
    from glm41v_train.evaluate import LossEvaluator
    from glm41v_train.params import abstract_state, place_unrolled
    from glm41v_train.step import TrainStep, stack_batches

    data_path, eval_path, lines = mh_data
    out = str(tmp_path / "mh")
    cfg_path = _mh_config(tmp_path, data_path, eval_path, out)
    port = _free_port()
    env = _env(tiny_cache_dir, jit_cache, devices=4)
    procs = [_start(["train", "--config", cfg_path, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                     "--process-id", str(i)], f"{out}.{i}.log", env) for i in range(2)]
    # Reference, meanwhile: one process, 8 devices, the same mesh; each step is the two hosts' 2 + 2 batches as 4
    # accumulated micro-batches, each with its own vision pack (no offsets, no global assembly); it stops when
    # either shard has no batch left. Eval: every sample of the eval file on one host.
    cfg = load_config(cfg_path)
    params, mcfg = load(ckpt, as_numpy=True)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    ts = TrainStep(mcfg, cfg.optim, mesh, dataclasses.replace(cfg.step, accum_steps=4))
    p = place_unrolled(params, ts)
    opt = ts.init_opt_state(p)
    its = [make_iterator(cfg.data, ckpt, i, 2, mcfg) for i in range(2)]
    eval_ts = TrainStep(mcfg, cfg.optim, mesh, dataclasses.replace(cfg.step, accum_steps=1))
    eval_cfg = dataclasses.replace(cfg.data, jsonl=eval_path, num_epochs=1, shuffle=False)
    ref, ref_eval, ref_samples = [], {}, [[], []]
    while True:
        try:
            host = [[next(it), next(it)] for it in its]
        except StopIteration:
            break
        for i, micro in enumerate(host):
            ref_samples[i].append([_fingerprint(b["input_ids"][r][b["segment_ids"][r] == s]) for b in micro
                                   for r in range(b["segment_ids"].shape[0])
                                   for s in range(1, b["segment_ids"][r].max() + 1)])
        p, opt, m = ts(p, opt, stack_batches(host[0] + host[1]))
        ref.append(float(m["loss"]))
        if len(ref) % 2 == 0:
            it = make_iterator(eval_cfg, ckpt, 0, 1, mcfg)
            total, count, _ = LossEvaluator(eval_ts, 64).run(p, it)
            it.close()
            ref_eval[len(ref)] = total / count
    for it in its:
        it.close()
    k = len(ref)
    assert k >= 2
    rcs = [_finish(q) for q in procs]
    assert rcs == [0, 0], _tail(f"{out}.0.log") + _tail(f"{out}.1.log")
    log0 = _tail(f"{out}.0.log", 100000)
    assert f"the data ran out after step {k}" in log0
    assert json.loads([ln for ln in log0.splitlines() if ln.startswith("{")][-1])["status"] == "exhausted"
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, k + 1))
    np.testing.assert_allclose([r["loss"] for r in m], ref, rtol=1e-5)
    got_eval = {r["step"]: r["eval_loss"] for r in m if "eval_loss" in r}
    assert sorted(got_eval) == sorted(ref_eval)
    np.testing.assert_allclose([got_eval[s] for s in sorted(got_eval)], [ref_eval[s] for s in sorted(ref_eval)],
                               rtol=1e-5)
    # Which samples each host read (its own log) = what its shard's iterator yields; the two parts are disjoint.
    enc = ConversationEncoder(ckpt, 64, 64)
    by_fp = {_fingerprint(enc.encode(x["messages"], os.path.dirname(data_path))["input_ids"]): i
             for i, x in enumerate(lines)}
    read = []
    for i in range(2):
        with open(os.path.join(out, f"samples.host{i}.jsonl")) as f:
            recs = [json.loads(ln) for ln in f]
        assert [r["step"] for r in recs] == list(range(1, k + 1)) and {r["host"] for r in recs} == {i}
        assert [r["samples"] for r in recs] == ref_samples[i]
        read.append([by_fp[fp] for r in recs for fp in r["samples"]])
    assert read[0] and read[1] and not set(read[0]) & set(read[1])
    assert len(set(read[0])) == len(read[0]) and len(set(read[1])) == len(read[1])
    # Checkpoints written by both hosts (each its shards and its data state); the final weights (written by both)
    # are the params of the last checkpoint, bit for bit (restored here on one process with 8 devices).
    assert _committed(out)[-1] == k and 2 in _committed(out)
    assert sorted(os.listdir(os.path.join(out, "checkpoints", str(k), "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    a_params, a_opt = abstract_state(ts)
    target = {"params": a_params, "opt_state": a_opt, "step": np.zeros((), np.int64), "rng": np.zeros(2, np.uint32)}
    state = ocp.StandardCheckpointer().restore(os.path.join(out, "checkpoints", str(k), "state"), target)
    assert int(state["step"]) == k
    saved = unstack_layers(jax.tree.map(np.asarray, state["params"]))
    final, _ = load(os.path.join(out, "final"), as_numpy=True)
    assert jax.tree.structure(final) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(jax.tree.leaves(final), jax.tree.leaves(params),
                                                          strict=True))


def test_vision_offsets_keep_hosts_apart(ckpt, mh_data):
    """The multi-host assembly rule on one process: two hosts' batches, offset and concatenated as
    make_array_from_process_local_data would, give exactly the sum of their separate losses; without the offsets
    the vision tokens of host 1 would be host 0's."""
    from glm41v_jax import load
    from glm41v_train.assembly import offset_vision
    from glm41v_train.data import DataConfig, make_iterator
    from glm41v_train.loss import loss_and_count
    from glm41v_train.step import StepConfig, train_config

    data_path, _, _ = mh_data
    params, mcfg = load(ckpt, as_numpy=True)
    tcfg = train_config(mcfg, StepConfig(compute_dtype="float32", remat_policy="none"))
    from glm41v_jax.weights import stack_layers

    params = stack_layers(params)
    dcfg = DataConfig(jsonl=data_path, seq_len=64, batch_size=2, max_patches=64, seed=5)
    host = []
    for i in range(2):
        it = make_iterator(dcfg, ckpt, i, 2, mcfg)
        host.append(next(it))
        it.close()
    assert all((b["vision_index"] >= 0).any() for b in host)
    fn = jax.jit(lambda p, b: loss_and_count(p, b, tcfg, chunk_size=64))

    def concat(batches):
        out = {k: np.concatenate([b[k] for b in batches], axis=1 if k == "positions" else 0)
               for k in batches[0] if k != "vision"}
        out["vision"] = jax.tree.map(lambda *xs: np.concatenate(xs), *[b["vision"] for b in batches])
        return out

    sums = [fn(params, b) for b in host]
    want = sum(float(s) for s, _ in sums), sum(float(c) for _, c in sums)
    s, c = fn(params, concat([offset_vision(b, i, 64, 4) for i, b in enumerate(host)]))
    assert float(c) == want[1]
    np.testing.assert_allclose(float(s), want[0], rtol=1e-5)
    s_bad, _ = fn(params, concat(host))
    assert abs(float(s_bad) - want[0]) > 1e-3 * want[0]


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and peaks.


def test_flop_counter_and_peaks():
    import torch
    from transformers import Glm4vConfig as HFConfig
    from transformers import Glm4vForConditionalGeneration

    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.inputs import VisionInputs
    from glm41v_train.metrics import FlopCounter, device_peak_tflops
    from glm41v_train.optim import OptimConfig
    from glm41v_train.step import StepConfig, TrainStep, train_config

    d = tiny.tiny_hf_config()
    with torch.device("meta"):
        hf = Glm4vForConditionalGeneration(HFConfig(**d))
    n = {"vision": 0, "projector": 0, "decoder": 0}
    for name, w in hf.named_parameters():
        if not name.endswith("weight") or w.ndim < 2 or "embed_tokens" in name or "position_embedding" in name:
            continue
        group = "decoder" if "language_model" in name or name.startswith("lm_head") else \
            "projector" if ".merger." in name or ".downsample." in name else "vision"
        n[group] += w.numel()
    cfg = Glm4vConfig.from_hf(d)
    ts = TrainStep(cfg, OptimConfig(), None, StepConfig())
    fc = FlopCounter(train_config(cfg, StepConfig()), ts.abstract_params)
    assert fc.n_params == n
    t, v = cfg.text, cfg.vision
    seg = np.array([[1] * 10 + [2] * 6 + [0] * 4, [1] * 20], np.int32)
    vseg = np.array([1] * 24 + [2] * 16 + [0] * 8, np.int32)
    vision = VisionInputs.empty(len(vseg), v.patch_dim).replace(segment_ids=vseg)
    stats = FlopCounter.batch_stats({"segment_ids": seg, "vision": vision})
    assert stats["tokens"] == 36 and stats["patches"] == 40 and stats["slots"] == 40
    attn = 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * (10 * 11 + 6 * 7 + 20 * 21)
    vattn = 4 * v.depth * v.hidden_size * (24**2 + 16**2)
    want = 3 * (2 * n["decoder"] * 36 + attn) + 3 * (2 * n["vision"] * 40 + vattn) + 3 * 2 * n["projector"] * 40 / 4
    assert fc.step_flops(stats) == pytest.approx(want, rel=1e-12)
    frozen = FlopCounter(train_config(cfg, StepConfig()), ts.abstract_params, ("vision", "projector"))
    want_frozen = 3 * (2 * n["decoder"] * 36 + attn) + (2 * n["vision"] * 40 + vattn) + 2 * n["projector"] * 40 / 4
    assert frozen.step_flops(stats) == pytest.approx(want_frozen, rel=1e-12)
    assert device_peak_tflops("TPU v5 lite") == ("TPU v5e", 197.0)
    assert device_peak_tflops("TPU v5p")[1] == 459.0 and device_peak_tflops("TPU v4")[1] == 275.0
    assert device_peak_tflops("TPU v6 lite")[1] == 918.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3")[1] == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB")[1] == 312.0
    assert device_peak_tflops("NVIDIA H200")[1] == 989.0
    assert device_peak_tflops("cpu") is None
