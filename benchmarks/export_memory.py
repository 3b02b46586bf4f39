"""`glm41v export` memory/throughput at the REAL GLM-4.1V-9B tensor shapes, against the converter in the same run.

For each text-layer count L, convert_memory.py's synthetic sharded bf16 checkpoint (the 9B widths, L text layers,
max(1, L // 2) vision blocks, the 1.24 GB embedding and lm_head) is written and converted (`glm41v convert`, in a
subprocess: its peak RSS is the reference), then the converted directory is exported back (`glm41v export`, in a
subprocess; peak RSS from os.wait4's rusage of that child only, throughput = exported bytes / wall time). The page
cache is dropped for the converted files first (posix_fadvise DONTNEED), so the export reads from disk. Every
exported tensor is then compared byte for byte with the source (one tensor at a time, in another subprocess), and
everything is deleted.

    python benchmarks/export_memory.py --layers 2 4 --workdir /tmp/exportbench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from common import print_table
from convert_memory import du, run_converter, synthetic_config, write_checkpoint
from safetensors import safe_open


def _drop_cache(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_export(src: str, dst: str, extra: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of one `glm41v export` subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "glm41v_jax.cli", "export", src, dst, *extra], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)  # ru_maxrss is KiB on Linux


def _weight_map(directory: str) -> dict[str, str]:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def same_tensors(a_dir: str, b_dir: str) -> int:
    """The number of tensors compared; SystemExit naming the first one whose bytes differ."""
    a_map, b_map = _weight_map(a_dir), _weight_map(b_dir)
    if set(a_map) != set(b_map):
        raise SystemExit(f"tensor names differ: {sorted(set(a_map) ^ set(b_map))[:4]}")
    for name in a_map:
        with safe_open(os.path.join(a_dir, a_map[name]), "np") as fa, \
                safe_open(os.path.join(b_dir, b_map[name]), "np") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                raise SystemExit(f"{name}: the exported tensor differs from the source")
    return len(a_map)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--shard-gb", type=float, default=5.0, help="source and export shard size")
    ap.add_argument("--workdir", default="/tmp/glm41v_exportbench")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--compare", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        print(same_tensors(*args.compare))
        return
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for layers in args.layers:
        src, conv, out = (os.path.join(args.workdir, f"{k}-{layers}") for k in ("hf", "orbax", "export"))
        for d in (src, conv, out):
            shutil.rmtree(d, ignore_errors=True)
        try:
            hf_cfg = synthetic_config(layers)
            total, n_src = write_checkpoint(src, hf_cfg, int(args.shard_gb * 1e9))
            c_wall, c_rss, rc = run_converter(src, conv, [])
            if rc != 0:
                raise SystemExit(f"converter failed with exit code {rc} for {layers} layers")
            _drop_cache(conv)
            e_wall, e_rss, rc = run_export(conv, out, ["--shard-gb", str(args.shard_gb)])
            if rc != 0:
                raise SystemExit(f"export failed with exit code {rc} for {layers} layers")
            # in a child: a forked child starts with its parent's RSS high-water mark (Linux copies it at fork), so
            # the 1.24 GB tensors compared here would show up in the next iteration's measured peaks
            check = subprocess.run([sys.executable, __file__, "--compare", src, out], capture_output=True, text=True)
            if check.returncode != 0:
                raise SystemExit(f"byte comparison failed for {layers} layers: {check.stderr.strip()[-300:]}")
            n = int(check.stdout)
            shards = len(set(_weight_map(out).values()))
            rows.append(dict(text_layers=layers, vision_blocks=hf_cfg["vision_config"]["depth"], tensors=n,
                             source_gb=total / 1e9, export_gb=du(out) / 1e9, shards=shards, convert_s=c_wall,
                             export_s=e_wall, export_gb_per_s=total / 1e9 / e_wall, convert_rss_gib=c_rss,
                             export_rss_gib=e_rss, rss_ratio=e_rss / c_rss, bytes_equal=True))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            for d in (src, conv, out):
                shutil.rmtree(d, ignore_errors=True)
    print()
    print_table([("text layers", "{text_layers}"), ("vision blocks", "{vision_blocks}"), ("tensors", "{tensors}"),
                 ("source GB", "{source_gb:.2f}"), ("export shards", "{shards}"), ("convert s", "{convert_s:.1f}"),
                 ("export s", "{export_s:.1f}"), ("export GB/s", "{export_gb_per_s:.2f}"),
                 ("convert peak RSS GiB", "{convert_rss_gib:.2f}"), ("export peak RSS GiB", "{export_rss_gib:.2f}"),
                 ("export / convert RSS", "{rss_ratio:.2f}"), ("bytes equal", "{bytes_equal}")], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
