"""Host-side choices of the loader and the package's import, measured: the tiled transposed copy
(`hf_checkpoint.contiguous`) against `np.ascontiguousarray`, the bf16 transpose on raw uint16 bits against
ml_dtypes' bfloat16, and what importing Orbax would add to `import glm41v_jax` (why converted.py imports it lazily).

    python benchmarks/host_layout.py [--rows 8192] [--cols 8192] [--repeats 3]

Prints medians (seconds) and the ratios, each against its reference measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from glm41v_jax.hf_checkpoint import contiguous


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_s(module: str, repeats: int) -> float:
    """Median wall time of `python -c 'import module'` in a fresh interpreter, minus that of `python -c pass`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return time.perf_counter() - t0

    base = statistics.median(run("pass") for _ in range(repeats))
    return statistics.median(run(f"import {module}") for _ in range(repeats)) - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    a = np.random.default_rng(0).standard_normal((args.rows, args.cols), np.float32).astype(ml_dtypes.bfloat16)
    raw = a.view(np.uint16)
    mb = a.nbytes / 2**20
    rows = [
        ("bf16 transpose, ml_dtypes, np.ascontiguousarray", median_s(lambda: np.ascontiguousarray(a.T), args.repeats)),
        ("bf16 transpose, raw uint16, np.ascontiguousarray",
         median_s(lambda: np.ascontiguousarray(raw.T), args.repeats)),
        ("bf16 transpose, raw uint16, tiled (contiguous)", median_s(lambda: contiguous(raw.T), args.repeats)),
    ]
    assert np.array_equal(contiguous(raw.T), np.ascontiguousarray(raw.T))
    print(f"transposed copy of a {args.rows} x {args.cols} bf16 matrix ({mb:.0f} MiB), median of {args.repeats}:")
    ref = rows[0][1]
    for name, s in rows:
        print(f"  {name:<52} {s:8.3f} s   {ref / s:5.1f}x the ml_dtypes copy")
    base = import_s("glm41v_jax", args.repeats)
    orbax = import_s("orbax.checkpoint.experimental.v1", args.repeats)
    both = import_s("glm41v_jax, orbax.checkpoint.experimental.v1", args.repeats)
    print(f"import glm41v_jax: {base:.2f} s; import orbax.checkpoint.experimental.v1 alone: {orbax:.2f} s; "
          f"both: {both:.2f} s (+{both - base:.2f} s, {both / base:.2f}x, if the package imported Orbax at the top)")
    print(f"machine: {os.cpu_count()} CPU cores, numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
