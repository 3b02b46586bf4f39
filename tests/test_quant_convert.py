"""Quantized checkpoints (issue 13): `glm41v convert --quantize`, quantizing at load, the format record, and the
refusals. The model is the embedded tiny checkpoint (random weights; int4 with groups of 16, which its widths
allow: 64, 160 and the head dim 16).

The reference for every quantized array is `quant.quantize_params` (the core API, tested against a NumPy loop in
test_quant.py) applied to the float checkpoint's tree; convert-time and load-time quantization (which go through
`quant_checkpoint.LeafQuantizer`, one tensor at a time, in slices) must both give its bits exactly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from glm41v_convert.hf_to_orbax import convert
from glm41v_jax import loading, tiny
from glm41v_jax import quant as Q
from glm41v_jax.checkpoint_format import FORMAT_FILE, QUANT_FIELD, CheckpointError, stored_quantization
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.converted import NumpyAbstract, restore
from glm41v_jax.layers import QuantError
from glm41v_jax.pipeline import Pipeline, Request
from glm41v_jax.quant_checkpoint import LeafQuantizer, QuantizedCheckpointError
from glm41v_jax.sampling import SamplingParams
from glm41v_jax.sharding import make_mesh, param_shardings
from glm41v_jax.weights import iter_leaves

SCHEMES = {"int8": 128, "int4": 16}  # scheme -> a group size the tiny widths allow


def _leaves(tree) -> dict:
    return {"/".join(p): np.asarray(a) for p, a in iter_leaves(tree)}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8) if a.dtype != np.dtype(ml_dtypes.int4) else a.astype(np.int8)


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(_bits(got[k]), _bits(want[k])), k


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """hf/ (the tiny HF checkpoint, fp32), float/ (its float conversion), int8/ and int4/ (quantized conversions)."""
    root = tmp_path_factory.mktemp("qconv")
    hf = tiny.materialize_tiny_checkpoint(str(root / "hf"))
    out = {"root": str(root), "hf": hf, "float": convert(hf, root / "float", progress=False)}
    for scheme, g in SCHEMES.items():
        out[scheme] = convert(hf, root / scheme, quantize=scheme, quant_group_size=g, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(ws) -> dict:
    """scheme -> quant.quantize_params over the float checkpoint's host tree (leaf names -> arrays)."""
    params, cfg = loading.load(ws["hf"], as_numpy=True)
    return {s: _leaves(Q.quantize_params(params, cfg.with_runtime(quantize=s, quant_group_size=g)))
            for s, g in SCHEMES.items()}


def test_orbax_round_trips_int4_bit_exactly(tmp_path):
    """Orbax (TensorStore) stores ml_dtypes.int4 as it is: every code -8..7 comes back, as NumPy and as a jax array
    (so int4 codes are written as int4, with no packing)."""
    from orbax.checkpoint.experimental.v1 import partial

    codes = np.tile(np.arange(-8, 8, dtype=np.int8), 12).reshape(3, 8, 8).astype(ml_dtypes.int4)
    d = tmp_path / "c"
    d.mkdir()
    partial.save_async(str(d / "params"), {"w": codes}).result()
    partial.finalize(str(d / "params"))
    host = restore(str(d), {("w",): NumpyAbstract(codes.shape, codes.dtype)})["w"]
    dev = restore(str(d), {("w",): jax.ShapeDtypeStruct(codes.shape, codes.dtype,
                                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))})
    assert host.dtype == codes.dtype and np.array_equal(host.astype(np.int8), codes.astype(np.int8))
    assert dev["w"].dtype == codes.dtype and np.array_equal(np.asarray(dev["w"]).astype(np.int8),
                                                            codes.astype(np.int8))


@pytest.mark.parametrize("scheme, layout", [("int8", "in_out"), ("int4", "out_in")])
def test_leaf_quantizer_in_slices_is_quantize_params(ws, scheme, layout):
    """LeafQuantizer, one leaf at a time and in slices of one output channel (chunk_bytes=1), gives exactly the
    tree of quant.quantize_params, in both kernel layouts, every layer quantized (no skip)."""
    params, cfg = loading.load(ws["hf"], as_numpy=True)
    from glm41v_jax.model import to_kernel_layout

    params, cfg = to_kernel_layout(params, cfg, layout)
    qcfg = cfg.with_runtime(quantize=scheme, quant_group_size=SCHEMES[scheme], quant_skip=())
    want = _leaves(Q.quantize_params(params, qcfg))
    lq = LeafQuantizer(qcfg, chunk_bytes=1)
    got = {}
    for p, a in iter_leaves(params):
        for path, out in lq(p, np.asarray(a)):
            got["/".join(path)] = out
    assert len(lq.plans) > 20 and any(k.startswith("visual/") and k.endswith("/scale") for k in got)
    _assert_same(got, want)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_convert_records_the_scheme_and_checksums(ws, reference, scheme):
    """The format file records the scheme; loading needs no flag and returns the reference bits and the scheme's
    config; the CRC-32 of every quantized array was recorded and verifies."""
    with open(os.path.join(ws[scheme], FORMAT_FILE)) as f:
        fmt = json.load(f)
    assert fmt[QUANT_FIELD] == {"scheme": scheme, "group_size": SCHEMES[scheme], "skip": ["vision"]}
    assert stored_quantization(fmt) == {"quantize": scheme, "quant_group_size": SCHEMES[scheme],
                                        "quant_skip": ("vision",)}
    assert set(fmt["checksums"]["arrays"]) == set(reference[scheme]) and fmt["num_arrays"] == len(reference[scheme])
    params, cfg = loading.load(ws[scheme], as_numpy=True)
    rt = cfg.runtime
    assert (rt.quantize, rt.quant_group_size, rt.quant_skip) == (scheme, SCHEMES[scheme], ("vision",))
    _assert_same(_leaves(params), reference[scheme])
    report = loading.verify_converted(ws[scheme])
    assert report.ok and report.arrays == len(reference[scheme])


def test_float_conversions_read_as_float(ws):
    """A float conversion has no quantization record (as every directory written before it existed): float."""
    with open(os.path.join(ws["float"], FORMAT_FILE)) as f:
        fmt = json.load(f)
    assert QUANT_FIELD not in fmt and stored_quantization(fmt) == {}
    _, cfg = loading.load(ws["float"], as_numpy=True)
    assert cfg.runtime.quantize == "none"


@pytest.mark.parametrize("record, field", [
    ({"scheme": "int3", "group_size": 128, "skip": []}, "'scheme'"),
    ({"scheme": "int4", "group_size": 0, "skip": []}, "group_size"),
    ({"scheme": "int8", "group_size": 128, "skip": ["embed"]}, "skip"),
    ("int8", "'scheme'"),
])
def test_a_malformed_record_names_the_field(record, field):
    with pytest.raises(CheckpointError, match=field):
        stored_quantization({QUANT_FIELD: record}, "x/glm41v_jax.json")


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("source", ["hf", "float"])
def test_quantize_at_load_is_convert_time(ws, reference, scheme, source):
    """load(float checkpoint, quantize=...) of the HF directory or of a float conversion gives the convert-time
    bits; the float leaves are cast to param_dtype, the codes and fp32 scales are not."""
    params, cfg = loading.load(ws[source], as_numpy=True, quantize=scheme, quant_group_size=SCHEMES[scheme])
    assert cfg.runtime.quantize == scheme
    _assert_same(_leaves(params), reference[scheme])
    cast, _ = loading.load(ws[source], as_numpy=True, quantize=scheme, quant_group_size=SCHEMES[scheme],
                           param_dtype="bfloat16")
    float_keys = set(_leaves(loading.load(ws["hf"], as_numpy=True)[0]))
    for k, a in _leaves(cast).items():
        want = reference[scheme][k]
        if k not in float_keys:  # a scale
            assert a.dtype == np.float32 and np.array_equal(a, want), k
        elif want.dtype.kind == "f":
            assert a.dtype == np.dtype(ml_dtypes.bfloat16), k
        else:
            assert np.array_equal(_bits(a), _bits(want)), k


def test_quantize_at_load_into_shardings(ws, reference):
    """8 CPU devices, fsdp=2,tensor=4: every quantized leaf lands in its sharding from the rules table, with the
    reference values; the scanned layout stacks codes and scales as it stacks float kernels."""
    mesh = make_mesh("fsdp=2,tensor=4")
    params, cfg = loading.load(ws["hf"], mesh=mesh, quantize="int4", quant_group_size=16)
    _assert_same(_leaves(params), reference["int4"])
    from glm41v_jax.converted import paths_and_leaves
    from glm41v_jax.model import abstract_params

    want = paths_and_leaves(param_shardings(abstract_params(cfg), mesh))
    got = paths_and_leaves(params)
    assert got.keys() == want.keys() and all(got[p].sharding == want[p] for p in got)
    stacked, scfg = loading.load(ws["int4"], mesh=mesh, scan_layers=True)
    assert Q.scheme_of(stacked) == "int4" and scfg.runtime.scan_layers
    q = stacked["language_model"]["layers"]["mlp"]["down"]
    assert q["kernel"].shape[0] == q["scale"].shape[0] == cfg.text.num_hidden_layers


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_greedy_tokens_convert_time_equal_load_time(ws, scheme):
    """Greedy generation (text + image prompt, eos off so that every row runs 12 steps) gives identical tokens
    from the quantized conversion and from the HF checkpoint quantized at load."""
    img = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    from PIL import Image

    path = os.path.join(ws["root"], "cat.png")
    Image.fromarray(img).save(path)
    reqs = [Request("Describe this.", images=[path], max_new_tokens=12), Request("Hello there!", max_new_tokens=12)]
    tokens = []
    for model, kw in ((ws[scheme], {}), (ws["hf"], {"quantize": scheme, "quant_group_size": SCHEMES[scheme]})):
        pipe = Pipeline.load(model, mesh=None, **kw)
        assert pipe.engine.cfg.runtime.quantize == scheme
        pipe.eos_ids = ()
        tokens.append([r["token_ids"] for r in pipe.generate(reqs, batch_size=2, max_new_tokens=12,
                                                             sampling=SamplingParams(greedy=True))])
    assert [len(t) for t in tokens[0]] == [12, 12]
    assert tokens[0] == tokens[1]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: already quantized, full-weight training.


def test_quantizing_a_quantized_checkpoint_is_refused(ws, tmp_path):
    with pytest.raises(QuantizedCheckpointError, match=r"already quantized \(int8, at conversion\)"):
        loading.load(ws["int8"], as_numpy=True, quantize="int4", quant_group_size=16)
    with pytest.raises(QuantizedCheckpointError, match=r"already quantized \(int4\)"):
        convert(ws["int4"], tmp_path / "again", quantize="int8", progress=False)
    with pytest.raises(QuantError, match="q_proj.*64 is not a multiple of 7"):
        loading.load(ws["hf"], as_numpy=True, quantize="int4", quant_group_size=7)
    assert not os.listdir(tmp_path)


def test_training_a_quantized_checkpoint_is_refused(ws, run_cli, tmp_path):
    """`glm41v train` with a quantized `model:`: one error line, exit 2, nothing written (no output_dir); the
    params loader of the train step (also `glm41v loss`) refuses too; a train plan with --quantize as well."""
    from glm41v_train.params import load_params

    cfg_path = tmp_path / "q.yaml"
    cfg_path.write_text(f"model: {ws['int8']}\noutput_dir: {tmp_path / 'out'}\nsteps: 2\n"
                        f"data: {{jsonl: x.jsonl, seq_len: 64, batch_size: 1, max_patches: 64}}\n")
    rc, _, err = run_cli("train", "--config", str(cfg_path))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "quantized (int8)" in err and "LoRA" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(QuantizedCheckpointError, match="LoRA"):
        load_params(ws["int4"], None)
    plan_yaml = tmp_path / "t.yaml"
    plan_yaml.write_text("model: tiny\noutput_dir: out\nsteps: 4\nmesh: fsdp=-1\n"
                         "data: {jsonl: x.jsonl, seq_len: 128, batch_size: 4, max_patches: 64}\n")
    cfg_json = tmp_path / "m"
    cfg_json.mkdir()
    (cfg_json / "config.json").write_text(json.dumps(tiny.tiny_hf_config()))
    rc, _, err = run_cli("plan", "--tpu", "v5e-4", "--model", str(cfg_json), "train", "--config", str(plan_yaml),
                         "--quantize", "int8")
    assert rc == 2 and "int8 weights" in err and "LoRA" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# The command line, as users type it: relative paths with spaces, from another directory, in a fresh process.


def _glm41v(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm41v_jax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def user_dir(ws, tmp_path_factory) -> str:
    """A user's folder: "my hf/" (the tiny checkpoint) and elsewhere/ (the cwd of the commands)."""
    d = tmp_path_factory.mktemp("user")
    tiny.materialize_tiny_checkpoint(str(d / "my hf"))
    (d / "elsewhere").mkdir()
    return str(d)


def test_cli_convert_int8_then_generate(user_dir):
    """`glm41v convert "../my hf" "../q 8" --quantize int8`, then `glm41v generate --model "../q 8"` (no flag)
    from elsewhere/: the quantized checkpoint generates."""
    cwd = os.path.join(user_dir, "elsewhere")
    p = _glm41v(["convert", "../my hf", "../q 8", "--quantize", "int8", "--no-progress"], cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"converted ../my hf -> {user_dir}/q 8"
    p = _glm41v(["generate", "--model", "../q 8", "--prompt", "Hi", "--greedy", "--max-new-tokens", "4", "--json"], cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert 1 <= len(rec["token_ids"]) <= 4 and rec["model"] == "../q 8" and rec["quantize"] == "int8"


@pytest.mark.parametrize("argv, needle", [
    (["convert", "../my hf", "../out", "--quantize", "int3"], "invalid choice: 'int3'"),
    (["convert", "../my hf", "../out", "--quantize", "int4", "--quant-group-size", "7"],
     "q_proj: int4 groups of 7 along an input axis of 64"),
    (["convert", "../my hf", "../out", "--quant-group-size", "16"], "--quant-group-size needs --quantize"),
    (["convert", "../my hf", "../out", "--quantize", "int8", "--quantize-skip", "embed"], "quant_skip"),
    (["generate", "--model", "../my hf", "--prompt", "x", "--quantize", "int5"], "invalid choice: 'int5'"),
    (["generate", "--model", "../my hf", "--prompt", "x", "--quantize", "int4", "--quant-group-size", "7"],
     "64 is not a multiple of 7"),
])
def test_cli_bad_quantization_input(user_dir, argv, needle):
    """One `error:` line, exit 2, nothing written."""
    p = _glm41v([*argv, *(["--no-progress"] if argv[0] == "convert" else [])], os.path.join(user_dir, "elsewhere"))
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert not any(n.startswith("out") for n in os.listdir(user_dir))


def test_cli_quantized_checkpoints_refuse_quantizing_again(ws, user_dir):
    """convert of a quantized conversion, and generate --quantize of a quantized checkpoint: one error line, exit 2."""
    cwd = os.path.join(user_dir, "elsewhere")
    rel = os.path.relpath(ws["int8"], cwd)
    p = _glm41v(["convert", rel, "../again", "--quantize", "int4", "--no-progress"], cwd)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already quantized (int8)" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(user_dir, "again"))
    p = _glm41v(["generate", "--model", rel, "--prompt", "x", "--quantize", "int8"], cwd)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already quantized (int8" in p.stderr, p.stderr


def test_plan_int8_on_a_small_topology(tmp_path, capsys, monkeypatch):
    """`glm41v plan --tpu v5e-4 generate --quantize int8` on the tiny config (the TPU compiler, libtpu): the
    quantized programs compile and fit; the weights per chip are below the float plan's; the report names the
    scheme."""
    from glm41v_jax.cli import main

    d = tmp_path / "tiny model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny.tiny_hf_config()))
    monkeypatch.chdir(tmp_path)
    base = ["plan", "--tpu", "v5e-4", "--model", "tiny model", "--json", "generate", "--max-context", "256",
            "--max-new-tokens", "32"]
    assert main([*base, "--quantize", "int8", "--quantize-skip", "none"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["fits"] and q["quantize"] == {"scheme": "int8", "group_size": 128, "skip": []}
    assert [p["name"] for p in q["programs"]] == ["prefill", "decode"]  # batch 1: a row-major cache, prefill first
    assert main(base) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["quantize"] == {"scheme": "none"}
    assert q["per_chip"]["params_bytes"] < f["per_chip"]["params_bytes"]
    cfg = Glm4vConfig.from_hf(tiny.tiny_hf_config())
    assert cfg.runtime.quantize == "none"


def test_chat_quantizes_at_load(user_dir, run_cli, monkeypatch):
    """`glm41v chat --model "../my hf" --quantize int4 --quant-group-size 16` from elsewhere/: the reply's tokens
    are the ones the int4 conversion gives (the same bits at load)."""
    monkeypatch.chdir(os.path.join(user_dir, "elsewhere"))
    replies = []
    for model, flags in (("../my hf", ["--quantize", "int4", "--quant-group-size", "16"]), ("../c4", [])):
        if model == "../c4" and not os.path.exists("../c4"):
            assert run_cli("convert", "../my hf", "../c4", "--quantize", "int4", "--quant-group-size", "16",
                           "--no-progress")[0] == 0
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\n"))
        log = f"chat {len(replies)}.jsonl"
        rc, _, err = run_cli("chat", "--model", model, *flags, "--max-new-tokens", "6", "--log-jsonl", log)
        assert rc == 0 and "error" not in err, err
        with open(log) as f:
            (rec,) = [json.loads(line) for line in f]
        replies.append(rec["token_ids"])
    assert replies[0] == replies[1] and len(replies[0]) >= 1
