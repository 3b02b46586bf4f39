"""Where the time of one SFT step goes: our train step of benchmarks/train.py, traced with the JAX profiler.

Runs the same step as `benchmarks/train.py` (same "small" config, batches, AdamW, head chunk), traces one step
after warm-up, and joins the trace's XLA:CPU op events with the compiled HLO (dumped by XLA into a temporary
folder): each op's `op_name` says which part of the program it belongs to, and each dot its FLOPs (2 x output size
x contracted size). Prints seconds, GFLOP and GFLOP/s per region (head, text / vision forward / backward,
attention, optimizer, other) and the slowest ops. Run on a quiet machine:

    python benchmarks/train_profile.py [--batch 2] [--seq 512] [--unrolled] [--loss-chunk 128] [--top 25]

Event times are wall times of ops on XLA:CPU's thread pool. Independent ops may run at the same time (the head's
d(hidden) and d(W) products, for one), so one of a pair can show a low rate and the other an impossible one; their
sum, and the region totals, are what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile


def parse_hlo(path: str) -> dict[str, dict]:
    """Instruction name -> {shape, op, calls, op_name, line} over every computation of an HLO text dump."""
    inst = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        inst[name] = {"shape": shape, "op": op, "line": line, "calls": calls.group(1) if calls else None,
                      "op_name": op_name.group(1) if op_name else ""}
    return inst


def computations(path: str) -> dict[str, list[str]]:
    """Computation name -> names of its instructions."""
    comps, cur = {}, None
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m and cur:
            comps[cur].append(m.group(1))
    return comps


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(name: str, inst: dict, comps: dict) -> int:
    """FLOPs of a dot, or of the dots inside a fusion."""
    d = inst[name]
    if d["op"] == "dot":
        lhs = re.search(r"dot\(%?([\w.\-]+),", d["line"])
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d["line"])
        if not (lhs and contracting and lhs.group(1) in inst):
            return 0
        lhs_dims = _dims(inst[lhs.group(1)]["shape"])
        k = 1
        for i in contracting.group(1).split(","):
            if i:
                k *= lhs_dims[int(i)]
        n = 1
        for x in _dims(d["shape"]):
            n *= x
        return 2 * n * k
    if d["calls"] in comps:
        return sum(dot_flops(x, inst, comps) for x in comps[d["calls"]])
    return 0


def region(op_name: str) -> str:
    on = op_name.replace("jit(train_step)/", "")
    if "optimizer" in on:
        return "optimizer (AdamW, clipping)"
    if "head_cross_entropy" in on:
        return "loss head (label rows)"
    tower = "vision" if ("vision" in on or "visual" in on) else "text" if "language_model" in on else "other"
    if "grads" not in on:
        return f"outside the gradient ({tower})"
    part = "attention" if "attention" in on else "layers"
    return f"{tower} {part} {'backward' if 'transpose(' in on else 'forward'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--unrolled", action="store_true", help="StepConfig(scan_layers=False): per-layer weights")
    ap.add_argument("--loss-chunk", type=int, default=None, help="label rows per head chunk (default: the product's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--top", type=int, default=25, help="also list this many slowest ops")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="glm41v_profile_")
    dump = os.path.join(work, "hlo")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*train_step.*").strip()
    import numpy as np
    from common import hf_small_model, print_table, setup

    setup(args.threads)
    import jax

    from glm41v_train.loss import DEFAULT_CHUNK
    from train import jax_stepper, make_batch

    chunk = DEFAULT_CHUNK if args.loss_chunk is None else args.loss_chunk
    hf_cfg, _, state = hf_small_model()
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, args.batch, args.seq, 3 * 2 * 14 * 14) for _ in range(2)]
    step = jax_stepper(hf_cfg, state, batches, "none", chunk, not args.unrolled)
    for i in range(2):
        step(i)
    trace_dir = os.path.join(work, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step_s, _ = step(2)

    hlo = [p for p in glob.glob(os.path.join(dump, "*train_step*.txt")) if p.endswith("cpu_after_optimizations.txt")]
    if not hlo:
        raise SystemExit(f"no optimized train_step HLO was dumped under {dump}")
    inst, comps = parse_hlo(hlo[-1]), computations(hlo[-1])
    traces = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(traces[0]) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    busy, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e["name"] in inst and inst[e["name"]]["op"] not in ("while", "call", "conditional"):
            busy[e["name"]] += e["dur"] / 1e6
            count[e["name"]] += 1
    regions = collections.defaultdict(lambda: [0.0, 0.0])
    ops = []
    for name, sec in busy.items():
        fl = dot_flops(name, inst, comps) * count[name] / 1e9
        r = regions[region(inst[name]["op_name"])]
        r[0] += sec
        r[1] += fl
        ops.append((sec, fl, name))
    total = sum(r[0] for r in regions.values())
    print(f"one step: {step_s:.2f} s wall; {total:.2f} s in XLA ops; {args.batch} x {args.seq} tokens, "
          f"{'unrolled' if args.unrolled else 'scanned'} layers, head chunk {chunk}, jax {jax.__version__}, "
          f"{os.cpu_count()} CPU cores")
    dots = sum(fl for _, fl, _ in ops)
    dot_s = sum(sec for sec, fl, _ in ops if fl)
    table = [{"region": k, "s": sec, "gflop": f"{fl:.0f}", "rate": f"{fl / sec:.0f}" if fl else ""}
             for k, (sec, fl) in sorted(regions.items(), key=lambda kv: -kv[1][0]) if sec >= 5e-3]
    table += [{"region": "all dots", "s": dot_s, "gflop": f"{dots:.0f}",
               "rate": f"{dots / dot_s:.0f}" if dot_s else ""},
              {"region": "everything else", "s": total - dot_s, "gflop": "", "rate": ""}]
    print_table([("region", "{region}"), ("s", "{s:.2f}"), ("GFLOP", "{gflop}"), ("GFLOP/s", "{rate}")], table, left=1)
    if args.top:
        print(f"\nslowest {args.top} ops (summed over their calls):")
        for sec, fl, name in sorted(ops, reverse=True)[: args.top]:
            d = inst[name]
            rate = f"{fl / sec:6.0f} GF/s" if fl else " " * 11
            print(f"{sec * 1e3:8.1f} ms x{count[name]:4d} {rate} {d['shape'][:28]:28s} "
                  f"{d['op_name'].replace('jit(train_step)/', '')[-90:]}")


if __name__ == "__main__":
    sys.exit(main())
