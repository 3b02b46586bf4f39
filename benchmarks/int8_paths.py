"""Convert once to int8, or quantize at every load? The two ways notebooks/colab_v5e1_inference.py can get int8
weights, timed on this machine from a bf16 HF checkpoint (the Hub's dtype) with random weights:

  A  `convert(src, dst, dtype="bfloat16", quantize="int8", quant_skip=())` once, then `loading.load(dst)` in every
     session (the codes are read as stored);
  B  `loading.load(src, quantize="int8", quant_skip=())` in every session (reads the bf16 tensors and quantizes
     them as they load).

Each step runs in its own subprocess and times itself (imports excluded); `jax.block_until_ready` ends a load. The
table gives the seconds of each, B's load over A's, and after how many sessions A (conversion included) is ahead.
Configs: the embedded tiny one and the "small" config of issue 3 (benchmarks/common.py).

    python benchmarks/int8_paths.py [--configs tiny,small] [--workdir /tmp/int8_paths]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from common import print_table, small_config

from glm41v_jax import tiny

WRITE = r"""
import json, os, sys
import ml_dtypes
from safetensors.numpy import save_file
from glm41v_jax import tiny
cfg = json.load(open(os.path.join(sys.argv[1], "config.json")))
state = tiny.random_hf_state_dict(cfg, 0, dtype=ml_dtypes.bfloat16)
save_file(state, os.path.join(sys.argv[1], "model.safetensors"), metadata={"format": "pt"})
"""
CONVERT = r"""
import json, sys, time
from glm41v_convert.hf_to_orbax import convert
t0 = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype="bfloat16", quantize="int8", quant_skip=(), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
LOAD = r"""
import json, sys, time
import jax
from glm41v_jax import loading
kw = json.loads(sys.argv[2])
t0 = time.perf_counter()
params, cfg = loading.load(sys.argv[1], param_dtype="bfloat16", compute_dtype="bfloat16", **kw)
jax.block_until_ready(params)
print(json.dumps({"seconds": time.perf_counter() - t0, "quantize": cfg.runtime.quantize}))
"""


def _run(code: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if p.returncode:
        raise SystemExit(f"step failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--workdir", default="/tmp/int8_paths")
    ap.add_argument("--repeats", type=int, default=2, help="loads of each kind (the median is shown)")
    args = ap.parse_args()
    rows = []
    for which in args.configs.split(","):
        shutil.rmtree(args.workdir, ignore_errors=True)
        src, dst = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "int8")
        os.makedirs(src)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(tiny.tiny_hf_config() if which == "tiny" else small_config(), f)
        _run(WRITE, src)
        src_mib = os.path.getsize(os.path.join(src, "model.safetensors")) / 2**20
        conv = _run(CONVERT, src, dst)["seconds"]
        a = sorted(_run(LOAD, dst, "{}")["seconds"] for _ in range(args.repeats))[(args.repeats - 1) // 2]
        b_runs = [_run(LOAD, src, json.dumps({"quantize": "int8", "quant_skip": []})) for _ in range(args.repeats)]
        assert all(r["quantize"] == "int8" for r in b_runs)
        b = sorted(r["seconds"] for r in b_runs)[(args.repeats - 1) // 2]
        gain = b - a
        rows.append({"config": which, "src": f"{src_mib:.1f} MiB", "conv": conv, "a": a, "b": b, "ratio": b / a,
                     "even": (f"{conv / gain:.1f}" if gain > 0 else "never")})
    shutil.rmtree(args.workdir, ignore_errors=True)
    print_table([("config", "{config}"), ("bf16 source", "{src}"), ("A: convert int8 s", "{conv:.2f}"),
                 ("A: load converted s", "{a:.2f}"), ("B: load + int8 at load s", "{b:.2f}"),
                 ("B / A load", "{ratio:.2f}x"), ("sessions until A is ahead", "{even}")], rows, left=1)


if __name__ == "__main__":
    main()
