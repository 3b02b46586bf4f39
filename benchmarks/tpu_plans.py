"""The "TPU plans" tables of BENCHMARKS.md: `glm41v plan` for the published 9B config on several Cloud TPU slices.

Each plan compiles the real programs (the Engine's prefill and decode; the train step of a train/configs/ file) for
the slice's devices with the TPU compiler (libtpu), on this machine, with no TPU and no weights. Printed: one
Markdown table for generation (per-chip memory, the decode tokens/s bound at the HBM bandwidth, prefill FLOPs, the
compiled decode step's HBM bytes, `tpu_cost.calibrated_bytes`, against the minimum) and one for training (per-chip
memory, model FLOPs per step, step time at 50% MFU, the decoder-layer FLOPs ratio). `--json DIR` also writes each
plan's JSON object there.

    JAX_PLATFORMS=cpu python benchmarks/tpu_plans.py [--only generate|train] [--json /tmp/plans]

Takes a few minutes per plan on 2 cores (the compile times are in the JSON objects).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table  # noqa: E402

from glm41v_jax.plan import model_config, plan_generate, plan_train  # noqa: E402
from glm41v_jax.tpu_slices import parse_tpu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = [("v5e-1", 1, None), ("v5e-8", 1, None), ("v5e-8", 8, None), ("v5e-8", 32, None),
            ("v5e-8", 32, "fsdp=4,tensor=2"), ("v6e-1", 1, None), ("v6e-8", 8, None)]
TRAIN = [("v5e-8", "kaggle_v5e8.yaml"), ("v5p-64", "v5p_pod.yaml"), ("v5e-1", "colab_v5e1_qlora.yaml"),
         ("v5e-8", "kaggle_v5e8_lora.yaml")]
GiB = 2**30


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("generate", "train"), default=None)
    ap.add_argument("--json", default=None, metavar="DIR", help="write each plan's JSON object into DIR")
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--tpu", action="append", default=None, help="only the plans for these TPU types (repeatable)")
    args = ap.parse_args()
    cfg = model_config(None, "9b")
    if args.json:
        os.makedirs(args.json, exist_ok=True)

    def save(name, r):
        if args.json:
            with open(os.path.join(args.json, f"{name}.json"), "w") as f:
                json.dump(r, f, indent=1)

    if args.only in (None, "generate"):
        rows = []
        for tpu_name, batch, mesh in GENERATE:
            if args.tpu and tpu_name not in args.tpu:
                continue
            r = plan_generate(cfg, parse_tpu(tpu_name), batch=batch, max_context=args.max_context, mesh=mesh)
            save(f"generate_{tpu_name}_b{batch}{'' if mesh is None else '_' + mesh.replace(',', '_')}", r)
            pc, ro, ef = r["per_chip"], r["roofline"], r["efficiency"]
            dec = next((p for p in r["programs"] if p["name"] == "decode"), None)
            rows.append({
                "cmd": f"`glm41v plan --tpu {tpu_name} generate --batch {batch} --max-context {args.max_context}"
                       f"{'' if mesh is None else ' --mesh ' + mesh}`",
                "mesh": r["mesh"], "fits": "yes" if r["fits"] else "**no** (exit 1)",
                "params": _gib(pc["params_bytes"]), "kv": _gib(pc["kv_cache_bytes"]),
                "temp": _gib(pc["temp_bytes"]), "total": _gib(pc["total_bytes"]), "hbm": _gib(pc["hbm_bytes"]),
                "tok_s": f"{ro['decode_tokens_per_s_bound']:.0f}",
                "prefill": f"{r['analytic']['prefill_flops'] / 1e12:.0f}",
                "prefill_ms": f"{ro['prefill_s_at_peak'] * 1e3:.0f}",
                "dec_gib": "-" if dec is None or "hbm_bytes_per_step" not in dec else
                f"{dec['hbm_bytes_per_step'] / GiB:.2f}",
                "entry_gib": "-" if dec is None else f"{dec['hbm_bytes_split']['entry'] / GiB:.2f}",
                "min_gib": f"{r['analytic']['decode_min_bytes_per_chip'] / GiB:.2f}",
                "ratio": "-" if ef.get("decode_bytes_ratio") is None else f"{ef['decode_bytes_ratio']:.2f}",
                "compile": " + ".join(f"{p['compile_s']:.0f}" for p in r["programs"]) or "-",
            })
        print_table([("plan", "{cmd}"), ("mesh", "{mesh}"), ("fits", "{fits}"), ("params GiB", "{params}"),
                     ("KV GiB", "{kv}"), ("temp GiB", "{temp}"), ("total GiB", "{total}"), ("HBM GiB", "{hbm}"),
                     ("decode tok/s bound", "{tok_s}"), ("prefill TFLOP", "{prefill}"),
                     ("prefill ms at peak", "{prefill_ms}"), ("decode GiB/step compiled", "{dec_gib}"),
                     ("of which entry GiB/chunk", "{entry_gib}"),
                     ("minimum GiB", "{min_gib}"), ("bytes ratio", "{ratio}"), ("compile s", "{compile}")],
                    rows, left=3)
        print()
    if args.only in (None, "train"):
        rows = []
        for tpu_name, config in TRAIN:
            if args.tpu and tpu_name not in args.tpu:
                continue
            from glm41v_train.config import load_config  # the train extra (pyyaml)

            r = plan_train(load_config(os.path.join(ROOT, "train", "configs", config)), cfg, parse_tpu(tpu_name))
            save(f"train_{tpu_name}_{config.removesuffix('.yaml')}", r)
            pc, ro, ef, st = r["per_chip"], r["roofline"], r["efficiency"], r["step"]
            rows.append({
                "cmd": f"`glm41v plan --tpu {tpu_name} train --config train/configs/{config}`",
                "mesh": r["mesh"], "fits": "yes" if r["fits"] else "**no** (exit 1)",
                "tokens": f"{st['tokens_per_step']}", "params": _gib(pc["params_bytes"]),
                "opt": _gib(pc["opt_state_bytes"]), "temp": _gib(pc["temp_bytes"]), "total": _gib(pc["total_bytes"]),
                "hbm": _gib(pc["hbm_bytes"]), "pflop": f"{r['analytic']['model_flops_per_step'] / 1e15:.2f}",
                "s50": f"{ro['step_s_at_50pct_mfu']:.2f}", "tok_s": f"{ro['tokens_per_s_at_50pct_mfu']:.0f}",
                "ratio": "-" if ef.get("flops_ratio") is None else f"{ef['flops_ratio']:.2f}",
                "compile": " + ".join(f"{p['compile_s']:.0f}" for p in r["programs"]) or "-",
            })
        print_table([("plan", "{cmd}"), ("mesh", "{mesh}"), ("fits", "{fits}"), ("tokens/step", "{tokens}"),
                     ("params GiB", "{params}"), ("Adam GiB", "{opt}"), ("temp GiB", "{temp}"),
                     ("total GiB", "{total}"), ("HBM GiB", "{hbm}"), ("model PFLOP/step", "{pflop}"),
                     ("step s at 50% MFU", "{s50}"), ("tokens/s at 50% MFU", "{tok_s}"),
                     ("layer FLOPs ratio", "{ratio}"), ("compile s", "{compile}")], rows, left=3)


if __name__ == "__main__":
    main()
