"""The real programs of the real 9B config (40 + 24 layers, vocab 151552, bf16) compiled by the TPU compiler (libtpu)
for Cloud TPU topologies, on this CPU machine: no TPU, no weights (abstract inputs with shardings).

  * the Engine's prefill and decode on a v5e-8, `auto` attention, on a tensor-parallel and an fsdp x tensor mesh:
    the splash kernel is in the compiled prefill (it must run under shard_map to be partitioned at all) and the
    per-chip memory is below the chip's HBM;
The train configs' steps are compiled in test_tpu_train.py and `glm41v plan`'s generation plans for one v5e chip in
test_tpu_generate_plans.py: separate files, so that pytest-xdist (`--dist loadfile`) runs the three on different
workers. Each program is compiled once per module (fixtures).
"""

from __future__ import annotations

import re

import jax
import pytest

from glm41v_jax.backend import AUTO_CACHE_MIN_ROWS
from glm41v_jax.generate import Engine
from glm41v_jax.plan import memory_figures, model_config, parse_tpu, topology_devices
from glm41v_jax.sharding import make_mesh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["tensor=8", "fsdp=2,tensor=4"])
def engine_programs(request):
    """(mesh spec, TpuType, [(kind, compiled, seconds)]) of the 9B Engine on a v5e-8: batch 8, a 1024-token text
    prompt, 128 new tokens (an image would add the 24 unrolled vision blocks: minutes of compile on 2 cores)."""
    tpu = parse_tpu("v5e-8")
    cfg = model_config(None, "9b").with_runtime(compute_dtype="bfloat16", param_dtype="bfloat16", attention_impl="auto")
    eng = Engine(None, cfg, mesh=make_mesh(request.param, topology_devices(tpu)), max_context=2048)
    eng.warmup([{"batch": 8, "prompt_tokens": 1024, "max_new_tokens": 128}])
    return request.param, tpu, eng.programs()


def _by_kind(programs):
    return {kind: exe for kind, exe, _ in programs}


def test_engine_prefill_runs_the_splash_kernel(engine_programs):
    mesh, _, programs = engine_programs
    kinds = [k for k, _, _ in programs]
    assert sorted(kinds) == ["decode", "prefill"], kinds
    text = _by_kind(programs)["prefill"].as_text()
    assert "tpu_custom_call" in text, f"{mesh}: no Mosaic kernel in the compiled prefill"
    assert "splash" in text.lower(), f"{mesh}: the compiled prefill has a Mosaic kernel but not splash attention"


def test_kv_cache_is_never_re_laid_out_between_prefill_and_decode(engine_programs):
    """With 8 cache rows per chip (tensor=8, batch 8) the decode loop takes its KV cache in the layout the TPU
    compiler chose for it ((S, K, B, H)-major, not row-major), decode is compiled first, the prefill writes exactly
    that layout, and the decode chunk's entry copies no cache: it once copied every layer's cache into the loop's
    layout and back per chunk (10.6 GiB at 8k context). With fewer rows per chip (fsdp=2,tensor=4: 4) the cache
    stays row-major (`backend.AUTO_CACHE_MIN_ROWS`), prefill first, and the entry copies no cache either."""
    mesh, _, programs = engine_programs
    kinds = [k for k, _, _ in programs]
    decode, prefill = _by_kind(programs)["decode"], _by_kind(programs)["prefill"]
    dec_in = jax.tree.leaves(decode.input_formats[0][1].cache)
    pre_out = jax.tree.leaves(prefill.output_formats.cache)
    assert len(dec_in) == len(pre_out) == 2 * 40
    assert all(a.layout == b.layout for a, b in zip(dec_in, pre_out, strict=True)), (dec_in[0], pre_out[0])
    assert decode.output_formats[0].cache == decode.input_formats[0][1].cache  # donated in place
    shard_shape = dec_in[0].sharding.shard_shape((8, 2, 2048, 128))
    if shard_shape[0] >= AUTO_CACHE_MIN_ROWS:
        assert kinds == ["decode", "prefill"], kinds  # decode chooses the layout the prefill writes
        assert dec_in[0].layout.major_to_minor != (0, 1, 2, 3), f"{mesh}: the compiler kept row-major"
    else:
        assert kinds == ["prefill", "decode"], kinds
        assert dec_in[0].layout.major_to_minor == (0, 1, 2, 3), f"{mesh}: {dec_in[0].layout}"
    text = decode.as_text()
    entry = text[text.index("\nENTRY "):]
    entry = entry[: entry.index("\n}\n")]
    shard = ",".join(map(str, shard_shape))
    moves = [ln for ln in entry.splitlines() if f"bf16[{shard}]" in ln and re.search(r" (copy|copy-start)\(", ln)]
    assert not moves, f"{mesh}: the decode entry copies {len(moves)} cache arrays, e.g. {moves[0][:160]}"


def test_engine_memory_below_hbm(engine_programs):
    mesh, tpu, programs = engine_programs
    for kind, exe, _ in programs:
        m = memory_figures(exe)
        # 9B bf16 weights over 8 chips are ~2.4 GiB per chip: every program holds at least its share
        assert 2 * 2**30 < m["total_bytes"] < tpu.spec.hbm_bytes, (mesh, kind, m)
