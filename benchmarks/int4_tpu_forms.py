"""How an int4 `layers.Dense` multiplies on TPU, from the TPU compiler (libtpu; no TPU needed): the HBM bytes of one
compiled Dense (bf16 activations, int4 codes in groups of 128, fp32 group scales) in each form of
`backend.BACKEND_TUNING` "quant_matmul_int4" against its minimum (the codes packed two to a byte, the scales,
the activations in and out), with `tpu_cost.calibrated_bytes`, and the compiler's temporaries. The Dense is the
model's own (`layers.Dense`), the form chosen by patching the TPU row of the table.

    python benchmarks/int4_tpu_forms.py [--tpu v5e-1] [--shape 4096 27392] [--rows 1 8 64 512 4096]

"dequant": the codes times their group scales, then the dot (the form int4 used on TPU before); "grouped": one dot
batched over the groups, the codes converted inside it, the partial sums times the scales (the TPU default up to
layers.INT4_GROUPED_MAX_ROWS["grouped"] rows; above it the Dense runs "dequant" whatever the table says, so rows
above that threshold show "dequant" in both columns). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import print_table  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from glm41v_jax import backend, layers, tpu_cost  # noqa: E402
from glm41v_jax.compiled_figures import device_bytes  # noqa: E402
from glm41v_jax.sharding import under_mesh  # noqa: E402
from glm41v_jax.tpu_slices import parse_tpu, topology_devices  # noqa: E402

GROUP = 128


def compile_dense(mesh: Mesh, how: str, rows: int, d_in: int, d_out: int) -> tuple[float, float, float]:
    """(calibrated HBM bytes, minimum bytes, temporaries) of one int4 Dense compiled for `mesh` in form `how`."""
    dense = layers.Dense((d_out,), ("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quant="int4",
                         quant_group_size=GROUP)
    rep = NamedSharding(mesh, P())
    args = (jax.ShapeDtypeStruct((rows, d_in), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((d_in // GROUP, GROUP, d_out), jnp.int4, sharding=rep),
            jax.ShapeDtypeStruct((d_in // GROUP, d_out), jnp.float32, sharding=rep))
    old = backend.BACKEND_TUNING["tpu"]["quant_matmul_int4"]
    backend.BACKEND_TUNING["tpu"]["quant_matmul_int4"] = how  # read when the Dense is traced
    try:
        fn = under_mesh(lambda x, c, s: dense.apply({"params": {"kernel": c, "scale": s}}, x), mesh)  # platform: tpu
        exe = jax.jit(fn).lower(*args).compile()
    finally:
        backend.BACKEND_TUNING["tpu"]["quant_matmul_int4"] = old
    minimum = sum(device_bytes(a.shape, a.dtype) for a in args) + rows * d_out * 2
    return tpu_cost.calibrated_bytes(exe), minimum, exe.memory_analysis().temp_size_in_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpu", default="v5e-1")
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 27392), metavar=("IN", "OUT"))
    ap.add_argument("--rows", type=int, nargs="+", default=(1, 8, 64, 512, 4096))
    args = ap.parse_args()
    tpu = parse_tpu(args.tpu)
    mesh = Mesh(np.asarray(topology_devices(tpu)[:1]), ("data",))
    d_in, d_out = args.shape
    out = []
    for rows in args.rows:
        r = {"rows": rows}
        for how in ("dequant", "grouped"):
            hbm, minimum, temp = compile_dense(mesh, how, rows, d_in, d_out)
            r.update({f"{how}_mib": hbm / 2**20, f"{how}_ratio": minimum / hbm, f"{how}_temp": temp / 2**20,
                      "min_mib": minimum / 2**20})
        out.append(r)
    print(f"{tpu.name}, one int4 Dense {d_in} -> {d_out} (groups of {GROUP}), bf16 activations; "
          f"jax {jax.__version__}")
    print_table([("rows", "{rows}"), ("minimum MiB", "{min_mib:.1f}"),
                 ("dequant HBM MiB", "{dequant_mib:.1f}"), ("dequant ratio", "{dequant_ratio:.2f}"),
                 ("dequant temp MiB", "{dequant_temp:.0f}"), ("grouped HBM MiB", "{grouped_mib:.1f}"),
                 ("grouped ratio", "{grouped_ratio:.2f}"), ("grouped temp MiB", "{grouped_temp:.0f}")], out)


if __name__ == "__main__":
    main()
