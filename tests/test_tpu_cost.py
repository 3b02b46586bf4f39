"""The calibrated HBM-bytes reading (glm41v_jax.tpu_cost) on programs whose minimum is known, compiled by the real
TPU compiler for a v5e-8 topology (libtpu; no TPU needed), and the HLO parsing on hand-written modules."""

from __future__ import annotations

import numpy as np
import pytest

from glm41v_jax import tpu_cost as C

HLO = """HloModule m

%fused_dus (param_0: bf16[8,4096,2,128], param_1: bf16[8,1,2,128], param_2: s32[]) -> bf16[8,4096,2,128] {
  %param_0 = bf16[8,4096,2,128]{3,2,1,0} parameter(0)
  %param_1 = bf16[8,1,2,128]{3,2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = bf16[8,4096,2,128]{3,2,1,0} dynamic-update-slice(%param_0, %param_1, %c, %param_2, %c, %c)
}

%fused_rows (param_0.1: bf16[1000,64], param_1.1: s32[]) -> bf16[1,64] {
  %param_0.1 = bf16[1000,64]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,64]{1,0} dynamic-slice(%param_0.1, %param_1.1, %z), dynamic_slice_sizes={1,64}
}

ENTRY %main (p0: bf16[8,4096,2,128], p1: bf16[8,1,2,128], p2: s32[], p3: bf16[1000,64], p4: bf16[64,64]) -> bf16[8] {
  %p0 = bf16[8,4096,2,128]{3,2,1,0} parameter(0)
  %p1 = bf16[8,1,2,128]{3,2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %p3 = bf16[1000,64]{1,0} parameter(3)
  %p4 = bf16[64,64]{1,0} parameter(4)
  %row = bf16[1,64]{1,0} fusion(%p3, %p2), kind=kLoop, calls=%fused_rows
  %cs = (bf16[64,64]{1,0:S(1)}, bf16[64,64]{1,0}, u32[]{:S(2)}) copy-start(%p4)
  %cd = bf16[64,64]{1,0:S(1)} copy-done(%cs)
  %dot = bf16[1,64]{1,0} dot(%row, %cd), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %upd = bf16[8,4096,2,128]{3,2,1,0} fusion(%p0, %p1, %p2), kind=kLoop, calls=%fused_dus
}
"""


def test_hbm_bytes_of_a_hand_written_module():
    """In-place cache write: the slot only; embedding row: the row only; a prefetch into on-chip memory (S(1)):
    its HBM read once, the on-chip copy free."""
    slot = 8 * 1 * 2 * 128 * 2
    row = 64 * 2
    w = 64 * 64 * 2
    dot = row + 0 + row  # reads the row (HBM) and the on-chip copy (free), writes one row
    expected = (row + 4 + row) + w + dot + (slot + 4 + slot)
    assert C.hbm_bytes(HLO) == expected


@pytest.fixture(scope="module")
def v5e8_mesh():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with jax[tpu] (the test extra)")
    import jax
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu", chips_per_host_bounds=(2, 4, 1))
    return jax.sharding.Mesh(np.asarray(topo.devices).reshape(1, 1, 8), ("data", "fsdp", "tensor"))


def test_calibrated_bytes_meet_the_known_minimum(v5e8_mesh):
    """Weight-streaming GEMVs, an MLP, a donated cache write: the calibrated count is the minimum (+1%), while
    the compiler's 'bytes accessed' counts the on-chip prefetch copies (5x at batch 8, 3x for the MLP)."""
    progs = C.calibration_programs(v5e8_mesh)
    for name in ("gemv x@W, batch 1", "tanh(x@W), batch 8", "tanh(x@W1)@W2, batch 1", "cache write, 1 slot (donated)"):
        compiled, minimum = progs[name]
        got = C.calibrated_bytes(compiled)
        assert minimum <= got * 1.001 and got <= minimum * 1.01 + 4096, (name, got, minimum)
    compiled, minimum = progs["tanh(x@W), batch 8"]
    assert C.compiler_bytes(compiled) > 3 * minimum


def test_entry_and_loop_bytes_are_split(v5e8_mesh):
    """A loop over a donated (8, 1024) f32 buffer that adds a row per iteration: the entry moves nothing of it,
    the body is counted once; `calibrated_bytes` is their sum."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep = NamedSharding(v5e8_mesh, P())

    def f(buf, w):
        return jax.lax.fori_loop(0, 16, lambda i, b: jnp.tanh(b @ w), buf)

    buf = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16, sharding=rep)
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=rep)
    compiled = jax.jit(f, donate_argnums=(0,)).lower(buf, w).compile()
    split = C.calibrated_split(compiled)
    assert split["entry"] + split["loops"] == pytest.approx(C.calibrated_bytes(compiled))
    wbytes = 4096 * 4096 * 2
    assert wbytes <= split["loops"] <= 1.1 * wbytes, split  # each iteration streams w once
    assert split["entry"] < 0.1 * wbytes, split


def test_kv_read_fraction_counts_the_kv_heads_each_device_uses():
    """9B: 32 query heads, 2 kv heads. On tensor=8 or 4 the 2 kv heads are replicated (they do not divide), but a
    device's 4 or 8 query heads all use one of them; tensor=2 splits the kv heads; tensor=1 reads both."""
    from types import SimpleNamespace

    from glm41v_jax.config import Glm4vConfig

    cfg = Glm4vConfig()
    got = {t: C.kv_read_fraction(cfg, SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": t})) for t in (1, 2, 4, 8)}
    assert got == {1: 1.0, 2: 1.0, 4: 0.5, 8: 0.5}, got


def test_decode_minimum_counts_int4_codes_at_half_a_byte():
    """The decode floor reads int4 codes packed (half a byte each, as the TPU holds them; numpy's int4 itemsize is
    1), int8 codes at a byte, fp32 scales at 4, B rows of the embedding, the KV cache once."""
    import jax
    import jax.numpy as jnp

    params = {"model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((100, 8), jnp.bfloat16)},
                        "q4": {"kernel": jax.ShapeDtypeStruct((64, 6), jnp.int4),
                               "scale": jax.ShapeDtypeStruct((2, 6), jnp.float32)},
                        "q8": {"kernel": jax.ShapeDtypeStruct((64, 6), jnp.int8),
                               "scale": jax.ShapeDtypeStruct((6,), jnp.float32)}},
              "visual": {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}}
    cache = {"k": jax.ShapeDtypeStruct((2, 1, 16, 8), jnp.bfloat16)}
    got = C.decode_minimum_bytes(params, cache, {"k": jax.sharding.SingleDeviceSharding(jax.devices()[0])}, batch=3)
    assert got["params_bytes"] == 3 * 8 * 2 + 64 * 6 / 2 + 2 * 6 * 4 + 64 * 6 + 6 * 4, got
    assert got["kv_cache_bytes"] == 2 * 16 * 8 * 2 and got["minimum_bytes"] == got["params_bytes"] + 512, got
