"""Weight-only quantization, CPU decode speed side by side (issue 13, part 5): in one run, on the "small" config
(common.SMALL) with the prompt of benchmarks/generate.py (one 448x448 image + ~40 text tokens per row, 308 tokens),
decode tokens/s at each batch size for

  ours fp32         the Engine on the float params (the reference of our ratios)
  ours int8         the Engine on `quant.quantize_params(..., quantize="int8")` (decoder projections + lm_head;
                    the vision tower stays float, the default `quant_skip`)
  ours int4         the same with "int4", groups of 64 (`--group-size`: the small config's head dim is 64, the
                    o projection's grouped input axis; the 9B's is 128)
  HF fp32           transformers' Glm4vForConditionalGeneration on the same float weights
  HF dyn int8       the same model after `torch.ao.quantization.quantize_dynamic` of the same layers (the text
                    decoder's and the lm_head's nn.Linear; torch's default dynamic qconfig: int8 weights, one scale
                    per tensor, activations quantized per call)

Decode tokens/s = generated tokens after the first (rows x (N - 1)) / the time from the first token to the last:
ours from the Engine's own timing (`timings["decode_s"]`), transformers' from a logits processor that stamps each
step (no prefill in either). Each repetition runs every variant once, in turn (A B C D E A B C D E ...), so the
machine's load hits all alike; the table gives medians. Random weights; greedy; eos disabled.

Weight GB/s = the bytes of weights one decode step reads (text decoder and lm_head parameters as stored, the
input embedding excluded: a lookup) x steps per second; int4 codes are held one per byte on XLA:CPU.

    python benchmarks/quant_decode.py [--new-tokens 33] [--batch 1 4] [--repeats 3] [--threads 2]

The default run takes about 4 minutes on the 2-core VM of BENCHMARKS.md when it is quiet.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import hf_small_model, print_table, setup
from generate import build_inputs

OURS = ("fp32", "int8", "int4")
VARIANTS = ("ours fp32", "ours int8", "ours int4", "HF fp32", "HF dyn int8")


def our_params(cfg: Any, state: dict, scheme: str, group_size: int) -> Any:
    """The float params of `state` (host NumPy), quantized on the host to `scheme` unless "fp32"."""
    from glm41v_jax import weights
    from glm41v_jax.quant import quantize_params

    params = weights.hf_to_flax(state, cfg)
    if scheme == "fp32":
        return params
    return quantize_params(params, cfg.with_runtime(quantize=scheme, quant_group_size=group_size))


def step_bytes_ours(params: Any) -> float:
    """Bytes of the weights one decode step reads: the text decoder's and lm_head's leaves as held (the Engine's
    device arrays), the input embedding excluded."""
    import jax

    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] in ("language_model", "lm_head") and "embed_tokens" not in keys:
            total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return float(total)


def step_bytes_hf(model: Any) -> float:
    """The same for a transformers model: float parameters at their width, dynamically quantized Linear layers at
    one byte per weight plus their float bias."""
    import torch
    from torch.ao.nn.quantized import dynamic as qd

    total = 0
    for name, mod in model.named_modules():
        if not (name.startswith("model.language_model") or name == "lm_head") or "embed_tokens" in name:
            continue
        if isinstance(mod, qd.Linear):  # its weights live in a packed-params child (no parameters)
            w, b = mod.weight(), mod.bias()
            total += w.numel() + (0 if b is None else b.numel() * b.element_size())
        else:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
            total += sum(b.numel() * b.element_size() for b in mod.buffers(recurse=False)
                         if b.dtype != torch.int64)
    return float(total)


def hf_dynamic_int8(model: Any) -> Any:
    """A copy of the transformers model whose text decoder and lm_head Linear layers are torch dynamic int8."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    q = copy.deepcopy(model)
    q.model.language_model = quantize_dynamic(q.model.language_model, {torch.nn.Linear}, dtype=torch.qint8)
    q.lm_head = quantize_dynamic(torch.nn.Sequential(q.lm_head), {torch.nn.Linear}, dtype=torch.qint8)[0]
    return q.eval()


def hf_runner(model: Any, inputs: dict, new_tokens: int) -> Callable[[], tuple[float, np.ndarray]]:
    """One greedy generate of `new_tokens` -> (decode tokens/s, the generated tokens)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.t.append(time.perf_counter())
            return scores

    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    n_prompt = kw["input_ids"].shape[1]

    def run() -> tuple[float, np.ndarray]:
        stamp = Stamp()
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=151329, logits_processor=LogitsProcessorList([stamp]))
        toks = out[:, n_prompt:].numpy()
        assert toks.shape[1] == new_tokens == len(stamp.t), (toks.shape, new_tokens, len(stamp.t))
        return toks.shape[0] * (new_tokens - 1) / (stamp.t[-1] - stamp.t[0]), toks

    return run


def ours_runner(engine: Any, inputs: dict, new_tokens: int) -> Callable[[], tuple[float, np.ndarray]]:
    def run() -> tuple[float, np.ndarray]:
        res = engine.generate_batch(inputs, max_new_tokens=new_tokens, eos_ids=())
        assert all(len(r.token_ids) == new_tokens for r in res), [len(r.token_ids) for r in res]
        return sum(len(r.token_ids) - 1 for r in res) / res[0].timings["decode_s"], np.asarray(
            [r.token_ids for r in res])

    return run


def measure(batches: list[int], new_tokens: int, repeats: int, group_size: int) -> list[dict]:
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.engine import Engine

    hf_cfg, hf_model, state = hf_small_model()
    hf_model.eval()
    cfg = Glm4vConfig.from_hf(hf_cfg)
    engines = {}
    for scheme in OURS:
        qcfg = cfg if scheme == "fp32" else cfg.with_runtime(quantize=scheme, quant_group_size=group_size)
        engines[f"ours {scheme}"] = Engine(our_params(cfg, state, scheme, group_size), qcfg)
    del state
    models = {"HF fp32": hf_model, "HF dyn int8": hf_dynamic_int8(hf_model)}
    nbytes = {k: step_bytes_ours(e.params) for k, e in engines.items()}
    nbytes.update({k: step_bytes_hf(m) for k, m in models.items()})
    rows = []
    for b in batches:
        inputs = build_inputs(b)
        runs = {k: ours_runner(e, inputs, new_tokens) for k, e in engines.items()}
        runs.update({k: hf_runner(m, inputs, new_tokens) for k, m in models.items()})
        tokens = {k: f()[1] for k, f in runs.items()}  # warm-up: compiles ours, warms torch
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for k, f in runs.items():
                rates[k].append(f()[0])
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k in VARIANTS:
            ref = "ours fp32" if k.startswith("ours") else "HF fp32"
            row = {"batch": b, "variant": k, "tok_s": med[k], "runs": " ".join(f"{r:.1f}" for r in rates[k]),
                   "step_gb": nbytes[k] / 1e9, "weight_gbs": nbytes[k] * med[k] / b / 1e9,
                   "vs_ours_fp32": med[k] / med["ours fp32"], "vs_hf_fp32": med[k] / med["HF fp32"],
                   "same_tokens_as_fp32": float((tokens[k] == tokens[ref]).mean())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def verdicts(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(target, measured, bound) for each target of issue 13 part 5; measured >= bound means met."""
    r = {(x["batch"], x["variant"]): x["tok_s"] for x in rows}
    out = []
    for b, ours_min, hf_min in ((1, 1.6, 3.0), (4, 1.3, 4.0)):
        if (b, "ours int8") not in r:
            continue
        i8 = r[(b, "ours int8")]
        out += [(f"batch {b}: ours int8 / ours fp32", i8 / r[(b, "ours fp32")], ours_min),
                (f"batch {b}: ours int8 / HF fp32", i8 / r[(b, "HF fp32")], hf_min),
                (f"batch {b}: ours int8 / HF dyn int8", i8 / r[(b, "HF dyn int8")], 1.0)]
        if b == 1:
            out.append(("batch 1: ours int4 / ours int8", r[(b, "ours int4")] / i8, 1.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=33, help="per row; 33 = the first + two 16-step chunks")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.new_tokens < 2 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2 and --repeats >= 1")

    setup(args.threads)
    import jax
    import torch

    t0 = time.time()
    rows = measure(args.batch, args.new_tokens, args.repeats, args.group_size)
    print(f"\nmachine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.backends.quantized.engine} quantized "
          f"engine), threads {args.threads}, int4 groups of {args.group_size}, fp32 activations, greedy, "
          f"{args.new_tokens} new tokens, "
          f"{args.repeats} repetitions interleaved, {time.time() - t0:.0f} s, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print_table([("batch", "{batch}"), ("variant", "{variant}"), ("decode tok/s", "{tok_s:.1f}"),
                 ("runs", "{runs}"), ("GB/step", "{step_gb:.3f}"), ("weight GB/s", "{weight_gbs:.1f}"),
                 ("vs ours fp32", "{vs_ours_fp32:.2f}x"), ("vs HF fp32", "{vs_hf_fp32:.2f}x"),
                 ("tokens = fp32's", "{same_tokens_as_fp32:.0%}")], rows, left=2)
    print()
    for name, got, bound in verdicts(rows):
        print(f"{name}: {got:.2f}x (target >= {bound:g}x): {'met' if got >= bound else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "targets": verdicts(rows)}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
