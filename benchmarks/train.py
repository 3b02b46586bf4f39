"""Training throughput: our jitted SFT step against transformers forward + backward + torch AdamW, same run.

The "small" config of benchmarks/generate.py (text hidden 1024, 8 layers, 16 q / 2 kv heads, MLP 2816, mrope
[4, 6, 6], vocab 151552; vision hidden 512, depth 4, 4 heads, out 1024), float32, the same random weights on both
sides. Each row is one SFT sample of `--seq` tokens: a 448x448 image (1024 patches -> 256 image tokens), a ~30-token
question and an answer filling the rest (labels on the answer and the final <|endoftext|>). Both sides run the same
batches, AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, wd 0.1) with global-norm clipping at 1.0:

  ours          glm41v_train.step.TrainStep: scanned layers (--unrolled: per-layer), the fused head over label
                rows, one device
  transformers  Glm4vForConditionalGeneration(..., labels=labels).loss.backward(), clip_grad_norm_, AdamW.step()

The timed steps alternate between the two sides (one warm-up step each first), so a change in machine load hits
both alike. Reported: median seconds per step, training tokens/s (all B x T tokens, image tokens included) and the
ratio. `--loss-memory` also compiles value_and_grad of the loss alone for several head chunk sizes and for a plain
(B, T, V)-logits loss, and prints XLA's temp-buffer size and time per call for each. Run on a quiet machine:

    python benchmarks/train.py [--batch 2] [--seq 512] [--steps 5] [--threads 2] [--remat none] [--loss-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from common import hf_small_model, print_table, setup

GMASK, SOP, USER, ASSISTANT, NL, EOS = 151331, 151333, 151336, 151337, 198, 151329
BOI, EOI, IMG = 151339, 151340, 151343
GRID = (1, 32, 32)  # a 448x448 image in 14-px patches


def make_batch(rng: np.random.Generator, batch: int, seq: int, patch_dim: int) -> dict[str, np.ndarray]:
    """HF-style arrays (+ labels) for `batch` rows of exactly `seq` tokens, one image each."""
    n_img = GRID[0] * GRID[1] * GRID[2] // 4
    ids, labels = [], []
    for _ in range(batch):
        prompt = [GMASK, SOP, USER, NL, BOI] + [IMG] * n_img + [EOI]
        prompt += rng.integers(100, 195, 30).tolist() + [ASSISTANT, NL]
        n_answer = seq - len(prompt) - 1
        if n_answer < 1:
            raise SystemExit(f"--seq {seq} is too short for one image ({len(prompt) + 2} tokens at least)")
        answer = rng.integers(100, 195, n_answer).tolist() + [EOS]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    ids = np.asarray(ids, np.int64)
    pixels = rng.standard_normal((batch * int(np.prod(GRID)), patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.asarray(labels, np.int64),
            "pixel_values": pixels, "image_grid_thw": np.asarray([GRID] * batch, np.int64)}


def mm_types(ids: np.ndarray) -> np.ndarray:
    return (ids == IMG).astype(np.int64)  # images only: type 1


def hf_stepper(model, batches: list[dict]):
    """A closure running one transformers step on batch i; returns (seconds, loss)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    kws = []
    for b in batches:
        kw = {k: torch.from_numpy(v) for k, v in b.items()}
        kw["mm_token_type_ids"] = torch.from_numpy(mm_types(b["input_ids"]))
        kws.append(kw)

    def step(i):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**kws[i % len(kws)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    return step


def jax_stepper(hf_cfg: dict, state: dict, batches: list[dict], remat: str, chunk: int, scan: bool = True):
    """A closure running one step of ours on batch i; returns (seconds, loss)."""
    import jax

    from glm41v_jax import weights
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.inputs import prepare_inputs
    from glm41v_train.optim import OptimConfig
    from glm41v_train.step import StepConfig, TrainStep

    cfg = Glm4vConfig.from_hf(hf_cfg)
    oc = OptimConfig(peak_lr=1e-5, warmup_steps=0, total_steps=10**6, end_lr=1e-5, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.1, clip_norm=1.0)
    ts = TrainStep(cfg, oc, sc=StepConfig(compute_dtype="float32", remat_policy=remat, loss_chunk=chunk,
                                          scan_layers=scan))
    ours = []
    for b in batches:
        kw = {k: v for k, v in b.items() if k != "labels"}
        inputs = prepare_inputs(cfg, **kw, vision_attention="dense")
        ours.append(ts.shard_batch({**inputs.as_kwargs(), "labels": b["labels"].astype(np.int32)}))
    params = ts.place_params(weights.hf_to_flax(state, cfg))
    box = {"params": params, "opt_state": ts.init_opt_state(params)}

    def step(i):
        t0 = time.perf_counter()
        box["params"], box["opt_state"], m = ts(box["params"], box["opt_state"], ours[i % len(ours)])
        loss = float(jax.block_until_ready(m["loss"]))
        return time.perf_counter() - t0, loss

    return step


def interleaved(steppers: dict, steps: int) -> dict:
    """One warm-up (compile) step each, then `steps` rounds alternating the sides, so that a change in machine load
    hits both alike. Returns per side: median step seconds, warm-up seconds, losses."""
    out = {name: {"first_step_s": None, "times": [], "losses": []} for name in steppers}
    for name, step in steppers.items():
        dt, loss = step(0)
        out[name]["first_step_s"] = dt
        out[name]["losses"].append(loss)
    for i in range(1, steps + 1):
        for name, step in steppers.items():
            dt, loss = step(i)
            out[name]["times"].append(dt)
            out[name]["losses"].append(loss)
    for r in out.values():
        r["step_s"] = statistics.median(r["times"])
    return out


def loss_memory(hf_cfg: dict, state: dict, batch: dict, chunks: list[int], repeats: int = 2) -> list[dict]:
    """XLA temp bytes and time of value_and_grad(loss) for each head chunk size and for plain full logits."""
    import jax
    import jax.numpy as jnp

    from glm41v_jax import weights
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.inputs import prepare_inputs
    from glm41v_jax.model import Glm4v
    from glm41v_train.loss import loss_and_count, shift_targets

    cfg = Glm4vConfig.from_hf(hf_cfg).with_runtime(scan_layers=True, remat_policy="none")
    params = weights.stack_layers(weights.hf_to_flax(state, cfg))
    kw = {k: v for k, v in batch.items() if k != "labels"}
    b = {**prepare_inputs(cfg, **kw, vision_attention="dense").as_kwargs(), "labels": batch["labels"]}

    def plain(p, b):
        logits = Glm4v(cfg).apply({"params": p}, input_ids=b["input_ids"], positions=b["positions"],
                                  segment_ids=b["segment_ids"], vision=b["vision"], vision_index=b["vision_index"])
        tgt, w = shift_targets(b["labels"], b["segment_ids"])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0] * w) / w.sum()

    variants = [(f"chunk {c}", lambda p, b, c=c: (lambda s, n: s / n)(*loss_and_count(p, b, cfg, chunk_size=c)))
                for c in chunks] + [("plain (B, T, V) logits", plain)]
    rows = []
    for name, f in variants:
        fn = jax.jit(jax.value_and_grad(f))
        compiled = fn.lower(params, b).compile()
        mem = compiled.memory_analysis()
        jax.block_until_ready(compiled(params, b))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, b))
            times.append(time.perf_counter() - t0)
        loss = float(compiled(params, b)[0])
        rows.append({"loss": name, "temp_MiB": mem.temp_size_in_bytes / 2**20 if mem else None,
                     "s_per_call": statistics.median(times), "value": loss})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--remat", default="none", help="our remat policy: none | full | dots | dots_no_batch")
    ap.add_argument("--unrolled", action="store_true", help="StepConfig(scan_layers=False): per-layer weights")
    ap.add_argument("--loss-chunk", type=int, default=None, help="label rows per head chunk (default: the product's)")
    ap.add_argument("--loss-memory", action="store_true", help="also measure the loss alone per chunk size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    setup(args.threads)
    import jax
    import torch

    hf_cfg, model, state = hf_small_model()
    patch_dim = 3 * 2 * 14 * 14
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, args.batch, args.seq, patch_dim) for _ in range(2)]

    if args.loss_chunk is None:
        from glm41v_train.loss import DEFAULT_CHUNK

        args.loss_chunk = DEFAULT_CHUNK
    res = interleaved({"jax": jax_stepper(hf_cfg, state, batches, args.remat, args.loss_chunk, not args.unrolled),
                       "hf": hf_stepper(model, batches)}, args.steps)
    ours, hf = res["jax"], res["hf"]
    tokens = args.batch * args.seq
    row = {"batch": args.batch, "seq": args.seq, "tokens_per_step": tokens, "steps": args.steps,
           "hf_step_s": hf["step_s"], "jax_step_s": ours["step_s"],
           "hf_tokens_per_s": tokens / hf["step_s"], "jax_tokens_per_s": tokens / ours["step_s"],
           "speedup": hf["step_s"] / ours["step_s"], "jax_first_step_s": ours["first_step_s"],
           "hf_first_step_s": hf["first_step_s"], "remat": args.remat, "loss_chunk": args.loss_chunk,
           "scan_layers": not args.unrolled,
           "first_loss_hf": hf["losses"][0], "first_loss_jax": ours["losses"][0],
           "hf_times": hf["times"], "jax_times": ours["times"]}
    print(json.dumps(row), flush=True)
    print()
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__}, threads {args.threads}, float32; small config, {args.batch} x {args.seq} tokens "
          f"per step (one 448x448 image per row), AdamW + clipping")
    print_table([("B x T", "{batch} x {seq}"), ("HF s/step", "{hf_step_s:.2f}"), ("ours s/step", "{jax_step_s:.2f}"),
                 ("HF tok/s", "{hf_tokens_per_s:.0f}"), ("ours tok/s", "{jax_tokens_per_s:.0f}"),
                 ("speedup", "{speedup:.2f}x"), ("first loss HF / ours", "{first_loss_hf:.5f} / {first_loss_jax:.5f}")],
                [row], left=1)
    out = {"train": row}
    if args.loss_memory:
        print()
        out["loss_memory"] = loss_memory(hf_cfg, state, batches[0], [128, 512, args.seq])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
