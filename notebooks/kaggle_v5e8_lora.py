# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sharded LoRA fine-tuning of GLM-4.1V-9B-Thinking on a Kaggle TPU v5e-8
#
# This notebook fine-tunes the 9B vision-language model with [glm41v-jax](../README.md) on Kaggle's TPU v5e-8
# (8 chips x 16 GB of HBM): rank-8 LoRA adapters on every linear layer of the text decoder, the bf16 base split over
# the 8 chips (`mesh: fsdp=8`). Then it merges the adapter into an HF safetensors checkpoint that transformers and
# vLLM load, and checks that checkpoint against the trained model.
#
# Steps: install, device check, Kaggle's folders and output cap, download and conversion, the mesh and
# `glm41v plan`'s table, an eval before training, training with checkpoints (and resuming after a kernel restart),
# the loss plot, the eval after, the merged export (size-checked) and a reload-and-compare.
#
# **Kaggle settings**: Accelerator "TPU v5e-8", Internet on (the install and the Hub download), and your training
# data attached as a Kaggle dataset (Add data), holding `train.jsonl`, `val.jsonl` and their images in the format of
# `train/README.md` ("Training data").
#
# **Test mode.** With `GLM41V_NOTEBOOK_TEST=1` the same cells run on the embedded tiny random checkpoint, with 8
# virtual CPU devices standing in for the 8 chips and a tiny dataset shipped in the repository: this is how CI
# executes the notebook on every change. Only the install and the Hub download are skipped there, and they say so.

# %% [markdown]
# ## 1. Mode
# One switch, read from the environment (leave it unset on Kaggle). In test mode the CPU is split into 8 devices,
# which has to happen before jax starts.

# %%
import os

TEST = os.environ.get("GLM41V_NOTEBOOK_TEST", "").strip().lower() in ("1", "true", "yes", "on")
if TEST:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# %% [markdown]
# ## 2. Install (pinned)
# Kaggle's preinstalled jax is too old: the repository is cloned (the training configs live in it) and installed with
# its TPU, Hub, training and notebook extras and the jax / libtpu pair it is tested with. When that changes jax, the
# kernel restarts: run the notebook again from the top, and this cell then finds jax unchanged and goes on.

# %%
import subprocess
import sys

JAX_PIN = "0.10.2"  # the jax (and its libtpu) that the package's tests run (pyproject.toml's test extra)
GITHUB = "<your-fork>"  # OWNER/REPO of this repository on GitHub
REF = "main"  # a commit or tag pins the package too
REPO_DIR = "/kaggle/temp/glm41v-jax"


def installed_jax() -> str:
    """The jax version a fresh interpreter imports (this kernel's own import would not see the install)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "none"


if TEST:
    from glm41v_jax import notebook as nb

    nb.skipped("git clone + pip install of the package, jax and libtpu", "the test environment has them installed")
else:
    before = installed_jax()
    if not os.path.isdir(REPO_DIR):
        subprocess.run(["git", "clone", "-q", f"https://github.com/{GITHUB}", REPO_DIR], check=True)
        subprocess.run(["git", "-C", REPO_DIR, "checkout", "-q", REF], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{REPO_DIR}[tpu,hub,train,notebooks]",
                    f"jax[tpu]=={JAX_PIN}"], check=True)
    after = installed_jax()
    print(f"jax before: {before}, after: {after}")
    if after != before:
        print("jax changed: restarting the kernel. Run the notebook again from the top.")
        os.kill(os.getpid(), 9)

# %% [markdown]
# ## 3. Device check
# The platform, the chips, their HBM and the versions. On another device it says what will and will not work.

# %%
from glm41v_jax import notebook as nb

TEST = nb.test_mode()
nb.banner(TEST, real="GLM-4.1V-9B-Thinking from the Hub, LoRA on a TPU v5e-8")
report = nb.device_report(expect="tpu-v5e-8")
print(report)

# %% [markdown]
# ## 4. Kaggle's folders, the 20 GB output cap, the run's settings
# On Kaggle, `/kaggle/input` is read-only (attached datasets), and `/kaggle/working` is the notebook's output: saved
# with the notebook version, capped at **20 GB**. The rest of the disk is writable but not saved (the cell prints
# what is free); this notebook keeps the download and the converted weights (20.6 GB each; the download is removed
# once converted) and the training checkpoints in `/kaggle/temp`, and writes only the final export (and the loss plot
# and the compilation cache) into `/kaggle/working`, after checking its size against the cap (`output_bytes`,
# `check_output_cap`). In test mode both roots are folders under the current directory.
#
# The settings of every later cell are here: after a kernel restart, sections 1, 3, 4 (and 9, for its helpers) bring
# them back.

# %%
import shutil

if TEST:
    ROOT = os.path.abspath("kaggle_nb")
    WORKING, SCRATCH, INPUT = (os.path.join(ROOT, d) for d in ("working", "temp", "input"))
else:
    WORKING, SCRATCH, INPUT = "/kaggle/working", "/kaggle/temp", "/kaggle/input/my-sft-data"
OUTPUT_CAP = 20 * 10**9  # bytes: Kaggle's "20 GB" of saved output, read as 10^9 bytes (the stricter reading)
for d in (WORKING, SCRATCH):
    os.makedirs(d, exist_ok=True)
    du = shutil.disk_usage(d)
    print(f"{d}: {du.free / 1e9:.1f} GB free of {du.total / 1e9:.1f} GB")

HF_DIR = os.path.join(SCRATCH, "hf", "GLM-4.1V-9B-Thinking")
BASE_DIR = os.path.join(SCRATCH, "glm41v-9b")  # the converted bf16 base (frozen)
RUN_DIR = os.path.join(SCRATCH, "runs", "lora")  # checkpoints/ (adapters + optimizer + data state), final/
EXPORT_DIR = os.path.join(WORKING, "glm41v-9b-lora-merged")  # the merged HF checkpoint (section 12)
TRAIN_JSONL, VAL_JSONL = os.path.join(INPUT, "train.jsonl"), os.path.join(INPUT, "val.jsonl")
MESH = "fsdp=8"  # the 8 chips (or the 8 CPU devices of test mode), as the config says
print("compilation cache:", nb.enable_compilation_cache(os.path.join(WORKING, "jax_cache")))

import glm41v_train  # noqa: E402

CONFIG_DIRS = [os.path.join(os.path.dirname(glm41v_train.__file__), "configs"),
               os.path.join(REPO_DIR, "train", "configs")]  # an editable install / the clone of section 2
CONFIG = next(os.path.join(d, "kaggle_v5e8_lora.yaml") for d in CONFIG_DIRS
              if os.path.isfile(os.path.join(d, "kaggle_v5e8_lora.yaml")))
N_STEPS = 500  # the first training call stops here; the resumed one goes on to 2 * N_STEPS
# steps and the schedule's total_steps are the whole run's (2 x N_STEPS) in both calls: the first call stops early
# (section 10), so the two calls train exactly as one uninterrupted run would, with the same compiled step.
OVERRIDES = [f"model={BASE_DIR}", f"output_dir={RUN_DIR}", f"mesh={MESH}", f"data.jsonl={TRAIN_JSONL}",
             f"eval.jsonl={VAL_JSONL}", f"steps={2 * N_STEPS}", f"optim.total_steps={2 * N_STEPS}", "progress=false",
             "save_every=100", "eval.every=250"]
if TEST:  # the tiny model on 8 CPU devices: train/configs/cpu_lora.yaml's settings, one 64-token row per device;
    # no eval during training (its compile would double this CPU's time; sections 9 and 11 measure the held-out loss),
    # per-layer weights instead of the scan (on XLA:CPU it compiles in 2/3 of the time: train/README.md)
    N_STEPS = 3
    OVERRIDES += [f"steps={2 * N_STEPS}", f"optim.total_steps={2 * N_STEPS}", f"save_every={N_STEPS}", "eval=null",
                  "log_every=2",
                  "tensorboard=false", "data.seq_len=64", "data.batch_size=8", "data.max_patches=256",
                  "data.worker_count=0", "step.compute_dtype=float32", "step.param_dtype=float32",
                  "step.loss_chunk=128", "step.remat_policy=none", "step.scan_layers=false", "optim.peak_lr=1e-2",
                  "optim.end_lr=1e-3", "optim.warmup_steps=2"]


def output_bytes(path: str) -> int:
    """Bytes of the files under `path` (a file or a folder), as Kaggle counts saved output."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def check_output_cap(path: str = WORKING, cap: int = OUTPUT_CAP) -> int:
    """The bytes under `path`; a RuntimeError naming the excess when they pass Kaggle's output cap (the notebook's
    version would not save), a warning line when within 10% of it."""
    n = output_bytes(path)
    if n > cap:
        raise RuntimeError(f"{path}: {n / 1e9:.2f} GB, over Kaggle's {cap / 1e9:.0f} GB output cap by "
                           f"{(n - cap) / 1e9:.2f} GB: move something to {SCRATCH} (not saved) or delete it")
    if n > 0.9 * cap:
        print(f"warning: {path} holds {n / 1e9:.2f} GB, within 10% of the {cap / 1e9:.0f} GB cap")
    return n


print(f"{WORKING}: {check_output_cap() / 1e6:.1f} MB of the {OUTPUT_CAP / 1e9:.0f} GB cap used")

# %% [markdown]
# ## 5. Hub token (optional)
# GLM-4.1V-9B-Thinking is public: a token only raises the download rate limit. It comes from Kaggle's secrets
# (Add-ons > Secrets, a secret named `HF_TOKEN` attached to this notebook), else the `HF_TOKEN` environment variable.

# %%
token = None
try:
    from kaggle_secrets import UserSecretsClient

    token = UserSecretsClient().get_secret("HF_TOKEN")
except Exception:  # not on Kaggle, or no such secret attached
    token = None
token = token or os.environ.get("HF_TOKEN") or None
print("Hub token:", "yes" if token else "none (anonymous download)")

# %% [markdown]
# ## 6. Download and convert (once)
# Only the files the model needs (about 20.6 GB), then the conversion to the Orbax layout this library restores onto
# any mesh, in bf16, in `/kaggle/temp`; the download is removed afterwards. In test mode the embedded tiny checkpoint
# is written instead.

# %%
import time

from glm41v_convert.hf_to_orbax import convert
from glm41v_jax import tiny
from glm41v_jax.checkpoint_format import SIDE_FILES

REPO_ID = "zai-org/GLM-4.1V-9B-Thinking"
if os.path.exists(os.path.join(BASE_DIR, "CONVERSION_COMPLETE")):
    print("already converted:", BASE_DIR)
else:
    if TEST:
        nb.skipped(f"snapshot_download({REPO_ID!r})", "the tiny checkpoint stands in for it")
        tiny.materialize_tiny_checkpoint(HF_DIR)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(REPO_ID, local_dir=HF_DIR, token=token,
                          allow_patterns=[*SIDE_FILES, "*.safetensors", "model.safetensors.index.json"])
    t0 = time.perf_counter()
    convert(HF_DIR, BASE_DIR, dtype="bfloat16", progress=not TEST)
    print(f"converted in {time.perf_counter() - t0:.1f}s -> {BASE_DIR}")
    shutil.rmtree(HF_DIR)  # not needed any more (the converted directory holds the side files): 20.6 GB back
    print("removed the download", HF_DIR)

# %% [markdown]
# ## 7. The data
# Your dataset, attached at `/kaggle/input/my-sft-data` (change `INPUT` in section 4 to its folder). In test mode the
# tiny VQA set of the repository (`notebooks/data/tiny_vqa`: drawn shapes, a question and a short answer each) is
# written in the same format, 9 records for training and 3 held out.

# %%
import json

if TEST:
    src = "data/tiny_vqa"
    shutil.copytree(os.path.join(src, "images"), os.path.join(INPUT, "images"), dirs_exist_ok=True)
    with open(os.path.join(src, "rows.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    recs = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": r["image"]}, {"type": "text", "text": r["question"]}]},
        {"role": "assistant", "content": f"<think></think><answer>{r['multiple_choice_answer']}</answer>"}]}
        for r in rows]
    for path, part in ((TRAIN_JSONL, recs[:-3]), (VAL_JSONL, recs[-3:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
for path in (TRAIN_JSONL, VAL_JSONL):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: attach your dataset (train.jsonl, val.jsonl) or change INPUT in section 4")
    with open(path, encoding="utf-8") as f:
        print(f"{path}: {sum(1 for line in f if line.strip())} records")

# %% [markdown]
# ## 8. The mesh over the 8 chips, and `glm41v plan`'s table
# `fsdp=8` splits every weight (and the batch's rows) 8 ways; each layer's weights are gathered when it runs.
# `glm41v plan` compiles this training step with the real TPU compiler on the host (no TPU needed; 9.5 minutes for
# the 9B on a shared 2-core CPU: 7.42 GiB per chip) and prints the memory per chip and the step's FLOPs: here
# `train/configs/kaggle_v5e8_lora.yaml` on the 9B.
# Test mode prints the mesh and the command, and skips the compile (half a minute of a shared CI CPU for the tiny
# model; `tests/test_tpu_train.py` compiles this config for the v5e-8 in CI).

# %%
from glm41v_jax.sharding import make_mesh

mesh = make_mesh(MESH)
print("mesh:", dict(mesh.shape), "over", len(mesh.devices.flat), "devices:", mesh.devices.flat[0].device_kind)
plan_cmd = [sys.executable, "-m", "glm41v_jax", "plan", "--tpu", "v5e-8", "train", "--config", CONFIG,
            *[a for o in OVERRIDES for a in ("--set", o)], "--no-flops-count"]
print("$ glm41v", " ".join(plan_cmd[3:]))
if TEST:
    nb.skipped("glm41v plan's TPU compile", "tests/test_tpu_train.py compiles this config for the v5e-8")
else:
    plan = subprocess.run(plan_cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    print(plan.stdout or plan.stderr)

# %% [markdown]
# ## 9. Before training: the eval loss and three answers
# `glm41v loss` (run here in this kernel, as on the command line) gives the token-weighted mean loss of the base on
# the held-out file; the pipeline answers three held-out questions.

# %%
import contextlib
import gc
import io
import json

from glm41v_jax import Pipeline, Request
from glm41v_jax.cli import main as glm41v


def eval_loss(*adapter: str) -> float:
    """`glm41v loss` on VAL_JSONL (the base, or with `--adapter DIR`): the mean loss over its label tokens."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = glm41v(["loss", "--model", BASE_DIR, *(["--adapter", *adapter] if adapter else []), "--data", VAL_JSONL,
                     "--seq-len", "64" if TEST else "8192", "--batch-size", "8", "--mesh", MESH, "--json"])
    gc.collect()  # the evaluator's arrays (the base on the chips) are released here
    if rc != 0:
        raise RuntimeError(f"glm41v loss exited with {rc}")
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    print(f"eval loss {result['loss']:.4f} over {result['tokens']} tokens in {result['samples']} samples")
    return result["loss"]


with open(VAL_JSONL, encoding="utf-8") as f:
    held_out = [json.loads(line) for line in f if line.strip()][:3]
PROMPTS = [Request(r["messages"][0]["content"][-1]["text"],
                   images=[os.path.join(INPUT, c["image"]) for c in r["messages"][0]["content"] if "image" in c])
           for r in held_out]


def answers(**load_kw) -> list[str]:
    """The answers of the base (or the base with `adapter=DIR`) to PROMPTS, greedy; the pipeline is freed."""
    pipe = Pipeline.load(BASE_DIR, max_context=512 if TEST else 8192, **load_kw)
    out = [rec["answer"] or rec["text"] for rec in pipe.generate(PROMPTS, max_new_tokens=16 if TEST else 512)]
    del pipe
    gc.collect()
    return out


loss_before = eval_loss()
answers_before = answers()
for req, ans in zip(PROMPTS, answers_before, strict=True):
    print(f"Q: {req.prompt}\nA (base): {ans!r}")

# %% [markdown]
# ## 10. Training, with checkpoints
# The trainer runs in a background thread of this kernel (the chips stay with this kernel); the cell redraws the loss
# plot and a progress bar from the run's `metrics.jsonl`. Checkpoints (adapters, optimizer and data-iterator state;
# tens of MB) go to `RUN_DIR/checkpoints` every `save_every` steps. Interrupting the cell stops the run after the step
# in flight, with a checkpoint of it.
#
# **After a kernel restart (or a Kaggle session that ended), run sections 1, 3, 4 and 9, then from here: training
# resumes from the last checkpoint.** (`resume: auto`: the same config finds the checkpoints in `RUN_DIR` and
# continues, with the same data order, up to `steps`.) This notebook shows it: the first call below stops at step
# N_STEPS, the second is what a restarted kernel runs and continues to 2 x N_STEPS.

# %%
import threading

from tqdm import tqdm

from glm41v_train.config import load_config
from glm41v_train.loop import absolute_paths
from glm41v_train.trainer import Preemption, Trainer


def run_training(cfg, title: str) -> dict:
    """Run (or resume) the training run of `cfg` in a background thread; meanwhile redraw the loss plot and the
    progress bar from its metrics.jsonl. Returns the trainer's summary (status, step, final)."""
    preempt = Preemption()  # its flag: stop after the step in flight, with a checkpoint of it
    result, failure = {}, []

    def work() -> None:
        try:
            with contextlib.ExitStack() as stack:
                result.update(Trainer(absolute_paths(cfg), preempt, stack).run())
        except BaseException as e:  # noqa: BLE001  (re-raised in the notebook's thread below)
            failure.append(e)

    worker = threading.Thread(target=work, name="glm41v-train", daemon=True)
    plot = nb.LossPlot(title=title)
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    recs = nb.read_metrics(metrics) if os.path.isfile(metrics) else []
    bar = tqdm(total=cfg.steps, initial=recs[-1]["step"] if recs else 0, unit="step", desc="training")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(timeout=2.0)
            recs = nb.read_metrics(metrics) if os.path.isfile(metrics) else []
            if recs and recs[-1]["step"] > bar.n:
                plot.update(recs)
                bar.update(recs[-1]["step"] - bar.n)
                bar.set_postfix(loss=f"{recs[-1]['loss']:.3f}")
    except KeyboardInterrupt:
        print("interrupted: stopping after the step in flight (a checkpoint of it is written) ...")
        preempt.flag = True
        worker.join()
    bar.close()
    gc.collect()  # the trainer's arrays (the base on the chips) are released here
    if failure:
        raise failure[0]
    return result


def checkpoints() -> list[int]:
    folder = os.path.join(RUN_DIR, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


if checkpoints() and checkpoints()[-1] >= N_STEPS:  # after a restart past N_STEPS: the next cell resumes
    print(f"the run already has a checkpoint of step {checkpoints()[-1]}: on to the next cell")
else:
    first = run_training(load_config(CONFIG, [*OVERRIDES, f"steps={N_STEPS}"]), f"LoRA, steps 1-{N_STEPS}")
    print(first, "checkpoints:", checkpoints())

# %% [markdown]
# The second call: the config's full `steps` (2 x N_STEPS). It restores the latest checkpoint (adapters, optimizer
# state, data position) and continues from there; after a real restart this is the cell to run.

# %%
cfg = load_config(CONFIG, OVERRIDES)
resume_from = checkpoints()[-1] if checkpoints() else None
print(f"resuming from checkpoint step {resume_from}" if resume_from else "no checkpoint: starting from step 0")
summary = run_training(cfg, "LoRA (resumed)")
steps = [r["step"] for r in nb.read_metrics(RUN_DIR)]
assert summary["step"] == cfg.steps and steps == list(range(1, cfg.steps + 1)), (summary, steps)
if resume_from:
    print(f"RESUMED at step {resume_from}, trained to step {summary['step']}; checkpoints: {checkpoints()}")

# %% [markdown]
# ## 11. The loss plot, and the eval after training
# Both calls wrote to the same `metrics.jsonl`: one curve over the whole run (train loss per step, held-out loss at
# each eval). The plot is saved in `/kaggle/working`. Then the held-out loss and the three answers again, with the
# adapter (`final/`): `glm41v loss --adapter` runs it unmerged on the base, as in training; the pipeline folds it
# into the weights at load.

# %%
from IPython.display import Image as PngImage
from IPython.display import display

LOSS_PNG = os.path.join(WORKING, "loss.png")
nb.plot_losses(RUN_DIR, path=LOSS_PNG, title="LoRA on the v5e-8")
display(PngImage(filename=LOSS_PNG))
records = nb.read_metrics(RUN_DIR)
print(json.dumps({"losses": [r["loss"] for r in records]}))
loss_after = eval_loss(summary["final"])
answers_after = answers(adapter=summary["final"])
print(f"held-out loss: {loss_before:.4f} before, {loss_after:.4f} after")
for req, b, a in zip(PROMPTS, answers_before, answers_after, strict=True):
    print(f"Q: {req.prompt}\nA (base):    {b!r}\nA (trained): {a!r}")

# %% [markdown]
# ## 12. The merged export, into `/kaggle/working`
# `glm41v export --adapter final --merge` writes one HF safetensors checkpoint with the adapter folded in (fp32,
# rounded once to bf16), in shards of at most 5 GB, with the config, tokenizer and processor files. Its size is
# known before writing (the parameters' count x 2 bytes): an export over the cap is written to `/kaggle/temp`
# instead, with a message. The 9B has 10.29 B parameters, 20.6 GB in bf16, above the cap read as 10^9 bytes (within
# it read as GiB): on Kaggle it then lands in `/kaggle/temp`, from where it can be uploaded to the Hub
# (`huggingface_hub.upload_folder`) in the same session.

# %%
import math
import time

from glm41v_convert.export import export
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.weights import hf_param_shapes

model_cfg = Glm4vConfig.from_file(os.path.join(BASE_DIR, "config.json"))
predicted = 2 * sum(math.prod(s) for s in hf_param_shapes(model_cfg).values())  # bf16
if predicted + check_output_cap() > OUTPUT_CAP:
    EXPORT_DIR = os.path.join(SCRATCH, os.path.basename(EXPORT_DIR))
    print(f"the export ({predicted / 1e9:.2f} GB) would pass the {OUTPUT_CAP / 1e9:.0f} GB output cap: writing it to "
          f"{EXPORT_DIR} (not saved with the notebook)")
shutil.rmtree(EXPORT_DIR, ignore_errors=True)  # a rerun writes it again
t0 = time.perf_counter()
export(BASE_DIR, EXPORT_DIR, dtype="bfloat16", adapter=summary["final"], merge=True)
size = output_bytes(EXPORT_DIR)
print(f"exported in {time.perf_counter() - t0:.1f}s: {EXPORT_DIR}, {size / 1e6:.1f} MB (predicted weights "
      f"{predicted / 1e6:.1f} MB)")
for name in sorted(os.listdir(EXPORT_DIR)):
    print(f"  {name:<36} {os.path.getsize(os.path.join(EXPORT_DIR, name)):>14,} bytes")
print(f"{WORKING}: {check_output_cap() / 1e9:.3f} GB of the {OUTPUT_CAP / 1e9:.0f} GB cap used")

# %% [markdown]
# ## 13. Reload and compare
# The export is loaded back with this library's loader, and with transformers when it is installed (test mode: yes;
# on Kaggle it takes the 9B in fp32 on the host, 41 GB, so it is optional: set `WITH_TRANSFORMERS`). Its logits on
# one prompt are compared with the trained model's: the bf16 base with the adapter unmerged, as it was trained. Both
# run in float32, so the difference is the export's own rounding (the merged weights in bf16). The cell asserts it is
# within 2% of the logits' scale before it prints "RELOADED OK".

# %%
import jax
import numpy as np

from glm41v_jax import load
from glm41v_jax import lora as LO
from glm41v_jax.inputs import prepare_inputs
from glm41v_jax.model import Glm4v
from glm41v_jax.processing import Processor
from glm41v_jax.sharding import make_mesh

F32 = {"param_dtype": "float32", "compute_dtype": "float32"}
processor = Processor.from_dir(BASE_DIR)
enc = {k: v for k, v in processor.encode_messages(PROMPTS[0].to_messages()).items() if isinstance(v, np.ndarray)}

mesh = make_mesh(MESH)
params, base_cfg = load(BASE_DIR, mesh=mesh, **F32)
adapters, lora_cfg, _ = LO.load_adapters(summary["final"], base_cfg)
kw = prepare_inputs(base_cfg, **enc).as_kwargs()
# One compiled program for the three forward passes: the model with adapters (zero adapters add exactly nothing).
with_adapters = jax.jit(lambda v, kw: Glm4v(lora_cfg).apply(v, **kw))
zero = jax.tree.map(np.zeros_like, adapters)
trained = np.asarray(with_adapters({"params": params, "lora": adapters}, kw))
base_logits = np.asarray(with_adapters({"params": params, "lora": zero}, kw))
del params
gc.collect()
reloaded, _ = load(EXPORT_DIR, mesh=mesh, **F32)  # our loader reads the exported HF checkpoint
ours = np.asarray(with_adapters({"params": reloaded, "lora": zero}, kw))
del reloaded
gc.collect()

scale = float(np.abs(trained).max())
tol = 0.02 * scale
d_ours = float(np.abs(ours - trained).max())
print(f"the adapter moves the logits by max {np.abs(trained - base_logits).max():.4f} (scale {scale:.2f}); "
      f"our reload of the export differs from the trained model by {d_ours:.5f} (tolerance {tol:.4f})")
assert d_ours <= tol, f"export reloaded by glm41v_jax: max|dlogits| {d_ours} > {tol}"
d_max = d_ours
WITH_TRANSFORMERS = TEST
if WITH_TRANSFORMERS:
    import torch
    from transformers import Glm4vForConditionalGeneration

    hf_model = Glm4vForConditionalGeneration.from_pretrained(EXPORT_DIR, dtype=torch.float32).eval()
    tkw = {k: torch.from_numpy(v.astype(np.int64 if v.dtype.kind in "iu" else np.float32)) for k, v in enc.items()}
    with torch.no_grad():
        hf_logits = hf_model(**tkw).logits.float().numpy()
    d_hf = float(np.abs(hf_logits - trained).max())
    print(f"transformers' reload of the export differs from the trained model by {d_hf:.5f}")
    assert d_hf <= tol, f"export reloaded by transformers: max|dlogits| {d_hf} > {tol}"
    d_max = max(d_max, d_hf)
    del hf_model
print(f"RELOADED OK max|dlogits|={d_max:.5f} (tolerance {tol:.4f}; "
      f"{'glm41v_jax and transformers' if WITH_TRANSFORMERS else 'glm41v_jax'})")
