"""glm41v_jax.loading: HF directories (single file, sharded), parity with transformers, meshes, and bad inputs.

Each bad input gets its own test and the error message is checked: it must name the file / tensor / field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import sys

import jax
import numpy as np
import pytest
import reference as R
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from glm41v_jax import loading, tiny
from glm41v_jax import model as M
from glm41v_jax.config import ConfigError, Glm4vConfig, RuntimeConfig
from glm41v_jax.inputs import mm_token_types
from glm41v_jax.loading import CheckpointError
from glm41v_jax.sharding import make_mesh, param_shardings
from glm41v_jax.weights import WeightsError, iter_leaves


def _read_all(path: str) -> dict[str, np.ndarray]:
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)


def _inputs(cfg: Glm4vConfig) -> dict:
    """A prompt with one image (grid 1x4x6 -> 6 image tokens) and random pixel rows."""
    rng = np.random.default_rng(0)
    grid = np.array([[1, 4, 6]])
    pix = rng.standard_normal((24, cfg.vision.patch_dim)).astype(np.float32)
    ids = np.array([[151331, 151333, 151336, 198, 151339] + [151343] * 6 + [151340, 120, 121, 151337, 198]])
    return dict(input_ids=ids, pixel_values=pix, image_grid_thw=grid)


def _hf_logits(hf, cfg: Glm4vConfig, inputs: dict) -> np.ndarray:
    tt = mm_token_types(inputs["input_ids"], cfg).astype(np.int64)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(inputs["input_ids"]), pixel_values=torch.from_numpy(inputs["pixel_values"]),
                 image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]), mm_token_type_ids=torch.from_numpy(tt))
    return out.logits.numpy()


def _jax_logits(params, cfg: Glm4vConfig, inputs: dict) -> np.ndarray:
    kw = dict(inputs)
    return np.asarray(M.forward(params, cfg, kw.pop("input_ids"), **kw))


def split_into_shards(src_dir: str, dst_dir: str, n: int) -> None:
    """Copy an HF dir, replacing model.safetensors by n shards + model.safetensors.index.json."""
    shutil.copytree(src_dir, dst_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    state = _read_all(os.path.join(src_dir, "model.safetensors"))
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), n)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({names[j]: state[names[j]] for j in chunk}, os.path.join(dst_dir, fname), metadata={"format": "pt"})
        weight_map.update({names[j]: fname for j in chunk})
    with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("load") / "hf")
    hf = R.write_checkpoint(d, R.hf_config_dict("a"))
    return d, hf


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A small-vocab fp32 HF dir (no torch) for the error cases: config.json + model.safetensors."""
    return tiny.write_random_hf_dir(tmp_path_factory.mktemp("small") / "hf", 1, vocab_size=512)


def _variant(small_ckpt: str, tmp_path, mutate=None) -> str:
    d = str(tmp_path / "bad")
    shutil.copytree(small_ckpt, d)
    if mutate is not None:
        path = os.path.join(d, "model.safetensors")
        state = _read_all(path)
        mutate(state)
        save_file(state, path, metadata={"format": "pt"})
    return d


# ---------------------------------------------------------------------------------------------------------------


def test_hf_dir_matches_transformers(hf_ckpt):
    d, hf = hf_ckpt
    params, cfg = loading.load(d)
    leaf = params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.devices() == {jax.devices()[0]}
    inputs = _inputs(cfg)
    np.testing.assert_allclose(_jax_logits(params, cfg, inputs), _hf_logits(hf, cfg, inputs), atol=1e-4, rtol=0)


def test_sharded_hf_dir_loads_identically(hf_ckpt, tmp_path):
    d, _ = hf_ckpt
    split_into_shards(d, str(tmp_path / "sharded"), 3)
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) == 3
    a, _ = loading.load(d, as_numpy=True)
    b, _ = loading.load(str(tmp_path / "sharded"), as_numpy=True)
    fa, fb = dict(iter_leaves(a)), dict(iter_leaves(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert isinstance(fb[k], np.ndarray)
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_hf_dir_onto_mesh(hf_ckpt):
    d, _ = hf_ckpt
    mesh = make_mesh("fsdp=4,tensor=2")
    params, cfg = loading.load(d, mesh=mesh)
    ref, _ = loading.load(d, as_numpy=True)
    want = dict(iter_leaves(param_shardings(M.abstract_params(cfg), mesh)))
    got = dict(iter_leaves(params))
    assert got.keys() == want.keys()
    for path, arr in got.items():
        assert arr.sharding == want[path], path
    for path, arr in iter_leaves(ref):
        np.testing.assert_array_equal(np.asarray(got[path]), arr)
    q = params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_dtype_cast_and_runtime_overrides(small_ckpt):
    params, cfg = loading.load(small_ckpt, param_dtype="bfloat16", as_numpy=True)
    assert cfg.runtime.param_dtype == "bfloat16" and cfg.runtime.compute_dtype == "float32"
    assert all(str(x.dtype) == "bfloat16" for _, x in iter_leaves(params))
    # One RuntimeConfig, with field overrides on top; its param_dtype is the weights' dtype.
    rt = RuntimeConfig(param_dtype="bfloat16", compute_dtype="bfloat16", attention_impl="auto")
    params, cfg = loading.load(small_ckpt, rt, as_numpy=True, param_dtype="float32")
    assert cfg.runtime == dataclasses.replace(rt, param_dtype="float32")
    assert all(str(x.dtype) == "float32" for _, x in iter_leaves(params))
    with pytest.raises(TypeError, match="param_dtype= .* compute_dtype="):
        loading.load(small_ckpt, dtype="bfloat16", as_numpy=True)  # the old, ambiguous spelling
    with pytest.raises(ConfigError, match="param_dtype must be a floating-point dtype.*'int8'"):
        loading.load(small_ckpt, param_dtype="int8", as_numpy=True)
    stacked, cfg2 = loading.load(small_ckpt, as_numpy=True, scan_layers=True)
    assert cfg2.runtime.scan_layers
    assert stacked["language_model"]["layers"]["mlp"]["down"]["kernel"].shape[0] == cfg2.text.num_hidden_layers


def test_load_config_and_model_dir(hf_ckpt):
    d, _ = hf_ckpt
    assert loading.resolve_model_dir(d) == d
    assert os.path.isfile(os.path.join(loading.resolve_model_dir(d), "tokenizer.json"))
    assert loading.load_config(d, compute_dtype="bfloat16").runtime.compute_dtype == "bfloat16"
    rt = RuntimeConfig(scan_layers=True)
    assert loading.load_config(d, rt).runtime == rt


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one test each, message checked.


def test_missing_shard_file(hf_ckpt, tmp_path):
    d = str(tmp_path / "sharded")
    split_into_shards(hf_ckpt[0], d, 2)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard file named in "
                                              r"model\.safetensors\.index\.json is missing"):
        loading.load(d)


def test_no_weights_at_all(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json found"):
        loading.load(d)


def test_truncated_safetensors(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        loading.load(d)


def test_garbage_safetensors(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 16) + b"not json at all!" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        loading.load(d)


def test_shape_mismatch(small_ckpt, tmp_path):
    name = "model.language_model.layers.1.mlp.down_proj.weight"

    def mutate(state):
        state[name] = state[name][:, :-1].copy()

    d = _variant(small_ckpt, tmp_path, mutate)
    with pytest.raises(WeightsError, match=rf"tensor '{name}' has shape \(64, 159\), expected \(64, 160\)"):
        loading.load(d)


def test_unexpected_key(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path, lambda s: s.__setitem__("model.visual.extra_head.weight", np.zeros(3, "f4")))
    with pytest.raises(WeightsError, match=r"unexpected 1 tensor\(s\): model\.visual\.extra_head\.weight"):
        loading.load(d)


def test_missing_key(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path, lambda s: s.pop("model.language_model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\): model\.language_model\.layers\.0\.self_attn"
                                           r"\.k_proj\.bias"):
        loading.load(d)


def test_integer_dtype_refused(small_ckpt, tmp_path):
    name = "model.language_model.norm.weight"
    d = _variant(small_ckpt, tmp_path, lambda s: s.__setitem__(name, np.ones(64, np.int32)))
    with pytest.raises(WeightsError, match=rf"tensor '{name}' has dtype I32, expected a floating-point"):
        loading.load(d)


def test_pickle_refused(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04 pretend pickle")  # never opened
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing to unpickle .*convert to safetensors"):
        loading.load(d)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle"):
        loading.load(os.path.join(d, "pytorch_model.bin"))


def test_config_field_missing(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    del cfg["text_config"]["hidden_size"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=r"config\.json: config\.json text_config: required field 'hidden_size'"):
        loading.load(d)


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match=r"no such directory"):
        loading.load("./does/not/exist")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"glm41v-test/no-such-model-xyz \(looked for .*\): no such local "
                                              r"directory; as a hub id .*(huggingface_hub is not installed|"
                                              r"HF_HUB_OFFLINE is set).*--local-dir DIR"):
        loading.load("glm41v-test/no-such-model-xyz")


def test_converted_dir_without_marker_refused(small_ckpt, tmp_path):
    from glm41v_convert.hf_to_orbax import convert

    dst = str(tmp_path / "conv")
    convert(small_ckpt, dst, progress=False)
    os.remove(os.path.join(dst, loading.COMPLETE_MARKER))
    with pytest.raises(CheckpointError, match=r"conversion is incomplete \(no CONVERSION_COMPLETE marker\)"):
        loading.load(dst)


def test_hub_shaped_missing_path_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=rf"^models/glm \(looked for {tmp_path}/models/glm\): no such local "
                                              r"directory; as a hub id it was not fetched because huggingface_hub is "
                                              r"not installed"):
        loading.load("models/glm")


@pytest.mark.parametrize("make, message", [
    (lambda p: None, r"the model path is empty"),
    (lambda p: p.write_text("x"), r"expected a checkpoint directory \(with config\.json\), got a file"),
    (lambda p: p.symlink_to(p.parent / "gone"), r"no such directory \(a broken symbolic link\)"),
    (lambda p: p.mkdir(), r"config\.json: config file not found"),
    (lambda p: (p.mkdir(), (p / "config.json").write_bytes(b"\xff\xfe{")), r"config\.json: not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_bytes(b"[" * 100000)), r"config\.json: not valid JSON"),
])
def test_hostile_model_paths(tmp_path, monkeypatch, make, message):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "m"
    make(target)
    with pytest.raises((CheckpointError, ConfigError), match=message):
        loading.load("" if "empty" in message else "m")
