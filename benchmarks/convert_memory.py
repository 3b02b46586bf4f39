"""Converter memory/throughput benchmark on synthetic checkpoints with the REAL GLM-4.1V-9B tensor shapes.

For each text-layer count L it writes a sharded bf16 safetensors checkpoint like the hub's (model-0000X-of-0000N
.safetensors of about --shard-gb each + model.safetensors.index.json + config.json) with the 9B widths (vocab 151552,
hidden 4096, MLP 13696, 32/2 heads, vision 1536 wide, merger 13696) but L text layers and max(1, L // 2) vision
blocks (reduced to keep disk use down; a vision block is only 57 MB). Data are a repeated random byte block (the
converter does no arithmetic on bf16 -> bf16, so the values do not matter). The files are fsync'ed and dropped from
the page cache (posix_fadvise DONTNEED) so the converter reads from disk.

Then `python -m glm41v_convert.main SRC DST --no-progress` runs in a subprocess; its peak RSS comes from
os.wait4's rusage (that child only), throughput = source bytes / wall time. The converter's own time spent on the
per-array CRC-32 (`checksum_seconds` in DST/glm41v_jax.json, measured around each zlib.crc32 call while the
previous write is in flight) is reported against the conversion's wall time, and `glm41v verify DST` is timed in
another subprocess. Everything is deleted afterwards.

    python benchmarks/convert_memory.py --layers 2 4 8 --workdir /tmp/convbench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
from common import print_table

from glm41v_jax.config import GLM41V_9B
from glm41v_jax.weights import build_rules

BLOCK = 64 << 20  # random block repeated to fill tensors


def synthetic_config(layers: int, vision_depth: int | None = None) -> dict:
    cfg = dataclasses.replace(
        GLM41V_9B,
        text=dataclasses.replace(GLM41V_9B.text, num_hidden_layers=layers),
        vision=dataclasses.replace(GLM41V_9B.vision, depth=vision_depth or max(1, layers // 2)),
    )
    return cfg.to_hf()


def _fill(f, nbytes: int, block: bytes) -> None:
    while nbytes > 0:
        n = min(nbytes, len(block))
        f.write(block[:n])
        nbytes -= n


def write_checkpoint(directory: str, cfg_dict: dict, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Sharded bf16 safetensors with every tensor of the config. Returns (total bytes, number of shards)."""
    from glm41v_jax.config import Glm4vConfig

    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    rules = build_rules(Glm4vConfig.from_hf(cfg_dict))
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, rule in rules.items():
        nbytes = int(np.prod(rule.hf_shape)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, rule.hf_shape, nbytes))
        size += nbytes
    block = np.random.default_rng(seed).bytes(BLOCK)
    weight_map, total = {}, 0
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        path = os.path.join(directory, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            _fill(f, off, block)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        total += off
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total, n


def run_converter(src: str, dst: str, extra: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of one converter subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "glm41v_convert.main", src, dst, "--no-progress", *extra], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 2**20, proc.returncode  # ru_maxrss is KiB on Linux


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--vision-depth", type=int, default=None,
                    help="vision blocks (default L // 2); 24 with --layers 40 is the full released model")
    ap.add_argument("--workdir", default="/tmp/glm41v_convbench")
    ap.add_argument("--dtype", default=None, help="passed to the converter (default: keep bf16)")
    ap.add_argument("--flush-gb", type=float, default=None, help="passed to the converter")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    extra = (["--dtype", args.dtype] if args.dtype else []) + (["--flush-gb", str(args.flush_gb)]
                                                                if args.flush_gb else [])
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for layers in args.layers:
        src, dst = os.path.join(args.workdir, f"hf-{layers}"), os.path.join(args.workdir, f"orbax-{layers}")
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            hf_cfg = synthetic_config(layers, args.vision_depth)
            total, n_shards = write_checkpoint(src, hf_cfg, int(args.shard_gb * 2**30))
            t_write = time.perf_counter() - t0
            wall, rss, rc = run_converter(src, dst, extra)
            if rc != 0:
                raise SystemExit(f"converter failed with exit code {rc} for {layers} layers")
            out = du(os.path.join(dst, "params"))
            with open(os.path.join(dst, "glm41v_jax.json")) as f:
                crc_s = json.load(f)["checksum_seconds"]
            t0 = time.perf_counter()
            verify = subprocess.run([sys.executable, "-m", "glm41v_jax.cli", "verify", dst],
                                    env=dict(os.environ, JAX_PLATFORMS="cpu"))
            verify_s = time.perf_counter() - t0
            if verify.returncode != 0:
                raise SystemExit(f"glm41v verify failed with exit code {verify.returncode} for {layers} layers")
            rows.append(dict(text_layers=layers, vision_blocks=hf_cfg["vision_config"]["depth"], shards=n_shards,
                             source_gb=total / 1e9, output_gb=out / 1e9, write_s=t_write, convert_s=wall,
                             gb_per_s=total / 1e9 / wall, peak_rss_gib=rss, checksum_s=crc_s,
                             checksum_pct=100 * crc_s / wall, verify_s=verify_s))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
    print()
    print_table([("text layers", "{text_layers}"), ("vision blocks", "{vision_blocks}"), ("shards", "{shards}"),
                 ("source GB", "{source_gb:.2f}"), ("output GB", "{output_gb:.2f}"), ("convert s", "{convert_s:.1f}"),
                 ("GB/s", "{gb_per_s:.2f}"), ("peak RSS GiB", "{peak_rss_gib:.2f}"), ("CRC-32 s", "{checksum_s:.2f}"),
                 ("CRC-32 % of convert", "{checksum_pct:.1f}"), ("verify s", "{verify_s:.1f}")], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
