"""`glm41v plan`: Cloud TPU names, bad input (one error line, exit 2), the JSON report on a tiny config compiled by
the real TPU compiler (libtpu) for a small topology. The real 9B programs are compiled in test_tpu_compile.py,
test_tpu_train.py and test_tpu_generate_plans.py."""

from __future__ import annotations

import json
import os

import pytest

from glm41v_jax.cli import main
from glm41v_jax.compiled_figures import parse_oom
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.plan import model_config, parse_image_size
from glm41v_jax.tiny import tiny_hf_config
from glm41v_jax.tpu_slices import PlanError, parse_tpu


@pytest.mark.parametrize("name, family, chips, hosts, topology, bounds", [
    ("v5e-1", "v5e", 1, 1, "v5e:1x1", (1, 1, 1)),
    ("v5e-8", "v5e", 8, 1, "v5e:2x4", (2, 4, 1)),
    ("v5litepod-16", "v5e", 16, 4, "v5e:4x4", None),
    ("V5E-256", "v5e", 256, 64, "v5e:16x16", None),
    ("v6e-4", "v6e", 4, 1, "v6e:2x2", (2, 2, 1)),
    ("v5p-8", "v5p", 4, 1, "v5p:2x2x1", (2, 2, 1)),  # v5p names count TensorCores: 2 per chip
    ("v5p-16", "v5p", 8, 2, "v5p:2x2x2", None),
    ("v5p-64", "v5p", 32, 8, "v5p:2x4x4", None),
    ("v4-32", "v4", 16, 4, "v4:2x2x4", None),
])
def test_parse_tpu(name, family, chips, hosts, topology, bounds):
    t = parse_tpu(name)
    assert (t.family, t.chips, t.hosts, t.topology, t.chips_per_host_bounds) == (family, chips, hosts, topology,
                                                                                  bounds)


def test_tpu_figures():
    assert parse_tpu("v5e-8").spec.hbm_bytes == 16 * 2**30
    assert parse_tpu("v6e-1").spec.peak_flops == 918e12
    assert parse_tpu("v5p-8").spec.hbm_bandwidth == 2765e9


@pytest.mark.parametrize("name", ["v5e-3", "v5e-0", "v5p-7", "v5p-6", "v7-8", "tpu", "", "v5e", "v5e-8x", "v4-1"])
def test_parse_tpu_rejects(name):
    with pytest.raises(PlanError, match="--tpu"):
        parse_tpu(name)


def test_parse_oom():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (18.17G) "
           "exceeds available HBM (15.75G).")
    got = parse_oom(msg)
    assert got["required_bytes"] == int(18.17 * 2**30) and got["available_bytes"] == int(15.75 * 2**30)
    got = parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                    "Used 19.51G of 15.75G hbm. 19.51G exceeds available HBM (15.75G).")
    assert got["required_bytes"] == int(19.51 * 2**30)
    assert parse_oom("INVALID_ARGUMENT: something else") is None


def test_model_config_builtin_is_the_published_9b():
    cfg = model_config(None, "9b")
    assert cfg == Glm4vConfig()  # the dataclass defaults are the released shapes (checked in test_components)
    with pytest.raises(PlanError, match="--config"):
        model_config(None, "13b")


def test_parse_image_size():
    assert parse_image_size("1280x720") == (1280, 720)
    for bad in ("1280", "0x10", "axb", "12x-3"):
        with pytest.raises(PlanError, match="--image"):
            parse_image_size(bad)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("plan") / "tiny model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_hf_config()))
    return str(d)


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "--tpu", "v9-8", "generate"], "unknown TPU type"),
    (["plan", "--tpu", "v5e-6", "generate"], "not a v5e slice"),
    (["plan", "generate"], "--tpu is required"),
    (["plan", "--tpu", "v5e-8", "--mesh", "tensor=3", "generate"], "--mesh"),
    (["plan", "--tpu", "v5e-8", "generate", "--mesh", "data=2,tensor=2"], "--mesh"),
    (["plan", "--tpu", "v5e-8", "generate", "--batch", "0"], "--batch"),
    (["plan", "--tpu", "v5e-8", "generate", "--max-context", "100", "--max-new-tokens", "100"], "--max-new-tokens"),
    (["plan", "--tpu", "v5e-8", "generate", "--image", "big"], "--image"),
    (["plan", "--tpu", "v5e-8", "--config", "70b", "generate"], "--config"),
])
def test_bad_input_one_error_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert main(["plan", "--tpu", "v5e-8", "--model", str(bad), "generate"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["plan", "--tpu", "v5e-8", "--model", str(tmp_path / "missing"), "generate"]) == 2
    assert "config file not found" in capsys.readouterr().err
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("data: {seq_len: -4}\n")
    assert main(["plan", "--tpu", "v5e-8", "train", "--config", str(yaml_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "seq_len" in err


def test_train_mesh_must_use_the_slice(tmp_path, capsys):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("model: tiny\noutput_dir: out\nsteps: 4\nmesh: fsdp=8\n"
                         "data: {jsonl: x.jsonl, seq_len: 128, batch_size: 8, max_patches: 64}\n")
    assert main(["plan", "--tpu", "v5e-16", "train", "--config", str(yaml_path)]) == 2
    assert "--mesh" in capsys.readouterr().err


def test_generate_json_on_a_small_topology(tiny_model, capsys, monkeypatch, tmp_path):
    """Tiny config, v5e-4 (tensor=4 over the 4 query heads): the JSON object's keys and figures that can be checked
    without the compiler (the KV cache per chip: 2 KV heads cannot split 4 ways, so every chip holds all)."""
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(tiny_model, tmp_path)  # a relative path with a space, as a user types it
    code = main(["plan", "--tpu", "v5e-4", "--model", rel, "--json", "generate", "--batch", "2", "--max-context",
                 "256", "--max-new-tokens", "32"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    assert (out["tpu"], out["chips"], out["hosts"], out["mesh"]) == ("v5e-4", 4, 1, "tensor=4")
    pc = out["per_chip"]
    assert set(pc) >= {"params_bytes", "opt_state_bytes", "kv_cache_bytes", "temp_bytes", "total_bytes", "hbm_bytes"}
    t = Glm4vConfig.from_hf(tiny_hf_config()).text
    slots = out["bucket"]["cache_slots"]
    assert slots == 256
    assert pc["kv_cache_bytes"] == 2 * t.num_hidden_layers * 2 * slots * t.num_key_value_heads * t.head_dim * 2
    assert pc["hbm_bytes"] == 16 * 2**30 and pc["opt_state_bytes"] == 0
    assert pc["total_bytes"] >= pc["params_bytes"] + pc["kv_cache_bytes"]  # decode holds both as arguments
    names = [p["name"] for p in out["programs"]]
    assert names == ["prefill", "decode"]  # 2 rows: row-major cache (from 8 rows per chip decode is compiled first)
    for p in out["programs"]:
        assert p["compile_s"] > 0 and p["flops"] > 0 and p["bytes_accessed"] > 0
    dec = next(p for p in out["programs"] if p["name"] == "decode")
    split = dec["hbm_bytes_split"]
    assert split["entry"] + split["loops"] == pytest.approx(dec["hbm_bytes"])
    # one step: the loop body + the chunk's entry over its 16 steps (the tiny weights are prefetched on chip once
    # per chunk by the entry, so the body reads less than the minimum: the ratio is above 1 here)
    assert dec["hbm_bytes_per_step"] == pytest.approx(split["loops"] + split["entry"] / 16)
    assert out["efficiency"]["decode_bytes_ratio"] == pytest.approx(
        out["analytic"]["decode_min_bytes_per_chip"] / dec["hbm_bytes_per_step"])
    ro = out["roofline"]
    bw = 819e9
    assert ro["decode_tokens_per_s_bound"] == pytest.approx(2 * bw / out["analytic"]["decode_min_bytes_per_chip"])


@pytest.mark.slow
def test_train_json_two_hosts(tiny_model, tmp_path, capsys):
    """The train step of a tiny config on a 2-host v5p-16 (8 chips, data=2 x fsdp=4), accumulation over 2
    micro-batches; no per-layer FLOPs count (that compiles two more programs;
    test_train_layer_flops_count_on_a_tiny_config covers it)."""
    yaml_path = tmp_path / "tiny train.yaml"
    yaml_path.write_text("model: tiny\noutput_dir: out\nsteps: 4\nmesh: data=2,fsdp=-1\n"
                         "data: {jsonl: x.jsonl, seq_len: 128, batch_size: 4, max_patches: 64}\n"
                         "optim: {freeze: [vision]}\n"
                         "step: {accum_steps: 2, compute_dtype: bfloat16}\n")
    code = main(["plan", "--tpu", "v5p-16", "--model", tiny_model, "train", "--config", str(yaml_path), "--json",
                 "--no-flops-count", "--step-time", "2"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] and (out["chips"], out["hosts"], out["devices"]) == (8, 2, 8)
    assert out["step"]["global_rows"] == 8 and out["step"]["tokens_per_step"] == 8 * 128 * 2
    assert out["per_chip"]["opt_state_bytes"] > out["per_chip"]["params_bytes"] > 0  # two fp32 moments
    assert [p["name"] for p in out["programs"]] == ["train_step"]
    ro = out["roofline"]
    assert ro["mfu_at_step_time"] == pytest.approx(ro["step_s_at_peak"] / 2)
    assert out["efficiency"] == {"flops_ratio": None}


@pytest.mark.slow
def test_train_layer_flops_count_on_a_tiny_config(tiny_model, tmp_path, capsys):
    """The per-layer FLOPs count (two unrolled steps at 1 and 2 decoder layers, their difference) on a tiny config
    and a v5e-8, against what this test computes from the config: with full remat one decoder layer compiles to
    8 x its kernel parameters x tokens (forward 2, recomputed forward 2, backward 4) plus its attention, which at
    head_dim 16 runs in XLA (the splash kernel needs multiples of 128): 16 N H T S per row (QK^T and PV: 4 N H T S
    forward, as much recomputed, twice that backward). The elementwise work (softmax, norms, RoPE) is the rest."""
    yaml_path = tmp_path / "tiny train.yaml"
    yaml_path.write_text("model: tiny\noutput_dir: out\nsteps: 4\nmesh: fsdp=8\n"
                         "data: {jsonl: x.jsonl, seq_len: 256, batch_size: 8, max_patches: 64}\n"
                         "optim: {freeze: [vision]}\n"
                         "step: {accum_steps: 1, remat_policy: full, compute_dtype: bfloat16}\n")
    code = main(["plan", "--tpu", "v5e-8", "--model", tiny_model, "train", "--config", str(yaml_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out
    assert [p["name"] for p in out["programs"]] == ["train_step", "train_step_unrolled_1_layer",
                                                     "train_step_unrolled_2_layer"]
    t = Glm4vConfig.from_hf(tiny_hf_config()).text
    d, n, k, h, f = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
    layer_params = d * n * h + 2 * d * k * h + n * h * d + d * 2 * f + f * d
    rows = out["step"]["global_rows"]
    expected = 8 * layer_params * rows * 256 + 16 * n * h * 256 * 256 * rows
    ef = out["efficiency"]
    assert ef["layer_compiled_flops"] == pytest.approx(expected, rel=0.15), ef
    assert ef["flops_ratio"] == pytest.approx(ef["layer_model_flops"] / ef["layer_compiled_flops"])


LORA_YAML = ("model: tiny\noutput_dir: out\nsteps: 4\nmesh: null\nquantize: int8\n"
             "lora: {rank: 4, alpha: 8, targets: [q_proj, v_proj]}\n"
             "data: {jsonl: x.jsonl, seq_len: 128, batch_size: 2, max_patches: 64}\n"
             "step: {compute_dtype: bfloat16}\n")


@pytest.mark.slow
def test_lora_train_plan_on_a_tiny_config(tiny_model, tmp_path, capsys):
    """A QLoRA config (int8 base, rank-4 adapters on q_proj and v_proj) on one v5e chip: the LoRA step is compiled
    (no per-layer count), its parameters are the int8 base + the adapters, its optimizer state the adapters' two
    fp32 Adam moments (figures from the config's shapes, computed here)."""
    yaml_path = tmp_path / "tiny lora.yaml"
    yaml_path.write_text(LORA_YAML)
    code = main(["plan", "--tpu", "v5e-1", "--model", tiny_model, "train", "--config", str(yaml_path), "--json",
                 "--no-flops-count"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out
    assert [p["name"] for p in out["programs"]] == ["train_step"] and out["programs"][0]["flops"] > 0
    assert out["quantize"]["scheme"] == "int8"
    t = Glm4vConfig.from_hf(tiny_hf_config()).text
    d, n, k, h, L = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.num_hidden_layers
    lo, pc = out["lora"], out["per_chip"]
    adapter_params = L * 4 * ((d + n * h) + (d + k * h))  # A (d, r) and B (r, out) of q_proj and v_proj, r = 4
    assert (lo["rank"], lo["alpha"], lo["modules"], lo["adapter_params"]) == (4, 8, 2 * L, adapter_params)
    assert lo["adapter_bytes_per_chip"] == 4 * adapter_params  # fp32, one chip
    assert 8 * adapter_params <= pc["opt_state_bytes"] < 8 * adapter_params + 1024  # mu, nu (+ counts): no base
    assert pc["params_bytes"] == lo["base_bytes_per_chip"] + lo["adapter_bytes_per_chip"]
    # the base in int8: the lm_head (vocab x hidden) at one byte per weight, not four
    assert lo["base_bytes_per_chip"] <= 4 * lo["base_params"] - 3 * t.vocab_size * d
    assert pc["total_bytes"] >= pc["params_bytes"] + pc["opt_state_bytes"]
    assert "LoRA" in out["analytic"]["note"]


@pytest.mark.parametrize("extra, fragment", [
    (["--quantize", "int4"], "give one"),  # the config quantizes the base already
    (["--set", "lora=null"], "add a lora: section"),  # full-weight training on a quantized base
    (["--set", "lora.rank=0"], "rank"),
])
def test_lora_train_plan_bad_input(tiny_model, tmp_path, capsys, extra, fragment):
    """One error line and exit 2, before anything compiles."""
    yaml_path = tmp_path / "lora.yaml"
    yaml_path.write_text(LORA_YAML)
    assert main(["plan", "--tpu", "v5e-1", "--model", tiny_model, "train", "--config", str(yaml_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
