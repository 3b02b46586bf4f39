"""`glm41v plan` for generation on one v5e chip with the TPU compiler (libtpu), at the real 9B shapes, on this CPU
machine: bf16 does not fit (the compiler's figures, exit 1); int8 with an 8k cache and a 1120x1120 image does, and
int4 at a 32k context (the chunked prefill)."""

from __future__ import annotations

import json

import pytest

from glm41v_jax.cli import main
from glm41v_jax.plan import parse_tpu

pytestmark = pytest.mark.slow


def test_bf16_generation_does_not_fit_one_v5e_chip(capsys):
    code = main(["plan", "--tpu", "v5e-1", "generate", "--batch", "1", "--max-context", "4096"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "DOES NOT FIT" in out and "exceeds available HBM" in out and "would fit: more chips: v5e-4" in out, out


def test_int8_9b_fits_one_v5e_chip(capsys):
    """Weight-only int8 (the vision tower quantized too: `--quantize-skip none`) on one 16 GB v5e chip, batch 1, an
    8k cache, one 1120x1120 image: the TPU compiler fits the prefill (4 chunks of 1792 tokens after one vision encode:
    peak ~12.4 GiB; 15.2 GiB in one piece) and decode, and the decode step reads its minimum once."""
    code = main(["plan", "--tpu", "v5e-1", "--json", "generate", "--batch", "1", "--max-context", "8192",
                 "--image", "1120x1120", "--quantize", "int8", "--quantize-skip", "none"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out.get("compile_error")
    assert out["bucket"]["vision_patches"] > 6000
    pc = out["per_chip"]
    assert pc["params_bytes"] < 10.5 * 2**30  # bf16 is 19.17 GiB
    for p in out["programs"]:
        assert p["memory"]["peak_bytes"] < parse_tpu("v5e-1").spec.hbm_bytes * 0.985, (p["name"], p["memory"])
    assert out["efficiency"]["decode_bytes_ratio"] > 0.9


def test_int4_9b_fits_one_v5e_chip_at_32k(capsys):
    """Weight-only int4 on one v5e chip at a 32k context (a 31744-token prompt, 1024 new tokens): the prefill runs in
    16 chunks of 2048 tokens inside one program (`Engine(prefill_chunk=)`, 2048 on TPU), so its temporaries are one
    chunk's (peak ~11.2 GiB); in one piece the prefill needed 19.57 GiB."""
    code = main(["plan", "--tpu", "v5e-1", "--json", "generate", "--batch", "1", "--max-context", "32768",
                 "--quantize", "int4"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out.get("compile_error")
    assert out["bucket"]["prompt_tokens"] == 31744 and out["bucket"]["cache_slots"] == 32768
    assert out["prefill_chunk"] == 2048 and out["prefill_chunk_setting"] == 2048
    pc = out["per_chip"]
    assert pc["params_bytes"] < 7.5 * 2**30 and pc["kv_cache_bytes"] == 1.25 * 2**30
    assert [p["name"] for p in out["programs"]] == ["prefill", "decode"]  # one prefill program for the bucket
    for p in out["programs"]:
        assert p["memory"]["peak_bytes"] < parse_tpu("v5e-1").spec.hbm_bytes * 0.9, (p["name"], p["memory"])
    # int4 decode reads its packed codes once (layers.Dense's "grouped" form; "dequant" materialised each kernel: 0.27)
    assert out["efficiency"]["decode_bytes_ratio"] > 0.9, out["efficiency"]
