"""Vision tower time with the dense (P x P) attention vs the host-chosen grouped plan (glm41v_jax/vision_plan.py).

A "small" vision tower (width 512, depth 4, 4 heads of 128, 14-px patches, 2x2 merge, MLP / output width 1024,
merger 1024; random weights), jitted, float32. Patches are padded to the generation engine's bucket
(`buckets.vision_bucket`), as in serving. For each case: compile excluded (AOT `lower().compile()`), one warm-up
run, then --runs rounds that run the dense and the grouped program in turn (`block_until_ready`; interleaved so
that load from other processes on the machine hits both alike): median and minimum. The two layouts' outputs are
compared too (max |diff| over the real tokens).

    python benchmarks/vision_attention.py [--runs 5] [--cases one four video mixed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from glm41v_jax import inputs, vision, vision_plan
from glm41v_jax.attention import attention
from glm41v_jax.buckets import vision_bucket
from glm41v_jax.config import Glm4vConfig, VisionConfig

SMALL = Glm4vConfig(vision=VisionConfig(depth=4, hidden_size=512, num_heads=4, patch_size=14, spatial_merge_size=2,
                                        out_hidden_size=1024, intermediate_size=1024, image_size=336))

# name -> (description, image grids, video grids); grids in 14-px patches, video t = temporal groups of 2 frames
CASES = {
    "one": ("1 image 448x448", [(1, 32, 32)], None),
    "four": ("4 images 448x448", [(1, 32, 32)] * 4, None),
    "video": ("16-frame video 448x448", None, [(8, 32, 32)]),
    "mixed": ("896x896 + 6 x 224x224", [(1, 64, 64)] + [(1, 16, 16)] * 6, None),
}


def _compile(fn, args) -> tuple[object, float]:
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0


def _interleaved(exes: dict, args: dict, runs: int) -> dict[str, tuple[float, float, np.ndarray]]:
    """Warm-up, then `runs` rounds of one run of each program in turn (so that load from other processes hits
    both alike). Returns name -> (median s, min s, output)."""
    outs = {k: np.asarray(jax.block_until_ready(exes[k](*args[k]))) for k in exes}
    times: dict[str, list[float]] = {k: [] for k in exes}
    for _ in range(runs):
        for k in exes:
            t0 = time.perf_counter()
            jax.block_until_ready(exes[k](*args[k]))
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(t), min(t), outs[k]) for k, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    cfg = SMALL
    v = cfg.vision
    model = vision.VisionModel(cfg)
    rng = np.random.default_rng(0)
    params = None
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, float32; "
          f"vision width {v.hidden_size}, depth {v.depth}, {v.num_heads} heads x {v.head_dim}")
    print("ms; median / minimum of interleaved runs; speedup = dense / grouped of the minima (of the medians);")
    print("attn = one block's attention alone (gathers included); cost = modelled attention cost, grouped / dense")
    print(f"{'case':<24} {'P':>5} {'bucket':>6} {'layout':<22} {'tower dense':>12} {'tower grouped':>13} "
          f"{'speedup':>13} {'attn dense':>11} {'attn grouped':>12} {'speedup':>7} {'cost':>5} {'max|diff|':>9}")
    for name in args.cases:
        desc, img, vid = CASES[name]
        img_g = None if img is None else np.array(img)
        vid_g = None if vid is None else np.array(vid)
        n = sum(int(np.prod(g, -1).sum()) for g in (img_g, vid_g) if g is not None)
        pix = rng.standard_normal((n, v.patch_dim)).astype(np.float32)
        ni = 0 if img_g is None else int(np.prod(img_g, -1).sum())
        pi, pv = (pix[:ni] if ni else None), (pix[ni:] if ni < n else None)
        total = vision_bucket(n)
        exes, call_args, compile_s, packs = {}, {}, {}, {}
        for layout in ("dense", "auto"):
            packed = inputs.pack_vision(cfg, pi, img_g, pv, vid_g, pad_to=total, vision_attention=layout)
            packs[layout] = packed = jax.tree.map(jnp.asarray, packed)
            if params is None:
                params = model.init(jax.random.PRNGKey(0), packed)["params"]
            fn = lambda p, kw: model.apply({"params": p}, kw)  # noqa: E731
            call_args[layout] = (params, packed)
            exes[layout], compile_s[layout] = _compile(fn, call_args[layout])
        res = _interleaved(exes, call_args, args.runs)
        # one attention layer alone
        q, k, vv = (jnp.asarray(rng.standard_normal((total, v.num_heads, v.head_dim)), jnp.float32) for _ in range(3))
        seg = packs["dense"].segment_ids
        att_exes, att_args = {}, {}
        att_args["dense"] = (q, k, vv, seg)
        att_exes["dense"] = _compile(lambda q, k, v, s: attention(q[None], k[None], v[None], q_segment_ids=s[None],
                                                                  kv_segment_ids=s[None], causal=False),
                                     att_args["dense"])[0]
        if packs["auto"].grouped:
            att_args["auto"] = (q, k, vv, seg, packs["auto"].attn_groups, packs["auto"].attn_inverse)
            att_exes["auto"] = _compile(vision.grouped_attention, att_args["auto"])[0]
        att = _interleaved(att_exes, att_args, args.runs)
        att.setdefault("auto", att["dense"])
        grids = [(1, h, w) for g in (img_g, vid_g) if g is not None for t, h, w in g for _ in range(t)]
        plan = vision_plan.plan_attention([h * w for _, h, w in grids], total)
        layout_s = "dense" if plan.mode == "dense" else "grouped " + " + ".join(f"{a}x{b}" for a, b in
                                                                                plan.shape_key[1])
        cost = (plan.grouped_cost if plan.mode == "grouped" else plan.dense_cost) / plan.dense_cost
        diff = float(np.abs(res["dense"][2][: n // 4] - res["auto"][2][: n // 4]).max())

        def ms(r):
            return f"{1e3 * r[0]:.0f}/{1e3 * r[1]:.0f}"

        sp = f"{res['dense'][1] / res['auto'][1]:.2f}x ({res['dense'][0] / res['auto'][0]:.2f}x)"
        print(f"{desc:<24} {n:>5} {total:>6} {layout_s:<22} {ms(res['dense']):>12} {ms(res['auto']):>13} {sp:>13} "
              f"{ms(att['dense']):>11} {ms(att['auto']):>12} {att['dense'][1] / att['auto'][1]:>6.2f}x "
              f"{cost:>5.3f} {diff:>9.1e}", flush=True)
        print(f"{'':<24} compile s: tower dense {compile_s['dense']:.1f}, grouped {compile_s['auto']:.1f}")


if __name__ == "__main__":
    main()
