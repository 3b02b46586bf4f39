"""Batch-file memory: peak RSS of `glm41v generate --batch-file` against the number of lines.

For each line count N it writes a JSONL file of N requests, each with one small PNG (a few distinct random images,
cycled; every line is read and encoded on its own), and runs

    python -m glm41v_jax generate --batch-file F --batch-size B --max-new-tokens K --greedy --mesh none

on the embedded tiny checkpoint in a child process. Peak RSS comes from os.wait4's rusage (that child only); the
time to the first result line is read from the child's stdout as it comes. With `--reference-src DIR` (a source
tree of another revision, e.g. `git archive <rev> | tar -x -C DIR`) the same files also run with that tree first on
PYTHONPATH, in the same session, as the reference.

    python benchmarks/batch_memory.py --lines 10 100 1000
    python benchmarks/batch_memory.py --lines 10 100 1000 --reference-src /tmp/old_tree
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import print_table
from PIL import Image


def write_requests(workdir: str, n: int, image_size: int, n_images: int = 8) -> str:
    rng = np.random.default_rng(0)
    for i in range(n_images):
        path = os.path.join(workdir, f"img{i}.png")
        if not os.path.exists(path):
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(path)
    path = os.path.join(workdir, f"requests-{n}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Request {i}: what is in the picture?",
                                "images": [f"img{i % n_images}.png"]}) + "\n")
    return path


def run_one(batch_file: str, args: argparse.Namespace, src: str | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if args.cache:
        env["GLM41V_CACHE"] = args.cache
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", "import sys, glm41v_jax, glm41v_jax.cli as c; "
           "print('[glm41v_jax from ' + glm41v_jax.__file__ + ']', file=sys.stderr); sys.exit(c.main())",
           "generate", "--batch-file", batch_file, "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--greedy", "--mesh", "none"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=src or None,
                            text=True)
    first = None
    ok = failed = 0
    for line in proc.stdout:
        if line.startswith('{"line"'):
            if first is None:
                first = time.perf_counter() - t0
            ok += "token_ids" in line
            failed += '"error"' in line
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    origin = next((ln for ln in err.splitlines() if ln.startswith("[glm41v_jax from")), "?")
    if proc.returncode not in (0, 2) or ok == 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    return {"rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "first_s": first or float("nan"), "ok": ok,
            "failed": failed, "origin": origin}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--image-size", type=int, default=224, help="pixels per side of the PNGs (default 224)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--reference-src", default=None, help="source tree of a reference revision (run first)")
    p.add_argument("--cache", default=None, help="GLM41V_CACHE for the tiny checkpoint (default: the usual)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="batch_memory_")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    try:
        files = {n: write_requests(workdir, n, args.image_size) for n in args.lines}
        versions = ([("reference", os.path.abspath(args.reference_src))] if args.reference_src else [])
        versions.append(("this tree", None))
        for name, src in versions:
            base = None
            for n in args.lines:
                r = run_one(files[n], args, src)
                base = base or r["rss_mib"]
                rows.append({"version": name, "lines": n, **r, "ratio": r["rss_mib"] / base})
                print(f"[{name}: {n} lines: peak RSS {r['rss_mib']:.0f} MiB, {r['wall_s']:.1f} s, first result "
                      f"after {r['first_s']:.1f} s; {r['origin']}]", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"batch size {args.batch_size}, {args.image_size}x{args.image_size} PNG per line, "
          f"max_new_tokens {args.max_new_tokens}, tiny checkpoint, CPU")
    print_table([("version", "{version}"), ("lines", "{lines}"), ("peak RSS (MiB)", "{rss_mib:.0f}"),
                 ("vs. fewest lines", "{ratio:.2f}x"), ("wall (s)", "{wall_s:.1f}"),
                 ("first result after (s)", "{first_s:.1f}"), ("results", "{ok}")], rows, left=1)


if __name__ == "__main__":
    main()
