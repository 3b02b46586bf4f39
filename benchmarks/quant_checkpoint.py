"""Quantized checkpoints on the "small" config (issue 13): disk size of a conversion (fp32, bf16, int8, int4) and
the peak host memory of converting and of loading (float, quantized at conversion, quantized at load).

The source is an fp32 HF checkpoint of the small config with random weights (`tiny.random_hf_state_dict`). Each
step runs in its own subprocess (the source is written by one too); its peak RSS comes from os.wait4's rusage
(that child only). "device bytes" is the
sum of the bytes of the params' arrays on the device after `loading.load` (on this CPU host the device is host
memory, so the RSS includes them); int4 codes are counted as XLA:CPU holds them, one byte each. int4 uses groups of
64 (the small config's head dim is 64, so the o projection's input axis has no groups of 128).

    python benchmarks/quant_checkpoint.py --workdir /tmp/qbench

Measured here (2 cores; source 1608.6 MiB fp32; the small config's 151552 x 1024 embedding, 592 MiB in fp32, stays
float, so the ratios are far from the 9B's):

| conversion | params/ on disk | vs fp32 | convert peak RSS |
|---|---:|---:|---:|
| fp32 | 1608.7 MiB | 1.000 | 1.40 GiB |
| bf16 | 804.4 MiB | 0.500 | 1.68 GiB |
| int8 | 913.6 MiB | 0.568 | 1.40 GiB |
| int4 (groups of 64) | 927.3 MiB | 0.576 | 1.40 GiB |
| int8, float leaves bf16 | 573.3 MiB | 0.356 | 1.40 GiB |

| load | params on device | peak RSS |
|---|---:|---:|
| HF fp32 | 1608.6 MiB | 2.42 GiB |
| HF fp32, int8 at load | 913.5 MiB | 2.18 GiB |
| HF fp32, int4 at load | 927.1 MiB | 2.14 GiB |
| converted fp32, int8 at load | 913.5 MiB | 2.10 GiB |
| converted int8 | 913.5 MiB | 1.96 GiB |
| converted int4 | 927.1 MiB | 1.87 GiB |

int4 takes one byte per code on disk (Orbax/TensorStore's int4) and on XLA:CPU, plus more scales than int8: on the
host it is no smaller than int8; the TPU packs it two per byte in HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import print_table, small_config

WRITE = r"""
import json, os, sys
from safetensors.numpy import save_file
from glm41v_jax import tiny
cfg = json.load(open(os.path.join(sys.argv[1], "config.json")))
save_file(tiny.random_hf_state_dict(cfg, 0), os.path.join(sys.argv[1], "model.safetensors"), metadata={"format": "pt"})
"""
LOAD = r"""
import json, resource, sys, time
import jax
from glm41v_jax import loading
kw = json.loads(sys.argv[2])
t0 = time.perf_counter()
params, cfg = loading.load(sys.argv[1], **kw)
jax.block_until_ready(params)
dt = time.perf_counter() - t0
dev = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"device_bytes": dev, "seconds": dt, "quantize": cfg.runtime.quantize}))
"""


def _popen_rss(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall s, peak RSS GiB) of a subprocess."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out = p.stdout.read().decode()
    err = p.stderr.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return out, time.perf_counter() - t0, usage.ru_maxrss / 2**20


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/quant_checkpoint_bench")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = os.path.join(args.workdir, "hf")
    os.makedirs(src)
    cfg = small_config()
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    # written by a child: a child's peak RSS starts from its parent's at the fork, so this process stays small
    _popen_rss([sys.executable, "-c", WRITE, src])
    src_bytes = _du(src)

    conv = {"fp32": [], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"],
            "int4": ["--quantize", "int4", "--quant-group-size", "64"],
            "int8 bf16": ["--quantize", "int8", "--dtype", "bfloat16"]}
    rows = []
    for name, flags in conv.items():
        dst = os.path.join(args.workdir, name.replace(" ", "_"))
        _, wall, rss = _popen_rss([sys.executable, "-m", "glm41v_convert.main", src, dst, "--no-progress", *flags])
        size = _du(os.path.join(dst, "params"))
        rows.append({"conversion": name, "disk": f"{size / 2**20:.1f} MiB", "vs fp32": size,
                     "rss": f"{rss:.2f} GiB", "seconds": f"{wall:.1f}"})
    fp32 = rows[0]["vs fp32"]
    for r in rows:
        r["ratio"] = f"{r['vs fp32'] / fp32:.3f}"
    print(f"source: small config, fp32 safetensors {src_bytes / 2**20:.1f} MiB")
    print_table([("conversion", "{conversion}"), ("params/ on disk", "{disk}"), ("vs fp32", "{ratio}"),
                 ("convert peak RSS", "{rss}"), ("s", "{seconds}")], rows, left=1)

    loads = [("hf fp32", src, {}), ("hf fp32, int8 at load", src, {"quantize": "int8"}),
             ("hf fp32, int4 at load", src, {"quantize": "int4", "quant_group_size": 64}),
             ("converted fp32, int8 at load", os.path.join(args.workdir, "fp32"), {"quantize": "int8"}),
             ("converted int8", os.path.join(args.workdir, "int8"), {}),
             ("converted int4", os.path.join(args.workdir, "int4"), {})]
    rows = []
    for name, path, kw in loads:
        out, wall, rss = _popen_rss([sys.executable, "-c", LOAD, path, json.dumps(kw)])
        rec = json.loads(out.strip().splitlines()[-1])
        rows.append({"load": name, "device": f"{rec['device_bytes'] / 2**20:.1f} MiB",
                     "rss": f"{rss:.2f} GiB", "s": f"{rec['seconds']:.1f}"})
    print_table([("load", "{load}"), ("params on device", "{device}"), ("peak RSS", "{rss}"), ("load s", "{s}")],
                rows, left=1)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
