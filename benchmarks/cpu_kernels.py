"""The two XLA:CPU choices behind the engine's speed, measured through the product's own code:

1. Kernel layout (`layers.Dense`): "in_out" (x . W) against "out_in" (W . x^T, the Engine's layout) for the "small"
   config's lm_head (1024 -> 151552) and MLP (1024 -> 2 x 2816, 2816 -> 1024) at decode rows (1, 4, 8) and prefill
   rows (320, 1280). Reported: ms per call and GB/s of weights streamed (the decode roofline) or GFLOP/s.
2. Attention (`attention.dense_attention` = one masked block, against `attention.blocked_attention`, what
   `xla_attention` runs on CPU for 32+ queries), with torch's `scaled_dot_product_attention` as the yardstick, for
   the vision tower (1 or 4 images of 1024 patches, 4 heads x 128) and the text prefill (1 or 4 rows of 320 tokens,
   16 q / 2 kv heads x 64, causal).

Each variant runs `--repeats` times, interleaved with the others; medians. Float32.

    python benchmarks/cpu_kernels.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np
from common import print_table, setup


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each (function, args) pair, the variants interleaved; JAX results are waited on."""
    import jax

    def run(f, args):
        jax.block_until_ready(f(*args))

    for f, args in fns.values():
        run(f, args)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (f, args) in fns.items():
            t0 = time.perf_counter()
            run(f, args)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _dense(p, x, *, feats, axes, layout):
    from glm41v_jax.layers import Dense

    return Dense(feats, axes, kernel_layout=layout).apply({"params": p}, x)


def layouts(repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    rows_out = []
    rng = np.random.default_rng(0)
    for name, d_in, feats in (("lm_head", 1024, (151552,)), ("mlp gate_up", 1024, (2, 2816)),
                              ("mlp down", 2816, (1024,))):
        axes = ("a", "b") if len(feats) == 1 else ("a", None, "b")
        k_io = rng.standard_normal((d_in, *feats), dtype=np.float32)
        perm = (*range(1, k_io.ndim), 0)
        params = {"in_out": {"kernel": jnp.asarray(k_io)}, "out_in": {"kernel": jnp.asarray(k_io.transpose(perm))}}
        del k_io
        for rows in (1, 4, 8, 320, 1280):
            if name == "lm_head" and rows > 8:
                continue  # the engine computes logits for the last position only
            x = jnp.asarray(rng.standard_normal((rows, d_in), dtype=np.float32))
            fns = {lay: (jax.jit(functools.partial(_dense, feats=feats, axes=axes, layout=lay)), (params[lay], x))
                   for lay in ("in_out", "out_in")}
            t = timed(fns, repeats)
            nbytes = 4 * d_in * int(np.prod(feats))
            flops = 2 * rows * d_in * int(np.prod(feats))
            row = {"weight": name, "rows": rows, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                   **{f"{k}_GBs": nbytes / v / 1e9 for k, v in t.items()},
                   **{f"{k}_GFLOPs": flops / v / 1e9 for k, v in t.items()},
                   "speedup": t["in_out"] / t["out_in"]}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def attention(repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from glm41v_jax import attention as A

    out = []
    for name, b, t, n, kh, h, causal in (("vision 1 image", 1, 1024, 4, 4, 128, False),
                                         ("vision 4 images", 4, 1024, 4, 4, 128, False),
                                         ("text prefill 1 row", 1, 320, 16, 2, 64, True),
                                         ("text prefill 4 rows", 4, 320, 16, 2, 64, True)):
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, t, n, h), dtype=np.float32)
        k = rng.standard_normal((b, t, kh, h), dtype=np.float32)
        v = rng.standard_normal((b, t, kh, h), dtype=np.float32)
        seg = jnp.ones((b, t), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal, q_positions=pos, kv_positions=pos)
        jq, jk, jv = map(jnp.asarray, (q, k, v))
        dense = jax.jit(functools.partial(A.dense_attention, **kw))
        blocked = jax.jit(functools.partial(A.blocked_attention, **kw))
        err = float(jnp.max(jnp.abs(dense(jq, jk, jv) - blocked(jq, jk, jv))))
        tq = torch.from_numpy(q).transpose(1, 2)
        tk = torch.from_numpy(k).transpose(1, 2).repeat_interleave(n // kh, 1)
        tv = torch.from_numpy(v).transpose(1, 2).repeat_interleave(n // kh, 1)
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=causal)
        t_ = timed({"dense": (dense, (jq, jk, jv)), "blocked": (blocked, (jq, jk, jv)),
                    "torch_sdpa": (sdpa, (tq, tk, tv))}, repeats)
        row = {"case": name, **{f"{k}_ms": v * 1e3 for k, v in t_.items()},
               "blocked_speedup": t_["dense"] / t_["blocked"], "max_abs_diff": err}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup(args.threads)
    import jax
    import torch

    lay = layouts(args.repeats)
    att = attention(args.repeats)
    print(f"\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({args.threads} threads), float32, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    print_table([("weight", "{weight}"), ("rows", "{rows}"), ("in_out ms", "{in_out_ms:.2f}"),
                 ("out_in ms", "{out_in_ms:.2f}"), ("in_out GB/s", "{in_out_GBs:.1f}"),
                 ("out_in GB/s", "{out_in_GBs:.1f}"), ("out_in GFLOP/s", "{out_in_GFLOPs:.0f}"),
                 ("speedup", "{speedup:.2f}x")], lay, left=1)
    print()
    print_table([("attention", "{case}"), ("dense ms", "{dense_ms:.1f}"), ("blocked ms", "{blocked_ms:.1f}"),
                 ("torch SDPA ms", "{torch_sdpa_ms:.1f}"), ("blocked speedup", "{blocked_speedup:.2f}x"),
                 ("max abs diff", "{max_abs_diff:.1e}")], att, left=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layouts": lay, "attention": att}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
