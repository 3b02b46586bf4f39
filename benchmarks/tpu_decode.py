"""Decode efficiency on TPU from the TPU compiler (libtpu; no TPU needed): per-chip HBM bytes of one compiled decode
step of the real 9B (bf16, layers unrolled, the Engine's own step and shardings, cache donated) against the
analytic minimum (every text weight and the lm_head read once, B embedding rows, the KV cache read once), with the
calibrated reading of `glm41v_jax.tpu_cost` and the compiler's raw "bytes accessed". First the calibration
programs (known minimum), then the decode cases.

    python benchmarks/tpu_decode.py [--tpu v5e:2x4] [--cases tensor:1:1024 tensor:8:8192 fsdp:1:1024 ...]
                                    [--layouts in_out out_in] [--layers N] [--json]

A case is MESH:BATCH:CONTEXT with MESH = tensor (1x1x8) or fsdp (1x8x1) on the 8 chips. `--layers N` compiles a
shorter model (same widths) for quick iterations. About 1-4 minutes per 9B case on 2 loaded cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile next to other libtpu users (tests, plan)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import print_table  # noqa: E402

from glm41v_jax import tpu_cost  # noqa: E402
from glm41v_jax.plan import model_config  # noqa: E402

GIB = 2**30
MESHES = {"tensor": (1, 1, 8), "fsdp": (1, 8, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tpu", default="v5e:2x4", help="topology with 8 chips on one host")
    ap.add_argument("--cases", nargs="+", default=["tensor:1:1024", "tensor:8:8192", "fsdp:1:1024", "fsdp:8:8192"])
    ap.add_argument("--layouts", nargs="+", default=["in_out"], choices=["in_out", "out_in"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 9B's 40)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of tables")
    args = ap.parse_args(argv)

    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=args.tpu, platform="tpu", chips_per_host_bounds=(2, 4, 1))
    devices = np.asarray(topo.devices)
    cal_rows = []
    mesh = jax.sharding.Mesh(devices.reshape(MESHES["tensor"]), ("data", "fsdp", "tensor"))
    for name, (compiled, minimum) in tpu_cost.calibration_programs(mesh).items():
        cal_rows.append({"program": name, "min": minimum / 2**20, "compiler": tpu_cost.compiler_bytes(compiled) / 2**20,
                         "calibrated": tpu_cost.calibrated_bytes(compiled) / 2**20})
    cfg = model_config(config="9b").with_runtime(compute_dtype="bfloat16", param_dtype="bfloat16")
    if args.layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
    rows = []
    for case in args.cases:
        mesh_name, batch, context = case.split(":")
        mesh = jax.sharding.Mesh(devices.reshape(MESHES[mesh_name]), ("data", "fsdp", "tensor"))
        for layout in args.layouts:
            t0 = time.perf_counter()
            compiled, mins = tpu_cost.decode_step(cfg, mesh, int(batch), int(context), layout)
            cal = tpu_cost.calibrated_bytes(compiled)
            row = {"mesh": f"{mesh_name}=8", "batch": int(batch), "context": int(context), "layout": layout,
                   "compile_s": time.perf_counter() - t0, "compiler": tpu_cost.compiler_bytes(compiled) / GIB,
                   "calibrated": cal / GIB, "min": mins["minimum_bytes"] / GIB, "params": mins["params_bytes"] / GIB,
                   "kv": mins["kv_cache_bytes"] / GIB, "ratio": mins["minimum_bytes"] / cal}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        for r in cal_rows:
            print(json.dumps(r))
        return
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__}, TPU compiler for {args.tpu}, "
          f"{cfg.text.num_hidden_layers} decoder layers, bf16")
    print_table([("program", "{program}"), ("minimum MiB", "{min:.2f}"), ("compiler 'bytes accessed' MiB",
                 "{compiler:.2f}"), ("calibrated MiB", "{calibrated:.2f}")], cal_rows, left=1)
    print()
    print_table([("mesh", "{mesh}"), ("batch", "{batch}"), ("context", "{context}"), ("layout", "{layout}"),
                 ("compiler GiB", "{compiler:.2f}"), ("calibrated GiB", "{calibrated:.3f}"),
                 ("minimum GiB", "{min:.3f}"), ("(weights + KV)", "{params:.2f} + {kv:.2f}"),
                 ("ratio", "{ratio:.3f}"), ("compile s", "{compile_s:.0f}")], rows, left=1)


if __name__ == "__main__":
    sys.exit(main())
