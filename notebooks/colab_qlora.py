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
#   accelerator: TPU
#   colab:
#     gpuType: V5E1
#     provenance: []
# ---

# %% [markdown]
# # QLoRA of GLM-4.1V-9B-Thinking on one Colab TPU v5e-1
#
# This notebook fine-tunes the 9B vision-language model with [glm41v-jax](../README.md) on the single v5e chip of a
# Colab TPU runtime (16 GB of HBM). The base is converted to **weight-only int8** once and stays frozen; rank-8 LoRA
# adapters on every linear layer of the text decoder are the only trained weights (QLoRA).
#
# Steps: device check, install, Hub token, download, int8 conversion, a small public VQA dataset converted to the
# training format, the same prompts answered before training, a few hundred steps with a live loss plot and a
# progress bar, the prompts answered again, and the adapter saved and exported as a PEFT adapter (for transformers
# + PEFT or vLLM on the unchanged HF base).
#
# **Test mode.** With `GLM41V_NOTEBOOK_TEST=1` the same cells run on the embedded tiny random checkpoint and a tiny
# dataset shipped in the repository (`notebooks/data/tiny_vqa`), on a CPU: this is how CI executes the notebook on
# every change. Only the install and the two Hub downloads are skipped there, and they say so.

# %% [markdown]
# ## 1. Mode
# One switch, read from the environment. Leave it unset on Colab.

# %%
import os

TEST = os.environ.get("GLM41V_NOTEBOOK_TEST", "").strip().lower() in ("1", "true", "yes", "on")

# %% [markdown]
# ## 2. Install (pinned)
# The repository is cloned (the training configs live in it) and installed with its TPU, Hub, training and
# notebook extras, with the jax / libtpu pair it is tested with. When the install changes Colab's jax, the runtime
# restarts: run the notebook again from the top, and this cell then finds jax unchanged and goes on.

# %%
import subprocess
import sys

JAX_PIN = "0.10.2"  # the jax (and its libtpu) that the package's tests run (pyproject.toml's test extra)
GITHUB = "<your-fork>"  # OWNER/REPO of this repository on GitHub
REF = "main"  # a commit or tag pins the package too
REPO_DIR = "/content/glm41v-jax"


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
        print("jax changed: restarting the runtime. Run the notebook again from the top.")
        os.kill(os.getpid(), 9)

# %% [markdown]
# ## 3. Device check
# The platform, the chip, its HBM and the versions. On another device it says what will and will not work.

# %%
from glm41v_jax import notebook as nb

TEST = nb.test_mode()
nb.banner(TEST, real="GLM-4.1V-9B-Thinking from the Hub, QLoRA (int8 base) on a TPU v5e-1")
report = nb.device_report(expect="tpu-v5e-1")
print(report)

# %% [markdown]
# ## 4. Folders and the persistent compilation cache
# Weights, data and the run go to `/content` (the runtime's large disk). Compiled programs go to Google Drive, so
# a restarted runtime loads them instead of compiling again; put `RUN_DIR` on Drive too if the adapters must survive
# the runtime. In test mode everything goes to a folder under the current directory.

# %%
WORK, CACHE = nb.colab_folders(TEST, "glm41v_nb_qlora")  # /content and a cache on Google Drive (mounted here)
HF_DIR = os.path.join(WORK, "hf", "GLM-4.1V-9B-Thinking")
INT8_DIR = os.path.join(WORK, "glm41v-9b-int8")  # the frozen QLoRA base
DATA_DIR = os.path.join(WORK, "data", "vqa")  # train.jsonl, val.jsonl, images/
RUN_DIR = os.path.join(WORK, "runs", "qlora")  # checkpoints/, metrics.jsonl, final/ (the adapter)
PEFT_DIR = os.path.join(WORK, "glm41v-9b-qlora-peft")  # the PEFT adapter (section 12)
os.makedirs(WORK, exist_ok=True)
print("compilation cache:", nb.enable_compilation_cache(CACHE))
print("work folder:", WORK)

# %% [markdown]
# ## 5. Hub token (optional)
# The model and the dataset are public: a token only raises the download rate limit. It comes from Colab's secrets
# (the key icon, a secret named `HF_TOKEN` with notebook access), else the `HF_TOKEN` environment variable.

# %%
token = None
try:
    from google.colab import userdata

    token = userdata.get("HF_TOKEN")
except Exception:  # not on Colab, no such secret, or no access granted to this notebook
    token = None
token = token or os.environ.get("HF_TOKEN") or None
print("Hub token:", "yes" if token else "none (anonymous download)")

# %% [markdown]
# ## 6. Download the model
# Only the files the model needs (about 20.6 GB). In test mode the embedded tiny checkpoint is written instead, in
# the same HF layout.

# %%
from glm41v_jax import tiny
from glm41v_jax.checkpoint_format import SIDE_FILES

REPO_ID = "zai-org/GLM-4.1V-9B-Thinking"
if os.path.exists(os.path.join(INT8_DIR, "CONVERSION_COMPLETE")):
    print("already converted:", INT8_DIR, "(no download needed)")
elif TEST:
    nb.skipped(f"snapshot_download({REPO_ID!r})", "the tiny checkpoint stands in for it")
    tiny.materialize_tiny_checkpoint(HF_DIR)
else:
    from huggingface_hub import snapshot_download

    snapshot_download(REPO_ID, local_dir=HF_DIR, token=token,
                      allow_patterns=[*SIDE_FILES, "*.safetensors", "model.safetensors.index.json"])
if os.path.isdir(HF_DIR):
    print(sorted(os.listdir(HF_DIR)))

# %% [markdown]
# ## 7. Convert to int8 (once): the QLoRA base
# The converter streams one tensor at a time and quantizes each kernel to int8 with an fp32 scale per output
# channel; the scheme is recorded, so training and loading need no flag. The vision tower is quantized too
# (`quant_skip=()`), as in the inference notebook: it is frozen here, and the chip keeps its HBM for the training
# step. The download is removed afterwards (the converted directory holds the config, tokenizer and processor files
# too). The test mode really quantizes the tiny checkpoint the same way.

# %%
import shutil
import time

from glm41v_convert.hf_to_orbax import convert

if os.path.exists(os.path.join(INT8_DIR, "CONVERSION_COMPLETE")):
    print("already converted:", INT8_DIR)
else:
    t0 = time.perf_counter()
    convert(HF_DIR, INT8_DIR, dtype="bfloat16", quantize="int8", quant_skip=(), progress=not TEST)
    print(f"converted to int8 in {time.perf_counter() - t0:.1f}s -> {INT8_DIR}")
    shutil.rmtree(HF_DIR)  # not needed any more: 20.6 GB of disk back
    print("removed the download", HF_DIR)

# %% [markdown]
# ## 8. The dataset: VQAv2 questions, in the training format
# **[merve/vqav2-small](https://huggingface.co/datasets/merve/vqav2-small)** on the Hub: 21.4k rows of the VQAv2
# validation split (columns `question`, `multiple_choice_answer`, `image`), in 7 parquet shards of ~480 MB; this
# notebook reads the first 2000 rows of the first shard. Licence: the VQAv2 questions and answers are CC BY 4.0
# (visualqa.org); the images are MS-COCO's, under the Flickr terms of use of each photo (cocodataset.org/#termsofuse).
#
# In test mode the rows come from `notebooks/data/tiny_vqa` (12 drawn shapes with the same three columns) and go
# through the same conversion.
#
# **Adapt this cell to your data**: `to_record(row)` turns one row into one training record, the HF messages format
# of `train/README.md` ("Training data"): a user turn with the image and the question, an assistant turn with the
# answer. GLM-4.1V-Thinking answers as `<think>...</think><answer>...</answer>`; the short VQA answers have no
# reasoning to learn, so the thinking is left empty. Images are written once each (VQAv2 asks several questions
# about one picture), named by their content.

# %%
import hashlib
import io
import json

from IPython.display import display
from PIL import Image

VQA_REPO = "merve/vqav2-small"
VQA_SHARD = "data/validation-00000-of-00007.parquet"
N_ROWS = 2000
HELD_OUT = 0.1  # the last 10% of the rows: held out (val.jsonl, the eval loss in the plot)


def hub_rows(n: int) -> list[dict]:
    """The first n rows of one parquet shard of the Hub dataset, the image decoded (PIL)."""
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(VQA_REPO, VQA_SHARD, repo_type="dataset", token=token)
    table = pq.read_table(path, columns=["question", "multiple_choice_answer", "image"]).slice(0, n)
    return [{**r, "image": Image.open(io.BytesIO(r["image"]["bytes"]))} for r in table.to_pylist()]


def tiny_rows(folder: str = "data/tiny_vqa") -> list[dict]:
    """The rows of the tiny dataset shipped in the repository: the same columns, images as files."""
    with open(os.path.join(folder, "rows.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{**r, "image": Image.open(os.path.join(folder, r["image"]))} for r in rows]


def to_record(row: dict) -> dict:
    """One dataset row -> one training record (train/README.md's JSONL format); its image is written under
    DATA_DIR/images, and the record names it relative to DATA_DIR (where the JSONL files are)."""
    buf = io.BytesIO()
    row["image"].convert("RGB").save(buf, format="JPEG", quality=95)
    name = f"images/{hashlib.sha1(buf.getvalue()).hexdigest()[:16]}.jpg"
    path = os.path.join(DATA_DIR, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": f"<think></think><answer>{row['multiple_choice_answer']}</answer>"},
    ]}


if TEST:
    nb.skipped(f"hf_hub_download({VQA_REPO!r}, {VQA_SHARD!r})", "the tiny VQA set in notebooks/data stands in")
    rows = tiny_rows()
else:
    rows = hub_rows(N_ROWS)
os.makedirs(os.path.join(DATA_DIR, "images"), exist_ok=True)
records = [to_record(r) for r in rows]
n_val = max(3, int(len(records) * HELD_OUT))
splits = {"train": records[:-n_val], "val": records[-n_val:]}
for split, recs in splits.items():
    with open(os.path.join(DATA_DIR, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
print({k: len(v) for k, v in splits.items()}, "records;", len(os.listdir(os.path.join(DATA_DIR, "images"))),
      "images in", DATA_DIR)
print(json.dumps(splits["train"][0]))
sample = rows[0]["image"]
display(sample)

# %% [markdown]
# ## 9. Before training: three held-out questions
# The int8 base answers three questions of the held-out split. The pipeline is released afterwards, so the chip's
# HBM is free for training.

# %%
import gc

from glm41v_jax import Pipeline, Request

PROMPTS = [Request(r["messages"][0]["content"][1]["text"],
                   images=[os.path.join(DATA_DIR, r["messages"][0]["content"][0]["image"])]) for r in splits["val"][:3]]
MAX_NEW = 32 if TEST else 256
MAX_CONTEXT = 512 if TEST else 4096


def answers(model_dir: str, **load_kw) -> list[str]:
    """The answers of the model in `model_dir` to PROMPTS (greedy); the pipeline is freed before returning."""
    pipe = Pipeline.load(model_dir, max_context=MAX_CONTEXT, **load_kw)
    out = [rec["answer"] or rec["text"] for rec in pipe.generate(PROMPTS, max_new_tokens=MAX_NEW)]
    del pipe
    gc.collect()
    return out


before = answers(INT8_DIR)
for req, ans in zip(PROMPTS, before, strict=True):
    print(f"Q: {req.prompt}\nA (base): {ans!r}\n")

# %% [markdown]
# ## 10. Train: QLoRA with a live loss plot
# The run is `train/configs/colab_v5e1_qlora.yaml` (rank 8, alpha 16 on the decoder's linear layers, 2048-token rows
# with one image, 8 micro-batches per step, full remat, bf16 compute), pointed at the int8 directory (already
# quantized: no `quantize` at load) and this dataset, for 300 steps. Test mode keeps the same run but with
# `train/configs/cpu_lora.yaml`'s sizes for the tiny model on a CPU (128-token rows, float32, 40 steps).
#
# The trainer runs in a background thread of this kernel (the chip stays with this kernel); this cell reads its
# `metrics.jsonl` every two seconds and redraws the plot (train loss, and the held-out loss at each eval) and the
# progress bar. Interrupting the cell (the stop button) asks the trainer to stop after the step in flight: it
# writes a checkpoint of that step, and running the cell again resumes from it (`resume: auto`).

# %%
import contextlib
import threading

from tqdm import tqdm

import glm41v_train
from glm41v_train.config import load_config
from glm41v_train.loop import absolute_paths
from glm41v_train.trainer import Preemption, Trainer

CONFIG_DIRS = [os.path.join(os.path.dirname(glm41v_train.__file__), "configs"),
               os.path.join(REPO_DIR, "train", "configs")]  # an editable install / the clone of section 2
CONFIG = next(os.path.join(d, "colab_v5e1_qlora.yaml") for d in CONFIG_DIRS
              if os.path.isfile(os.path.join(d, "colab_v5e1_qlora.yaml")))
OVERRIDES = [f"model={INT8_DIR}", "quantize=none", f"output_dir={RUN_DIR}", "progress=false",
             f"data.jsonl={os.path.join(DATA_DIR, 'train.jsonl')}",
             f"eval={{jsonl: {os.path.join(DATA_DIR, 'val.jsonl')}, every: 100, max_batches: 8}}",
             "steps=300", "save_every=100"]
if TEST:  # cpu_lora.yaml's sizes for the tiny model on a CPU
    OVERRIDES += ["steps=40", "save_every=20", "eval.every=20", "log_every=5", "tensorboard=false",
                  "data.seq_len=128", "data.batch_size=2", "data.max_patches=256", "data.worker_count=0",
                  "step.accum_steps=1", "step.compute_dtype=float32", "step.param_dtype=float32",
                  "step.loss_chunk=128", "optim.peak_lr=1e-2", "optim.end_lr=1e-3",
                  "optim.warmup_steps=4"]
cfg = load_config(CONFIG, OVERRIDES)
print(f"{CONFIG}: {cfg.steps} steps of {cfg.data.batch_size} x {cfg.data.seq_len} tokens x "
      f"{cfg.step.accum_steps} micro-batches; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}")


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
    recs = nb.read_metrics(metrics) if os.path.isfile(metrics) else []  # a resumed run's earlier steps
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


summary = run_training(cfg, "QLoRA (int8 base)")
print(summary)
losses = [r["loss"] for r in nb.read_metrics(RUN_DIR)]
print(json.dumps({"losses": losses}))

# %% [markdown]
# ## 11. After training: the same questions
# `final/` holds the adapter. On the int8 base the library runs it unmerged beside the codes
# (`Pipeline.load(..., adapter=DIR)`, `glm41v generate --adapter DIR`): exactly the model QLoRA trained, with two
# rank-8 matmuls more per adapted layer. (Folding it into the int8 codes would requantize them; on a float base the
# adapter is folded in at load instead.)

# %%
after = answers(INT8_DIR, adapter=summary["final"])
for req, b, a in zip(PROMPTS, before, after, strict=True):
    print(f"Q: {req.prompt}\nA (base):    {b!r}\nA (trained): {a!r}\n")

# %% [markdown]
# ## 12. The adapter, and its PEFT export
# `final/` is the adapter as training wrote it (`adapter.safetensors` + `adapter_config.json`, which names the base
# model's identity). `glm41v export --peft` writes it in PEFT's format (`adapter_model.safetensors` +
# `adapter_config.json`, `base_model_name_or_path` = the HF checkpoint the base was converted from), for
# `peft.PeftModel.from_pretrained(Glm4vForConditionalGeneration.from_pretrained(BASE), PEFT_DIR)` or
# `vllm serve zai-org/GLM-4.1V-9B-Thinking --enable-lora --max-lora-rank 8 --lora-modules tuned=PEFT_DIR`.

# %%
from glm41v_convert.export import export

shutil.rmtree(PEFT_DIR, ignore_errors=True)
export(INT8_DIR, PEFT_DIR, adapter=summary["final"], peft=True)
for folder in (summary["final"], PEFT_DIR):
    print(folder)
    for name in sorted(os.listdir(folder)):
        print(f"  {name:<28} {os.path.getsize(os.path.join(folder, name)):>12,} bytes")
with open(os.path.join(PEFT_DIR, "adapter_config.json"), encoding="utf-8") as f:
    peft_cfg = json.load(f)
print("PEFT adapter: r =", peft_cfg["r"], "lora_alpha =", peft_cfg["lora_alpha"], "modules:",
      len(peft_cfg["target_modules"]), "base:", peft_cfg["base_model_name_or_path"])
