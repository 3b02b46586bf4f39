"""Generation speed: this engine against transformers' Glm4vForConditionalGeneration, measured in the same run.

The "small" config (issue 3): text hidden 1024, 8 layers, 16 q / 2 kv heads, MLP 2816, mrope [4, 6, 6], vocab
151552; vision hidden 512, depth 4, 4 heads, out 1024. The prompt is one 448x448 image (1024 patches, 256 LLM
tokens) plus about 40 text tokens, built by our processor and fed identically to both. Random weights, float32.

Reported per batch size (1 and 4 by default):
  TTFT                 time to the first generated token (vision tower + prefill + first sample), after warm-up;
  decode tokens/s      generated tokens per second per row... summed over rows (batch x steps / decode time).
Both sides generate exactly N tokens (eos disabled). Greedy. Run:

    python benchmarks/generate.py [--new-tokens 64] [--batch 1 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from common import hf_small_model, print_table, setup


def build_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One 448x448 image + ~40 text tokens per row, through our processor (hub pixel limits)."""
    from PIL import Image

    from glm41v_jax import tiny
    from glm41v_jax.processing import Processor

    with tempfile.TemporaryDirectory() as d:
        tiny.write_tokenizer_files(d)
        proc = Processor.from_dir(d)
    rng = np.random.default_rng(seed)
    texts, images = [], []
    for i in range(batch):
        img = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
        prompt = f"Describe this picture in detail, please ({i})."  # ~40 characters = tokens (char-level tokenizer)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        texts.append(proc.apply_chat_template(msgs))
        images.append(img)
    return proc(texts, images=images)


def bench_hf(model, inputs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    import torch

    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=151329)

    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - t0, out

    run(2)  # warm-up
    ttft = statistics.median(run(1)[0] for _ in range(repeats))
    total, out = run(new_tokens)
    b = kw["input_ids"].shape[0]
    steps = out.shape[1] - kw["input_ids"].shape[1]
    assert steps == new_tokens, (steps, new_tokens)
    return {"ttft_s": ttft, "decode_tokens_per_s": b * (steps - 1) / max(total - ttft, 1e-9),
            "tokens": out[:, kw["input_ids"].shape[1]:].numpy()}


def bench_jax(hf_cfg: dict, hf_state: dict, inputs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    from glm41v_jax import weights
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.engine import Engine

    cfg = Glm4vConfig.from_hf(hf_cfg)
    params = weights.hf_to_flax(hf_state, cfg)
    eng = Engine(params, cfg)
    kw = dict(max_new_tokens=new_tokens, eos_ids=())
    t0 = time.perf_counter()
    eng.generate_batch(inputs, **kw)  # compiles prefill + decode
    compile_s = time.perf_counter() - t0
    ttfts, rates = [], []
    res = None
    for _ in range(repeats):
        res = eng.generate_batch(inputs, **kw)
        ttfts.append(res[0].timings["prefill_s"])
        rates.append(sum(len(r.token_ids) - 1 for r in res) / res[0].timings["decode_s"])
    return {"ttft_s": statistics.median(ttfts), "decode_tokens_per_s": statistics.median(rates),
            "compile_s": compile_s, "num_compiles": eng.num_compiles,
            "tokens": np.asarray([r.token_ids for r in res])}


def prefill_flops(cfg, inputs: dict) -> float:
    """Useful model FLOPs of the prefill (real tokens and patches; logits for the last position of each row), from
    the training FLOP model (glm41v_train.metrics.FlopCounter, forward only)."""
    from glm41v_jax.model import abstract_params
    from glm41v_jax.requests import prepare_batch
    from glm41v_jax.sharding import unbox
    from glm41v_train.metrics import FlopCounter

    counter = FlopCounter(cfg, unbox(abstract_params(cfg)), freeze=("vision", "projector", "decoder"))  # forward
    prep = prepare_batch(cfg, inputs, 1, patch_bucket=None)
    stats = FlopCounter.batch_stats(prep.model_kwargs)
    rows = prep.model_kwargs["input_ids"].shape[0]
    head = 2.0 * cfg.text.hidden_size * cfg.text.vocab_size * (stats["tokens"] - rows)  # no logits there
    return counter.step_flops(stats) - (0.0 if cfg.tie_word_embeddings else head)


def decode_bytes(cfg) -> float:
    """Bytes of weights one decode step reads: every text-decoder and lm_head parameter (float32)."""
    import jax

    from glm41v_jax.model import abstract_params
    from glm41v_jax.sharding import unbox

    leaves = jax.tree_util.tree_flatten_with_path(unbox(abstract_params(cfg)))[0]
    n = sum(int(np.prod(x.shape)) for p, x in leaves if str(getattr(p[0], "key", "")) in ("language_model", "lm_head"))
    # The input embedding is a lookup (one row per token), unless it is also the (tied) output head.
    emb = 0 if cfg.tie_word_embeddings else cfg.text.vocab_size * cfg.text.hidden_size
    return 4.0 * (n - emb)


def machine_limits() -> dict[str, float]:
    """What this machine does at best, measured now: a large fp32 GEMM (GFLOP/s) in XLA and in torch, and the
    memory read bandwidth (GB/s, a 512 MB reduction) in XLA and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    m, k, n = 1024, 1024, 4096
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    big = np.ones(128 << 20, np.float32)
    jbig, tbig = jnp.asarray(big), torch.from_numpy(big)
    jsum = jax.jit(jnp.sum)
    flop = 2.0 * m * k * n
    return {"xla_gemm_gflops": flop / best(lambda: mm(ja, jb).block_until_ready()) / 1e9,
            "torch_gemm_gflops": flop / best(lambda: torch.matmul(ta, tb)) / 1e9,
            "xla_read_gbs": big.nbytes / best(lambda: jsum(jbig).block_until_ready()) / 1e9,
            "torch_read_gbs": big.nbytes / best(lambda: tbig.sum()) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    setup(args.threads)
    import jax
    import torch

    from glm41v_jax.config import Glm4vConfig as Cfg

    hf_cfg, hf_model, state = hf_small_model()
    hf_model.eval()
    cfg = Cfg.from_hf(hf_cfg)
    step_bytes = decode_bytes(cfg)
    rows = []
    for b in args.batch:
        inputs = build_inputs(b)
        n_prompt = inputs["input_ids"].shape[1]
        flops = prefill_flops(cfg, inputs)
        hf = bench_hf(hf_model, inputs, args.new_tokens, args.repeats)
        ours = bench_jax(hf_cfg, state, inputs, args.new_tokens, args.repeats)
        same = bool((hf.pop("tokens") == ours.pop("tokens")).all())
        row = {"batch": b, "prompt_tokens": n_prompt, "new_tokens": args.new_tokens,
               "hf_ttft_s": hf["ttft_s"], "jax_ttft_s": ours["ttft_s"],
               "ttft_ratio": ours["ttft_s"] / hf["ttft_s"],
               "hf_decode_tok_s": hf["decode_tokens_per_s"], "jax_decode_tok_s": ours["decode_tokens_per_s"],
               "decode_speedup": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
               "prefill_gflop": flops / 1e9, "hf_prefill_gflops": flops / hf["ttft_s"] / 1e9,
               "jax_prefill_gflops": flops / ours["ttft_s"] / 1e9,
               "decode_step_gb": step_bytes / 1e9,
               "hf_decode_gbs": step_bytes * hf["decode_tokens_per_s"] / b / 1e9,
               "jax_decode_gbs": step_bytes * ours["decode_tokens_per_s"] / b / 1e9,
               "jax_compile_s": ours["compile_s"], "num_compiles": ours["num_compiles"], "same_tokens": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    limits = machine_limits()
    print(json.dumps({"machine_limits": limits}), flush=True)
    print()
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}, threads {args.threads}, float32, greedy, {args.new_tokens} new tokens, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print_table([("batch", "{batch}"), ("prompt tokens", "{prompt_tokens}"), ("TTFT HF s", "{hf_ttft_s:.3f}"),
                 ("TTFT ours s", "{jax_ttft_s:.3f}"), ("TTFT ratio", "{ttft_ratio:.2f}"),
                 ("decode HF tok/s", "{hf_decode_tok_s:.1f}"), ("decode ours tok/s", "{jax_decode_tok_s:.1f}"),
                 ("decode speedup", "{decode_speedup:.2f}x"), ("same tokens", "{same_tokens}")], rows)
    print()
    print_table([("batch", "{batch}"), ("prefill GFLOP", "{prefill_gflop:.1f}"),
                 ("HF GFLOP/s", "{hf_prefill_gflops:.0f}"), ("ours GFLOP/s", "{jax_prefill_gflops:.0f}"),
                 ("decode GB/step", "{decode_step_gb:.2f}"), ("HF GB/s", "{hf_decode_gbs:.1f}"),
                 ("ours GB/s", "{jax_decode_gbs:.1f}")], rows)
    print(f"machine limits, measured now: fp32 GEMM 1024x1024x4096 XLA {limits['xla_gemm_gflops']:.0f} / torch "
          f"{limits['torch_gemm_gflops']:.0f} GFLOP/s; memory read XLA {limits['xla_read_gbs']:.1f} / torch "
          f"{limits['torch_read_gbs']:.1f} GB/s")
    print("(the prefill is compute-bound: TTFT >= prefill GFLOP / GEMM GFLOP/s; a batch-1 decode step is "
          "bandwidth-bound: tokens/s <= read GB/s / decode GB/step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine_limits": limits}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
