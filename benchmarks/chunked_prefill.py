"""Chunked prefill against one-shot prefill on CPU: the Engine's prefill program of one long text prompt, "small"
config (benchmarks/common.py), random weights, fp32, batch 1.

    python benchmarks/chunked_prefill.py                  # --prompt 4096 --chunks 0 2048 1024 --repeats 3

For each `prefill_chunk` setting (0 = the prompt in one piece, the reference of the same run) it compiles the
prefill program, runs it `--repeats` times (the best and the median are printed) and reads the compiled program's
temporaries (`memory_analysis().temp_size_in_bytes`: what chunking bounds). It checks that every setting's first
token and last logits' argmax equal the one-shot run's. Ratios are against the one-shot row of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import print_table, setup, small_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens (a bucket: a multiple of 256 or 1024)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 1024], help="prefill_chunk settings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup(args.threads)
    import jax
    import numpy as np

    from glm41v_jax import tiny, weights
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.engine import Engine

    d = small_config()
    cfg = Glm4vConfig.from_hf(d)
    params = weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=0), cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 30000, size=(1, args.prompt)).astype(np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows, ref = [], None
    for chunk in args.chunks:
        eng = Engine(params, cfg, prefill_chunk=chunk, donate=False)
        prep = eng.prepare(inputs, 2)
        state = eng.prefill(prep)  # compiles
        jax.block_until_ready(state)
        compile_s = eng.compile_log[-1][1]
        exe = eng.programs()[-1][1]
        temp = exe.memory_analysis().temp_size_in_bytes
        times = []
        for _ in range(args.repeats):
            del state
            t0 = time.perf_counter()
            state = eng.prefill(prep)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        tok = int(np.asarray(state.tok)[0])
        if ref is None:
            ref = {"best": min(times), "median": statistics.median(times), "temp": temp, "tok": tok}
        rows.append({"setting": "one piece" if not chunk else str(chunk), "desc": eng.compile_log[-1][0],
                     "best": min(times), "median": statistics.median(times),
                     "ratio": min(times) / ref["best"], "mratio": statistics.median(times) / ref["median"],
                     "temp": temp / 2**20, "tratio": temp / ref["temp"], "compile": compile_s,
                     "same": "yes" if tok == ref["tok"] else "NO"})
    print(f"prompt {args.prompt} tokens, batch 1, small config fp32, {args.threads} threads, jax {jax.__version__}")
    print_table([("prefill_chunk", "{setting}"), ("program", "{desc}"), ("best s", "{best:.2f}"),
                 ("median s", "{median:.2f}"), ("best / one piece", "{ratio:.2f}x"),
                 ("median / one piece", "{mratio:.2f}x"), ("temporaries MiB", "{temp:.0f}"),
                 ("temp / one piece", "{tratio:.2f}x"), ("compile s", "{compile:.1f}"),
                 ("first token = one piece's", "{same}")], rows, left=2)


if __name__ == "__main__":
    main()
