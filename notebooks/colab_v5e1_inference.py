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
# # GLM-4.1V-9B-Thinking on one Colab TPU v5e-1, in int8
#
# This notebook runs the 9B vision-language model with [glm41v-jax](../README.md) on the single v5e chip of a Colab
# TPU runtime (16 GB of HBM). The 9B in bf16 is 20.6 GB, so the weights are converted to **weight-only int8** once
# (the vision tower too), which fits the chip with an 8k-token cache and a large image.
#
# Steps: device check, install, Hub token, download, int8 conversion, `glm41v plan`'s table for this chip, an image
# with streamed thinking and answer, grounding boxes drawn on the image, a short video with timestamps, a
# multi-turn chat, and the timings and compile counts. Compiled programs go to a persistent cache on Google Drive,
# so a restarted runtime does not compile again.
#
# **Test mode.** With `GLM41V_NOTEBOOK_TEST=1` in the environment the same cells run on the embedded tiny random
# checkpoint on a CPU: this is how CI executes the notebook on every change. Only the install and the Hub download
# are skipped there, and they say so. The tiny model's weights are random, so its text is gibberish by design.

# %% [markdown]
# ## 1. Mode
# One switch, read from the environment. Leave it unset on Colab.

# %%
import os

TEST = os.environ.get("GLM41V_NOTEBOOK_TEST", "").strip().lower() in ("1", "true", "yes", "on")

# %% [markdown]
# ## 2. Install (pinned)
# One pinned install: the package with its TPU, Hub and notebook extras, and the jax / libtpu pair it is tested
# with. Colab ships its own jax: when the install changes it, the runtime restarts (the cell kills the kernel, Colab
# starts a fresh one); run the notebook again from the top, and this cell then finds jax unchanged and goes on.

# %%
import subprocess
import sys

JAX_PIN = "0.10.2"  # the jax (and its libtpu) that the package's tests run (pyproject.toml's test extra)
GITHUB = "<your-fork>"  # OWNER/REPO of this repository on GitHub
REF = "main"  # a commit or tag pins the package too
PACKAGE = f"glm41v-jax[tpu,hub,notebooks] @ git+https://github.com/{GITHUB}@{REF}"


def installed_jax() -> str:
    """The jax version a fresh interpreter imports (this kernel's own import would not see the install)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "none"


if TEST:
    from glm41v_jax import notebook as nb

    nb.skipped("pip install of the package, jax and libtpu", "the test environment has them installed")
else:
    before = installed_jax()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PACKAGE, f"jax[tpu]=={JAX_PIN}"], check=True)
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
nb.banner(TEST, real="GLM-4.1V-9B-Thinking from the Hub, int8 on a TPU v5e-1")
report = nb.device_report(expect="tpu-v5e-1")
print(report)

# %% [markdown]
# ## 4. Folders and the persistent compilation cache
# The weights go to `/content` (the runtime's large disk, not the small home disk). Compiled programs go to Google
# Drive: after a restart the same programs load from there instead of compiling again. This cell runs before
# anything is compiled. In test mode everything goes to a folder under the current directory.

# %%
WORK, CACHE = nb.colab_folders(TEST, "glm41v_nb_work")  # /content and a cache on Google Drive (mounted here)
HF_DIR = os.path.join(WORK, "hf", "GLM-4.1V-9B-Thinking")
INT8_DIR = os.path.join(WORK, "glm41v-9b-int8")
os.makedirs(WORK, exist_ok=True)
print("compilation cache:", nb.enable_compilation_cache(CACHE))
print("weights:", WORK)

# %% [markdown]
# ## 5. Hub token (optional)
# GLM-4.1V-9B-Thinking is public: a token only raises the download rate limit. It comes from Colab's secrets
# (the key icon, a secret named `HF_TOKEN` with notebook access), else the `HF_TOKEN` environment variable, else none.

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
# ## 6. Download
# Only the files the model needs: the safetensors shards, their index, the config, tokenizer, chat template and
# processor configs (about 20.6 GB). In test mode the embedded tiny checkpoint is written instead, in the same
# HF layout.

# %%
from glm41v_jax import tiny
from glm41v_jax.checkpoint_format import SIDE_FILES

REPO_ID = "zai-org/GLM-4.1V-9B-Thinking"
ALLOW = [*SIDE_FILES, "*.safetensors", "model.safetensors.index.json"]
if TEST:
    nb.skipped(f"snapshot_download({REPO_ID!r})", "the tiny checkpoint stands in for it")
    tiny.materialize_tiny_checkpoint(HF_DIR)
else:
    from huggingface_hub import snapshot_download

    snapshot_download(REPO_ID, local_dir=HF_DIR, allow_patterns=ALLOW, token=token)
print(sorted(os.listdir(HF_DIR)))

# %% [markdown]
# ## 7. Convert to int8 (once)
# The converter streams one tensor at a time (bounded host memory), quantizes each kernel to int8 with an fp32
# scale per output channel, and writes an Orbax checkpoint; the scheme is recorded in it, so loading needs no flag.
# `quant_skip=()` quantizes the vision tower too: on a v5e-1 the 8k cache with a 1120x1120 image fits only then.
#
# **Convert once, or quantize at every load?** `Pipeline.load(HF_DIR, quantize="int8", quant_skip=())` gives the
# same weights without a conversion, but it reads and quantizes the 20.6 GB bf16 checkpoint in every session,
# where the converted directory is read as stored. Measured on a shared 2-core CPU, not on Colab (no Colab TPU was
# available to measure on), from a 0.8 GB bf16 checkpoint (`benchmarks/int8_paths.py`, BENCHMARKS.md "convert once
# or quantize at load"): loading the int8 directory took 4.5 s, quantizing at load 8.7 s (1.95x), and the
# conversion 9.5 s, so converting is ahead from the third session on. The 9B is 25x that size: this notebook
# converts once. Put `INT8_DIR` on Drive to skip the conversion in later sessions.

# %%
import time

from glm41v_convert.hf_to_orbax import convert

if os.path.exists(os.path.join(INT8_DIR, "CONVERSION_COMPLETE")):
    print("already converted:", INT8_DIR)
else:
    t0 = time.perf_counter()
    convert(HF_DIR, INT8_DIR, dtype="bfloat16", quantize="int8", quant_skip=(), progress=True)
    print(f"converted in {time.perf_counter() - t0:.1f}s -> {INT8_DIR}")

# %% [markdown]
# ## 8. Will it fit? `glm41v plan` for this chip
# `glm41v plan` compiles the prefill and decode programs with the real TPU compiler (libtpu runs on the host, no TPU
# needed) and prints the memory per chip and the decode speed bound, for the TPU found above (a v5e-1 when there is
# none). Real mode plans the 9B with an 8k cache and a 1120x1120 image; test mode plans the tiny model.

# %%
TPU_TYPE = report.tpu_type() or "v5e-1"
if TEST:
    plan_args = ["--model", INT8_DIR, "generate", "--max-context", "512", "--max-new-tokens", "64"]
else:
    plan_args = ["--model", INT8_DIR, "generate", "--max-context", "8192", "--image", "1120x1120"]
plan = subprocess.run([sys.executable, "-m", "glm41v_jax", "plan", "--tpu", TPU_TYPE, *plan_args],
                      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
print(plan.stdout or plan.stderr)

# %% [markdown]
# ## 9. Load
# The int8 checkpoint goes straight into the chip's memory. In test mode the tiny int8 model loads on the CPU.

# %%
from glm41v_jax import Pipeline, Request

t0 = time.perf_counter()
pipe = Pipeline.load(INT8_DIR, max_context=8192 if not TEST else 1024)
print(f"loaded in {time.perf_counter() - t0:.1f}s:", pipe.engine.cfg.runtime.quantize, "weights")

# %% [markdown]
# ## 10. An image, with the thinking and the answer streamed
# The answer streams chunk by chunk as the chip writes it ("thinking:" then "answer:").

# %%
import numpy as np
from IPython.display import display
from PIL import Image, ImageDraw

from glm41v_jax.cli.common import StreamPrinter
from glm41v_jax.thinking import history_text, parse_response

IMAGE = os.path.join(WORK, "shapes.png")
img = Image.new("RGB", (448, 336), (250, 250, 245))
d = ImageDraw.Draw(img)
d.rectangle((40, 60, 180, 200), fill=(220, 40, 40))  # a red square
d.ellipse((260, 120, 400, 260), fill=(40, 90, 220))  # a blue disc
img.save(IMAGE)
display(img)

MAX_NEW = 48 if TEST else 2048
timings = []


def ask(request: Request, max_new_tokens: int = MAX_NEW) -> str:
    """Generate for one request, printing the reply as it is written (chunk by chunk); returns the reply text.
    The timings of each call are kept in `timings` (shown at the end)."""
    printer = StreamPrinter(lambda ids: pipe.processor.decode(ids, skip_special_tokens=True), sys.stdout)
    result = pipe.engine.generate(pipe.encode(request), max_new_tokens=max_new_tokens, eos_ids=pipe.eos_ids,
                                  stream_callback=printer.feed)
    reply = printer.finish()
    t = result.timings
    timings.append({"prompt tokens": len(result.prompt_token_ids), "new tokens": len(result.token_ids),
                    "compile s": round(t.get("compile_s", 0.0), 2), "prefill s": round(t.get("prefill_s", 0.0), 3),
                    "decode tok/s": round(t.get("decode_tokens_per_s", 0.0), 1)})
    return reply


reply = ask(Request("Describe this picture.", images=[IMAGE]))

# %% [markdown]
# ## 11. Grounding: boxes on the image
# GLM-4.1V answers a grounding question with `<|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>`, coordinates
# normalised to 0-1000 of the image. `nb.draw_boxes` reads them from the reply and draws them. The tiny random model
# writes no box: in test mode the boxes come from a fixed example answer instead (the one the real model gives for
# this picture), and the cell says so.

# %%
reply = ask(Request("Where is the red square? Answer with its bounding box.", images=[IMAGE]))
parsed = parse_response(reply, img.size)
if TEST or not parsed["boxes"]:
    print("no box in this reply: drawing the boxes of a fixed example answer" + (" (test mode)" if TEST else ""))
    reply = ("<answer>The red square: <|begin_of_box|>[[89,179,402,595]]<|end_of_box|>, "
             "the blue disc: <|begin_of_box|>[[580,357,893,774]]<|end_of_box|></answer>")
    parsed = parse_response(reply, img.size)
print([(b["label"], b["box_px"]) for b in parsed["boxes"]])
display(nb.draw_boxes(img, reply))

# %% [markdown]
# ## 12. A short video, with timestamps
# A 4-second clip (a square moving right) written with PyAV. The processor samples 2 frames per second and puts
# each pair's time in seconds after it in the prompt, so the model can say *when* something happens.

# %%
import re

import av

VIDEO = os.path.join(WORK, "moving_square.mp4")
with av.open(VIDEO, "w") as c:
    s = c.add_stream("mpeg4", rate=4)
    s.width, s.height, s.pix_fmt = 224, 168, "yuv420p"
    for i in range(16):
        frame = np.full((168, 224, 3), 245, np.uint8)
        frame[60:110, 10 + 12 * i:60 + 12 * i] = (220, 40, 40)
        for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            c.mux(packet)
    for packet in s.encode():
        c.mux(packet)

video_request = Request("What happens in this video, and at which second?", videos=[VIDEO])
prompt = pipe.processor.decode(pipe.encode(video_request)["input_ids"][0].tolist(), skip_special_tokens=False)
stamps = re.findall(r"<\|end_of_image\|>(\d+)", prompt)  # each frame pair: its image tokens, then its second
print("timestamps in the prompt (s):", stamps)

# %% [markdown]
# The reply, streamed:

# %%
reply = ask(video_request)

# %% [markdown]
# ## 13. A multi-turn chat
# The history is a list of HF-style messages; each assistant turn goes back in without its thinking
# (`history_text`, as the model card asks). `Pipeline.generate` takes the whole conversation as one request.

# %%
history = []
for text in ["What colour is the square in this picture?", "And what is the other shape?"]:
    content = [{"type": "image", "image": IMAGE}] if not history else []
    history.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
    rec = pipe.generate([Request(messages=history)], max_new_tokens=MAX_NEW)[0]
    print(f"user: {text}\nassistant: {rec['answer']!r}\n")
    history.append({"role": "assistant", "content": history_text(rec["text"])})
print(len(history), "messages in the history")

# %% [markdown]
# ## 14. Timings and compiles
# Each prompt size (bucket) compiles its prefill and decode programs once; the table lists them. With the cache on
# Drive, a restarted runtime reads them from there instead: on a rerun the report's last line counts the compiles
# read from the cache, and the compile seconds drop to tracing plus the cache's read time.

# %%
for row in timings:
    print(row)
print(nb.compile_report(pipe))
