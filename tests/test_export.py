"""glm41v export (issue 14, part 4): converted directory -> HF safetensors shards (byte round trip, transformers
loads it with our logits), a LoRA adapter merged in or written for PEFT (PeftModel gives our logits), a quantized
base only with --dequantize, bad input as one error line with nothing written."""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import reference as R
import torch
from safetensors import safe_open
from transformers import Glm4vForConditionalGeneration

from glm41v_convert.export import export
from glm41v_convert.hf_to_orbax import convert
from glm41v_jax import loading
from glm41v_jax import lora as LO
from glm41v_jax.checkpoint_format import SAFETENSORS_INDEX
from glm41v_jax.config import LoraConfig
from glm41v_jax.inputs import prepare_inputs
from glm41v_jax.model import Glm4v
from glm41v_jax.quant import dequantize_array
from glm41v_jax.quant_checkpoint import LeafQuantizer
from glm41v_jax.weights import build_rules, get_path

peft = pytest.importorskip("peft", reason="peft is in the test extra")

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "attn.qkv")
RANK, ALPHA = 4, 8.0
SHARD = 150_000  # bytes: the tiny model (~1 MB in fp32) in several shards
TOL = 1e-4  # test_model_parity's logits tolerance


def _read_dir(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of an HF checkpoint dir (single file or shards + index) and the file each one is in."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(directory, "model.safetensors"), framework="np") as f:
            where = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
    out = {}
    for fname in sorted(set(where.values())):
        with safe_open(os.path.join(directory, fname), framework="np") as f:
            for k in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                out[k] = f.get_tensor(k)
    return out, where


def _header_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__")


def _prompts(cfg) -> list[dict]:
    rng = np.random.default_rng(2)
    pd = cfg.vision.patch_dim
    return [R.build_prompt(rng, images=[(1, 4, 6), (1, 2, 2)], patch_dim=pd), R.build_prompt(rng, n_text=9)]


def _hf_logits(model, case: dict) -> np.ndarray:
    kw = R.to_torch(case)
    kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(case["input_ids"]))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def _our_logits(cfg, variables: dict, case: dict) -> np.ndarray:
    return np.asarray(Glm4v(cfg).apply(variables, **prepare_inputs(cfg, **case).as_kwargs()))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"fp32" | "bf16": (HF dir, converted dir)} of one tiny random model, and the transformers model."""
    root = tmp_path_factory.mktemp("export")
    hf = R.write_checkpoint(str(root / "hf32"), R.hf_config_dict("a"), seed=3)
    out = {"fp32": (str(root / "hf32"), convert(str(root / "hf32"), str(root / "conv32"), progress=False))}
    R.write_checkpoint(str(root / "hf16"), R.hf_config_dict("a"), seed=3)
    m16 = Glm4vForConditionalGeneration.from_pretrained(str(root / "hf32")).to(torch.bfloat16)
    m16.save_pretrained(str(root / "hf16"))
    out["bf16"] = (str(root / "hf16"), convert(str(root / "hf16"), str(root / "conv16"), progress=False))
    return out, hf


@pytest.fixture(scope="module")
def adapter(ckpts, tmp_path_factory):
    """(adapter dir trained on the fp32 converted dir, our cfg with LoRA, base params, adapters): nonzero B."""
    conv = ckpts[0]["fp32"][1]
    params, cfg = loading.load(conv, as_numpy=True)
    lcfg = LO.with_lora(cfg, LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
    rng = np.random.default_rng(11)
    tensors = {}
    for m in LO.targeted(lcfg):
        i, o = int(np.prod(m.in_shape)), int(np.prod(m.out_shape))
        tensors[m.hf_name] = (rng.uniform(-1, 1, (RANK, i)).astype(np.float32) / np.sqrt(i),
                              rng.standard_normal((o, RANK)).astype(np.float32) / np.sqrt(RANK))
    adapters = LO.adapters_from_hf(tensors, lcfg)
    d = str(tmp_path_factory.mktemp("adapter") / "final")
    LO.save_adapters(d, adapters, lcfg, LO.base_identity(params, cfg), model=conv)
    return d, lcfg, params, adapters


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_round_trip_is_byte_identical(ckpts, kind, tmp_path):
    hf_dir, conv = ckpts[0][kind]
    dst = export(conv, str(tmp_path / "out"), shard_bytes=SHARD)
    want, _ = _read_dir(hf_dir)
    got, where = _read_dir(dst)
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        assert got[name].tobytes() == a.tobytes(), name
    shards = sorted(set(where.values()))
    assert len(shards) > 2 and shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                          for k in range(1, len(shards) + 1)]
    for s in shards:
        assert _header_metadata(os.path.join(dst, s)) == {"format": "pt"}
        held = [want[n].nbytes for n, f in where.items() if f == s]
        assert sum(held) <= SHARD or len(held) == 1, (s, held)  # a larger tensor has a shard of its own
    with open(os.path.join(dst, SAFETENSORS_INDEX)) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json"):
        with open(os.path.join(hf_dir, name), "rb") as f, open(os.path.join(dst, name), "rb") as g:
            assert f.read() == g.read(), name
    assert not glob.glob(dst + ".tmp-*") and not os.path.exists(dst + ".lock")


def test_bf16_export_of_fp32_rounds_like_torch(ckpts, tmp_path):
    hf_dir, conv = ckpts[0]["fp32"]
    dst = export(conv, str(tmp_path / "bf16"), dtype="bfloat16")
    want, _ = _read_dir(hf_dir)
    got, _ = _read_dir(dst)
    for name, a in want.items():
        t = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name].view(np.uint16), t, err_msg=name)
    with open(os.path.join(dst, "config.json")) as f:
        conf = json.load(f)
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"


def test_export_loads_in_transformers_with_our_logits(ckpts, tmp_path):
    conv = ckpts[0]["fp32"][1]
    dst = export(conv, str(tmp_path / "out"), shard_bytes=SHARD)
    model = Glm4vForConditionalGeneration.from_pretrained(dst).eval()
    assert next(model.parameters()).dtype == torch.float32
    params, cfg = loading.load(conv, as_numpy=True)
    for case in _prompts(cfg):
        np.testing.assert_allclose(_our_logits(cfg, {"params": params}, case), _hf_logits(model, case), atol=TOL,
                                   rtol=0)


def test_merged_export_gives_our_logits_with_the_adapter(ckpts, adapter, run_cli, tmp_path):
    conv = ckpts[0]["fp32"][1]
    ad_dir, lcfg, params, adapters = adapter
    dst = str(tmp_path / "merged")
    rc, out, err = run_cli("export", conv, dst, "--adapter", ad_dir, "--merge", "--shard-gb", str(SHARD / 1e9))
    assert rc == 0 and out == "" and "error" not in err and "warning" not in err, err
    assert len(set(_read_dir(dst)[1].values())) > 2
    model = Glm4vForConditionalGeneration.from_pretrained(dst).eval()
    base = Glm4vForConditionalGeneration.from_pretrained(ckpts[0]["fp32"][0]).eval()
    for case in _prompts(lcfg):
        want = _our_logits(lcfg, {"params": params, "lora": adapters}, case)
        got = _hf_logits(model, case)
        assert np.abs(got - _hf_logits(base, case)).max() > 0.1  # the adapter changes the output
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the untargeted tensors are the base's, byte for byte
    src, _ = _read_dir(ckpts[0]["fp32"][0])
    out, _ = _read_dir(dst)
    targeted = {m.hf_name + ".weight" for m in LO.targeted(lcfg)}
    assert targeted and all((out[n].tobytes() == a.tobytes()) == (n not in targeted) for n, a in src.items())


def test_peft_export_loads_with_peft_and_gives_our_logits(ckpts, adapter, tmp_path):
    hf_dir, conv = ckpts[0]["fp32"]
    ad_dir, lcfg, params, adapters = adapter
    dst = export(conv, str(tmp_path / "peft"), adapter=ad_dir, peft=True)
    assert sorted(os.listdir(dst)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(dst, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["base_model_name_or_path"] == hf_dir and conf["r"] == RANK and conf["lora_alpha"] == ALPHA
    base = Glm4vForConditionalGeneration.from_pretrained(hf_dir).eval()
    pm = peft.PeftModel.from_pretrained(base, dst).eval()
    wrapped = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {m.hf_name for m in LO.targeted(lcfg)}
    for case in _prompts(lcfg):
        want = _our_logits(lcfg, {"params": params, "lora": adapters}, case)
        got = _hf_logits(pm, case)
        with pm.disable_adapter():
            assert np.abs(got - _hf_logits(pm, case)).max() > 0.1
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_quantized_base_needs_dequantize(ckpts, run_cli, tmp_path):
    hf_dir = ckpts[0]["fp32"][0]
    q = convert(hf_dir, str(tmp_path / "int8"), quantize="int8", progress=False)
    dst = str(tmp_path / "out")
    rc, out, err = run_cli("export", q, dst)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "int8" in err and "--dequantize" in err
    assert not os.path.exists(dst) and not glob.glob(dst + ".tmp-*")
    rc, out, err = run_cli("export", q, dst, "--dequantize", "--shard-gb", "0.0002")
    assert rc == 0, err
    assert sum(line.startswith("warning: ") and "int8" in line for line in err.splitlines()) == 1
    qparams, qcfg = loading.load(q, as_numpy=True)
    plans = LeafQuantizer(qcfg.with_runtime(kernel_layout="in_out", scan_layers=False)).plans
    got, _ = _read_dir(dst)
    src, _ = _read_dir(hf_dir)
    n_quant = 0
    for name, rule in build_rules(qcfg).items():
        if rule.path in plans:
            plan = plans[rule.path]
            w = dequantize_array(get_path(qparams, rule.path), get_path(qparams, plan.scale_path), "int8",
                                 n_in=plan.n_in, kernel_layout=plan.kernel_layout)
            np.testing.assert_array_equal(got[name], rule.to_hf(w), err_msg=name)
            assert not np.array_equal(got[name], src[name])  # int8 weights, not the float source
            n_quant += 1
        else:
            assert got[name].tobytes() == src[name].tobytes(), name
    assert n_quant > 0


def test_trained_weights_export_the_same_way(ckpts, tmp_path):
    """A training run's final weights (`save_converted`: a converted directory without a source conversion)."""
    from glm41v_convert.hf_to_orbax import save_converted

    hf_dir, conv = ckpts[0]["fp32"]
    params, cfg = loading.load(conv, as_numpy=True)
    q = params["language_model"]["layers_1"]["self_attn"]["q_proj"]
    q["kernel"] = q["kernel"] * np.float32(2)  # "trained": one tensor changed
    final = save_converted(params, cfg, str(tmp_path / "final"), source_dir=hf_dir)
    got, _ = _read_dir(export(final, str(tmp_path / "out")))
    src, _ = _read_dir(hf_dir)
    changed = "model.language_model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[changed], src[changed] * np.float32(2))
    assert all(got[n].tobytes() == a.tobytes() for n, a in src.items() if n != changed)


def test_bad_input_is_one_error_line_and_nothing_written(ckpts, adapter, run_cli, tmp_path):
    hf_dir, conv = ckpts[0]["fp32"]
    ad_dir = adapter[0]
    foreign = str(tmp_path / "foreign")
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        meta = json.load(f)
    os.makedirs(foreign)
    meta["base"]["norms_sha256"] = "0" * 64
    with open(os.path.join(foreign, "adapter_config.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(ad_dir, "adapter.safetensors"), "rb") as f, \
            open(os.path.join(foreign, "adapter.safetensors"), "wb") as g:
        g.write(f.read())
    existing = tmp_path / "existing"
    existing.mkdir()
    dst = str(tmp_path / "o")
    cases = [
        ((conv, dst, "--adapter", foreign, "--merge"), "trained on another base model"),
        ((conv, dst, "--adapter", foreign, "--peft"), "trained on another base model"),
        ((conv, str(existing)), "destination already exists"),
        ((conv, dst, "--dtype", "float16"), "--dtype must be one of bfloat16, float32, got 'float16'"),
        ((hf_dir, dst), "not a converted directory"),
        ((str(tmp_path / "nope"), dst), "no such directory"),
        ((conv, dst, "--merge"), "--merge needs --adapter"),
        ((conv, dst, "--adapter", ad_dir), "exactly one of --merge"),
        ((conv, dst, "--adapter", str(tmp_path / "nope"), "--peft"), "not a directory"),
        ((conv, dst, "--adapter", ad_dir, "--peft", "--dtype", "bfloat16"), "a --peft adapter is written in float32"),
    ]
    for argv, why in cases:
        rc, out, err = run_cli("export", *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "", (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], (argv, err)
        assert not os.path.exists(dst) and not glob.glob(dst + ".tmp-*"), argv
    assert os.listdir(existing) == []


@pytest.mark.slow
def test_a_lora_run_exports_merged_and_peft(tiny_cache_dir, run_cli, tmp_path):
    """Issue 14's 'done means': train the tiny checkpoint with cpu_lora.yaml (8 steps), convert the base, export
    with --merge and with --peft: transformers, and PEFT on it, give our logits with the trained adapter."""
    import test_train_loop as TL
    from test_lora import LORA_YAML, RUN_SET

    from glm41v_jax import tiny

    run = str(tmp_path / "run")
    p = TL._start(["train", "--config", LORA_YAML, "--set", f"output_dir={run}", *RUN_SET], run + ".log",
                  TL._env(tiny_cache_dir, str(tmp_path / "jit")))
    assert TL._finish(p) == 0, TL._tail(run + ".log")
    ad_dir = os.path.join(run, "final")
    hf_dir = tiny.materialize_tiny_checkpoint()
    conv, merged, peft_dir = (str(tmp_path / k) for k in ("conv", "merged", "peft"))
    assert run_cli("convert", hf_dir, conv, "--no-progress")[0] == 0
    for argv in ((conv, merged, "--adapter", ad_dir, "--merge"), (conv, peft_dir, "--adapter", ad_dir, "--peft")):
        rc, out, err = run_cli("export", *argv)
        assert rc == 0 and out == "", err
    params, cfg = loading.load(conv, as_numpy=True)
    adapters, lcfg, _ = LO.load_adapters(ad_dir, cfg)
    base = Glm4vForConditionalGeneration.from_pretrained(hf_dir).eval()
    model = Glm4vForConditionalGeneration.from_pretrained(merged).eval()
    for case in _prompts(lcfg):
        want = _our_logits(lcfg, {"params": params, "lora": adapters}, case)
        assert np.abs(want - _our_logits(cfg, {"params": params}, case)).max() > 1e-3  # the run trained them
        np.testing.assert_allclose(_hf_logits(model, case), want, atol=TOL, rtol=0)
    pm = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    for case in _prompts(lcfg):
        want = _our_logits(lcfg, {"params": params, "lora": adapters}, case)
        np.testing.assert_allclose(_hf_logits(pm, case), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_an_interrupted_export_leaves_nothing(ckpts, tmp_path, monkeypatch, exc):
    import glm41v_convert.export as E

    conv = ckpts[0]["fp32"][1]
    real, calls = E.to_hf_layout, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 20:  # in the middle of a shard
            raise exc("stopped")
        return real(*a, **k)

    monkeypatch.setattr(E, "to_hf_layout", flaky)
    dst = str(tmp_path / "out")
    with pytest.raises(exc):
        export(conv, dst, shard_bytes=SHARD)
    assert len(calls) == 20
    assert not os.path.exists(dst) and not glob.glob(dst + ".tmp-*") and os.listdir(tmp_path) == []
