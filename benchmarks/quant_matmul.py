"""The weight-only quantized matmul forms, measured through `layers.Dense` (what `backend.QUANT_MATMUL` chooses):

  fp32          the float Dense (the reference of the ratios), "out_in" (the Engine's CPU decode layout)
  int8 dequant  dot(x, codes.astype(f32)) * scale (the TPU/GPU form)
  int8 int8_dot activation rows quantized to int8 per row, int8 x int8 -> int32 dot, both scales (the CPU form)
  int4 dequant  codes * group scales, then the float dot (the TPU/GPU form)
  int4 int8_dot activation rows quantized to int8 per row, an int8 x int8 -> int32 dot batched over the groups,
                the partial sums times the group scales, summed (the CPU form)
(int4 codes as the Engine holds them on XLA:CPU: int8 arrays of values in [-7, 7]; its jnp.int4 is a byte a code)

for the "small" config's decode weights (gate_up 1024 -> 2 x 2816, down 2816 -> 1024) and the 9B's (gate_up
4096 -> 2 x 13696, down 13696 -> 4096), at decode rows 1 and 4 (and prefill-like 320 rows for the small shapes),
both kernel layouts for the quantized forms.
Reported: ms per call (median of `--repeats`, variants interleaved), GB/s of weight bytes as stored (fp32 4 B, int8
1 B, int4 0.5 B per weight: what a packed device reads; XLA:CPU reads 1 B per int4 code), and the ratio of the fp32
time to each form's. Also the max relative error of each form against fp32 on the same weights.

    python benchmarks/quant_matmul.py [--repeats 9] [--no-9b]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from common import print_table, setup
from cpu_kernels import timed

SHAPES = {  # name -> (input width, features)
    "small gate_up": (1024, (2, 2816)),
    "small down": (2816, (1024,)),
    "9B gate_up": (4096, (2, 13696)),
    "9B down": (13696, (4096,)),
}
BYTES = {"fp32": 4.0, "int8": 1.0, "int4": 0.5}


def _apply(p, x, *, feats, axes, layout, quant, how):
    from glm41v_jax import backend
    from glm41v_jax.layers import Dense

    backend.BACKEND_TUNING["cpu"]["quant_matmul"] = how  # read at trace time: one compile per form
    backend.BACKEND_TUNING["cpu"]["quant_matmul_int4"] = how
    return Dense(feats, axes, kernel_layout=layout, quant=quant, quant_group_size=128).apply({"params": p}, x)


def measure(repeats: int, with_9b: bool) -> list[dict]:
    import functools

    import jax
    import jax.numpy as jnp

    from glm41v_jax import backend
    from glm41v_jax.quant import quantize_array

    default = {k: backend.BACKEND_TUNING["cpu"][k] for k in ("quant_matmul", "quant_matmul_int4")}
    out = []
    rng = np.random.default_rng(0)
    for name, (d_in, feats) in SHAPES.items():
        if name.startswith("9B") and not with_9b:
            continue
        axes = ("a", "b") if len(feats) == 1 else ("a", None, "b")
        w = rng.normal(0, 0.02, size=(d_in, *feats)).astype(np.float32)
        perm = (*range(1, w.ndim), 0)
        w_oi = np.ascontiguousarray(w.transpose(perm))
        variants = {"fp32": ("out_in", "none", "dequant", {"kernel": jnp.asarray(w_oi)})}
        for layout, kern in (("out_in", w_oi), ("in_out", w)):
            for scheme, how in (("int8", "dequant"), ("int8", "int8_dot"), ("int4", "dequant"), ("int4", "int8_dot")):
                c, s = quantize_array(kern, scheme, 1, layout, 128)
                c = c.astype(np.int8)  # int4 codes as the Engine holds them on XLA:CPU (same values, one byte)
                variants[f"{scheme} {how} {layout}"] = (layout, scheme, how,
                                                         {"kernel": jnp.asarray(c), "scale": jnp.asarray(s)})
        del w_oi
        for rows in (1, 4) if name.startswith("9B") else (1, 4, 320):
            x = jnp.asarray(rng.normal(size=(rows, d_in)).astype(np.float32))
            fns = {k: (jax.jit(functools.partial(_apply, feats=feats, axes=axes, layout=lay, quant=q, how=how)),
                       (p, x)) for k, (lay, q, how, p) in variants.items()}
            ys = {k: np.asarray(f(*a)) for k, (f, a) in fns.items()}
            t = timed(fns, repeats)
            n_w = d_in * int(np.prod(feats))
            for k, sec in t.items():
                scheme = k.split()[0]
                err = float(np.abs(ys[k] - ys["fp32"]).max() / np.abs(ys["fp32"]).max())
                row = {"weight": name, "rows": rows, "form": k, "ms": sec * 1e3,
                       "GBs": BYTES[scheme] * n_w / sec / 1e9, "vs_fp32": t["fp32"] / sec, "rel_err": err}
                out.append(row)
                print(json.dumps(row), flush=True)
    backend.BACKEND_TUNING["cpu"].update(default)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-9b", dest="with_9b", action="store_false", help="skip the 9B shapes (224 MB fp32 each)")
    args = ap.parse_args()
    setup(args.threads)
    import jax

    rows = measure(args.repeats, args.with_9b)
    print(f"\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), float32 "
          f"activations, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    print_table([("weight", "{weight}"), ("rows", "{rows}"), ("form", "{form}"), ("ms", "{ms:.3f}"),
                 ("GB/s of weights", "{GBs:.1f}"), ("vs fp32", "{vs_fp32:.2f}x"), ("max rel err", "{rel_err:.1e}")],
                rows, left=3)


if __name__ == "__main__":
    main()
