"""LoRA step cost: our LoRA step against our full SFT step, and against transformers + peft's LoRA step, same run.

The "small" config of benchmarks/common.py (text hidden 1024, 8 layers, 16 q / 2 kv heads, MLP 2816, vocab 151552;
vision hidden 512, depth 4), float32, the same random weights everywhere (`tiny.random_hf_state_dict`), the batches
of benchmarks/train.py (rows of `--seq` tokens with one 448x448 image each, labels on the answer). Three modes:

  full   glm41v_train.step.TrainStep: every weight trained, AdamW moments for all of them
  lora   glm41v_train.lora_step.LoraTrainStep: rank 8, alpha 16 adapters on every linear layer of the text decoder
         (q/k/v/o_proj, gate_up_proj, down_proj: LLaMA-Factory's recipe), the base frozen, AdamW over the adapters
  peft   transformers' Glm4vForConditionalGeneration under peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, the
         same modules)): forward + backward + clip_grad_norm_ + torch AdamW over the adapters

AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, wd 0.1) with global-norm clipping at 1.0 on every side; no dropout; no
remat (transformers runs without gradient checkpointing). The adapters start with B = 0 on both LoRA sides, so the
first loss of every mode is the base model's (printed: they must agree).

Each mode runs in its own subprocess (`--worker MODE`), so its peak RSS (`os.wait4`'s ru_maxrss) is its own: the
weights, the optimizer state, the compiled program or autograd's buffers and the activations. The modes run one after
another, `--rounds` times in alternating order; a step time is the median of `--steps` timed steps after a warm-up
(compile) step, and the figures are the medians over the rounds. Ratios: full / lora (what LoRA saves in our step)
and peft / lora (ours against the reference). Our workers never import torch.

    python benchmarks/lora_step.py [--batch 1] [--seq 320] [--steps 3] [--rounds 1] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from common import print_table, small_config

from train import make_batch

RANK, ALPHA = 8, 16.0
OUR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "language_model.*.down_proj")
PEFT_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate_up|down)_proj)"
MODES = ("full", "lora", "peft")
ADAMW = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0)
PATCH_DIM = 3 * 2 * 14 * 14


# ---------------------------------------------------------------------------------------------------------------
# Workers (one mode per process).


def _batches(batch: int, seq: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [make_batch(rng, batch, seq, PATCH_DIM) for _ in range(2)]


def _ours(mode: str, args: argparse.Namespace) -> tuple:
    """(step closure, trained parameter count) of our full or LoRA step."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from glm41v_jax import tiny, weights
    from glm41v_jax.config import Glm4vConfig, LoraConfig
    from glm41v_jax.inputs import prepare_inputs
    from glm41v_train.lora_step import LoraTrainStep
    from glm41v_train.optim import OptimConfig
    from glm41v_train.step import StepConfig, TrainStep

    hf_cfg = small_config()
    cfg = Glm4vConfig.from_hf(hf_cfg)
    oc = OptimConfig(peak_lr=ADAMW["lr"], warmup_steps=0, total_steps=10**6, end_lr=ADAMW["lr"], b1=ADAMW["b1"],
                     b2=ADAMW["b2"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"], clip_norm=ADAMW["clip"])
    sc = StepConfig(compute_dtype="float32", remat_policy="none", scan_layers=not args.scanned_off)
    base = weights.hf_to_flax(tiny.random_hf_state_dict(hf_cfg, seed=0), cfg)
    if mode == "full":
        ts = TrainStep(cfg, oc, sc=sc)
        params = ts.place_params(base)
    else:
        ts = LoraTrainStep(cfg, oc, sc=sc, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=OUR_TARGETS))
        ts.set_base(base)
        params = ts.init_adapters(0)
    del base
    gc.collect()
    box = {"params": params, "opt": ts.init_opt_state(params)}
    batches = []
    for b in _batches(args.batch, args.seq):
        kw = {k: v for k, v in b.items() if k != "labels"}
        inputs = prepare_inputs(cfg, **kw, vision_attention="dense")
        batches.append(ts.shard_batch({**inputs.as_kwargs(), "labels": b["labels"].astype(np.int32)}))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.abstract_params))

    def step(i):
        t0 = time.perf_counter()
        box["params"], box["opt"], m = ts(box["params"], box["opt"], batches[i % len(batches)])
        loss = float(jax.block_until_ready(m["loss"]))
        return time.perf_counter() - t0, loss

    return step, n_trained


def _peft(args: argparse.Namespace) -> tuple:
    """(step closure, trained parameter count) of transformers + peft's LoRA step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from glm41v_jax import tiny

    torch.set_num_threads(args.threads)
    hf_cfg = small_config()
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(Glm4vConfig(**hf_cfg))
    state = tiny.random_hf_state_dict(hf_cfg, seed=0)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise SystemExit(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del state
    gc.collect()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                             target_modules=PEFT_TARGETS))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    kws = []
    for b in _batches(args.batch, args.seq):
        kw = {k: torch.from_numpy(v) for k, v in b.items()}
        kw["mm_token_type_ids"] = torch.from_numpy((b["input_ids"] == 151343).astype(np.int64))
        kws.append(kw)

    def step(i):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**kws[i % len(kws)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, ADAMW["clip"])
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    return step, sum(p.numel() for p in trained)


def worker(mode: str, args: argparse.Namespace) -> None:
    if mode != "peft":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    step, n_trained = _peft(args) if mode == "peft" else _ours(mode, args)
    setup_s = time.perf_counter() - t0
    first_s, first_loss = step(0)
    times, losses = [], [first_loss]
    for i in range(1, args.steps + 1):
        dt, loss = step(i)
        times.append(dt)
        losses.append(loss)
    print("RESULT " + json.dumps({"mode": mode, "setup_s": setup_s, "first_step_s": first_s, "times": times,
                                  "step_s": statistics.median(times), "losses": losses, "trained_params": n_trained,
                                  "torch_imported": "torch" in sys.modules}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver.


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """One worker subprocess, reaped by os.wait4 (its own rusage): its RESULT line, peak RSS and wall time."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if mode != "peft":
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.scanned_off:
        cmd.append("--unrolled")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{mode} worker failed ({proc.returncode}):\n{err[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = wall
    res["rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=320)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step, per mode and round")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every mode, in alternating order")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--unrolled", dest="scanned_off", action="store_true",
                    help="our steps with StepConfig(scan_layers=False): per-layer weights")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora,peft")
    ap.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: expected a subset of {','.join(MODES)}, got {args.modes!r}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            res = run_mode(mode, args)
            runs[mode].append(res)
            print(json.dumps({k: v for k, v in res.items() if k not in ("losses",)}), flush=True)
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {"step_s": statistics.median(r["step_s"] for r in rs),
                         "rss_gib": statistics.median(r["rss_gib"] for r in rs),
                         "first_step_s": statistics.median(r["first_step_s"] for r in rs),
                         "first_loss": rs[0]["losses"][0], "trained_params": rs[0]["trained_params"],
                         "tokens_per_s": args.batch * args.seq / statistics.median(r["step_s"] for r in rs)}
    rows = [{"mode": m, **s} for m, s in summary.items()]
    import platform

    print()
    print(f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), load average "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end, threads {args.threads}; small config, "
          f"{args.batch} x {args.seq} tokens per step (one 448x448 image per row), fp32, AdamW + clipping, "
          f"{args.steps} timed steps x {args.rounds} round(s)")
    print_table([("mode", "{mode}"), ("trained params", "{trained_params:,}"), ("s/step", "{step_s:.2f}"),
                 ("tokens/s", "{tokens_per_s:.0f}"), ("peak RSS GiB", "{rss_gib:.2f}"),
                 ("first step s (compile)", "{first_step_s:.1f}"), ("first loss", "{first_loss:.5f}")], rows, left=1)
    ratios = {}
    if "full" in summary and "lora" in summary:
        ratios["full_over_lora_step"] = summary["full"]["step_s"] / summary["lora"]["step_s"]
        ratios["full_over_lora_rss"] = summary["full"]["rss_gib"] / summary["lora"]["rss_gib"]
    if "peft" in summary and "lora" in summary:
        ratios["peft_over_lora_step"] = summary["peft"]["step_s"] / summary["lora"]["step_s"]
        ratios["peft_over_lora_rss"] = summary["peft"]["rss_gib"] / summary["lora"]["rss_gib"]
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
