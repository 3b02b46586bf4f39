"""glm41v_convert: HF -> Orbax conversion, parity, bf16 bits, real widths, mesh restores, atomicity, CLI errors."""

from __future__ import annotations

import glob
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import reference as R
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from glm41v_convert.hf_to_orbax import convert, save_converted
from glm41v_jax import loading, tiny
from glm41v_jax import model as M
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.inputs import mm_token_types
from glm41v_jax.loading import COMPLETE_MARKER, FORMAT_FILE, CheckpointError
from glm41v_jax.sharding import make_mesh, param_shardings
from glm41v_jax.weights import build_rules, get_path, iter_leaves


def _read_all(path: str) -> dict[str, np.ndarray]:
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)


def _image_prompt(cfg: Glm4vConfig, grid=(1, 4, 6), text=(120, 121)) -> dict:
    rng = np.random.default_rng(0)
    t, h, w = grid
    m2 = cfg.vision.spatial_merge_size ** 2
    pix = rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32)
    ids = ([cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.image_end_token_id]
           + list(text))
    return dict(input_ids=np.array([ids]), pixel_values=pix, image_grid_thw=np.array([grid]))


def _logits(params, cfg, prompt) -> np.ndarray:
    kw = dict(prompt)
    return np.asarray(M.forward(params, cfg, kw.pop("input_ids"), **kw))


def _no_tmp_left(dst: str) -> bool:
    return not glob.glob(dst + ".tmp-*")


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    d = str(root / "hf")
    hf = R.write_checkpoint(d, R.hf_config_dict("a"))
    dst = convert(d, str(root / "orbax"), progress=False)
    return d, dst, hf


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """Small-vocab fp32 HF dir written with NumPy (no torch model): for bits, atomicity and CLI tests."""
    d = str(tmp_path_factory.mktemp("small") / "hf")
    os.makedirs(d)
    cfg_dict = tiny.tiny_hf_config(vocab_size=512)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    state = tiny.random_hf_state_dict(cfg_dict, 3)
    # Exact bf16 rounding ties (both mantissa parities, both signs), subnormals, infinities, max float.
    special = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F80C000, 0x3F807FFF, 0x00008000,
                        0x00018000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x80000001], np.uint32).view(np.float32)
    norm = state["model.language_model.norm.weight"]
    norm[: len(special)] = special
    save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


# ---------------------------------------------------------------------------------------------------------------


def test_converted_matches_hf_dir_and_transformers(hf_ckpt):
    d, dst, hf = hf_ckpt
    assert os.path.isfile(os.path.join(dst, COMPLETE_MARKER))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "video_preprocessor_config.json"):
        assert os.path.isfile(os.path.join(dst, f)), f
    with open(os.path.join(dst, FORMAT_FILE)) as f:
        fmt = json.load(f)
    assert fmt["format_version"] == 1 and fmt["dtype"] == "float32" and fmt["layout"] == "unrolled"
    assert loading.resolve_model_dir(dst) == dst

    direct, cfg = loading.load(d)
    conv, cfg2 = loading.load(dst)
    assert cfg == cfg2
    prompt = _image_prompt(cfg)
    prompt["input_ids"] = np.concatenate([[[151331, 151333, 151336, 198]], prompt["input_ids"], [[151337, 198]]], 1)
    a, b = _logits(direct, cfg, prompt), _logits(conv, cfg, prompt)
    np.testing.assert_array_equal(a, b)
    tt = mm_token_types(prompt["input_ids"], cfg).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(prompt["input_ids"]), pixel_values=torch.from_numpy(prompt["pixel_values"]),
                 image_grid_thw=torch.from_numpy(prompt["image_grid_thw"]),
                 mm_token_type_ids=torch.from_numpy(tt)).logits.numpy()
    np.testing.assert_allclose(b, ref, atol=1e-4, rtol=0)


def test_bf16_conversion_bit_identical_to_torch(small_ckpt, tmp_path):
    dst = convert(small_ckpt, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    params, cfg = loading.load(dst, as_numpy=True)
    assert cfg.runtime.param_dtype == "float32"  # stored dtype is reported by the arrays, not forced into cfg
    src = _read_all(os.path.join(small_ckpt, "model.safetensors"))
    for name, rule in build_rules(cfg).items():
        want = torch.from_numpy(src[name]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        got = np.asarray(get_path(params, rule.path))
        assert got.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(got.view(np.uint16), rule.to_flax(want), err_msg=name)
    # also the direct HF load with a dtype cast
    direct, cfg2 = loading.load(small_ckpt, param_dtype="bfloat16", as_numpy=True)
    assert cfg2.runtime.param_dtype == "bfloat16"
    for path, leaf in iter_leaves(direct):
        np.testing.assert_array_equal(leaf.view(np.uint16), np.asarray(get_path(params, path)).view(np.uint16))


def test_bf16_source_stays_bit_exact(tmp_path):
    d = str(tmp_path / "hf16")
    os.makedirs(d)
    cfg_dict = tiny.tiny_hf_config(vocab_size=300)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny.random_hf_state_dict(cfg_dict, 5).items()}
    save_torch(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    keep, cfg = loading.load(convert(d, str(tmp_path / "keep"), progress=False), as_numpy=True)
    up, _ = loading.load(convert(d, str(tmp_path / "f32"), dtype="float32", progress=False), as_numpy=True)
    for name, rule in build_rules(cfg).items():
        bits = rule.to_flax(state[name].view(torch.int16).numpy().view(np.uint16))
        k = np.asarray(get_path(keep, rule.path))
        assert k.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(k.view(np.uint16), bits, err_msg=name)
        u = np.asarray(get_path(up, rule.path))
        assert u.dtype == np.float32
        np.testing.assert_array_equal(u, rule.to_flax(state[name].float().numpy()), err_msg=name)


def test_real_widths_convert_and_forward(tmp_path):
    """9B widths (4096 / 13696 / 32q+2kv heads, vision 1536 x 12 heads, merger 13696), 1 layer each, small vocab."""
    d = str(tmp_path / "hf")
    os.makedirs(d)
    cfg_dict = Glm4vConfig().to_hf()
    cfg_dict["text_config"].update(num_hidden_layers=1, vocab_size=1024, pad_token_id=1000, eos_token_id=[1000])
    cfg_dict["vision_config"].update(depth=1)
    cfg_dict.update(image_token_id=1001, video_token_id=1002, image_start_token_id=1003, image_end_token_id=1004,
                    video_start_token_id=1005, video_end_token_id=1006)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    cfg = Glm4vConfig.from_hf(cfg_dict)
    assert (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.vision.hidden_size) == (4096, 13696, 1536)
    rng = np.random.default_rng(0)
    state = {}
    for name, rule in build_rules(cfg).items():
        a = rng.standard_normal(rule.hf_shape, dtype=np.float32)
        a *= 0.1 if "norm" in name or name.endswith("bias") else (1.0 if "embed" in name else
                                                                   1 / np.sqrt(np.prod(rule.hf_shape[1:])))
        if "norm" in name and name.endswith("weight"):
            a += 1
        state[name] = torch.from_numpy(a).to(torch.bfloat16)
        del a
    save_torch(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    del state
    dst = convert(d, str(tmp_path / "orbax"), progress=False, flush_bytes=256 << 20)
    conv, cfg2 = loading.load(dst)
    assert conv["language_model"]["layers_0"]["mlp"]["gate_up"]["kernel"].shape == (4096, 2, 13696)
    assert conv["visual"]["merger"]["gate"]["kernel"].dtype == jax.numpy.bfloat16
    prompt = _image_prompt(cfg2, grid=(1, 4, 4), text=(5, 6, 7))
    out = _logits(conv, cfg2, prompt)
    assert out.shape == (1, prompt["input_ids"].shape[1], 1024) and np.isfinite(out).all()
    del conv
    direct, _ = loading.load(d)
    np.testing.assert_array_equal(_logits(direct, cfg2, prompt), out)


def test_mesh_restore_any_device_count(hf_ckpt, tmp_path):
    """Params living on 8 devices (fsdp=4, tensor=2) -> saved -> restored on 1, 4, 8 devices and as NumPy."""
    d, converted, _ = hf_ckpt
    mesh8 = make_mesh("fsdp=4,tensor=2")
    on8, cfg = loading.load(d, mesh=mesh8)
    saved = save_converted(on8, cfg, str(tmp_path / "from8"), source_dir=d)
    ref = dict(iter_leaves(loading.load(d, as_numpy=True)[0]))
    abstract = M.abstract_params(cfg)
    for src in (saved, converted):
        for n, spec in ((1, "fsdp=1"), (4, "fsdp=2,tensor=2"), (8, "fsdp=4,tensor=2")):
            mesh = make_mesh(spec, jax.devices()[:n])
            params, _ = loading.load(src, mesh=mesh)
            want = dict(iter_leaves(param_shardings(abstract, mesh)))
            got = dict(iter_leaves(params))
            assert got.keys() == ref.keys()
            for path, arr in got.items():
                assert arr.sharding == want[path], (src, n, path)
                np.testing.assert_array_equal(np.asarray(arr), ref[path])
        host, _ = loading.load(src, as_numpy=True)
        for path, arr in iter_leaves(host):
            assert isinstance(arr, np.ndarray)
            np.testing.assert_array_equal(arr, ref[path])
    q = loading.load(saved, mesh=mesh8)[0]["language_model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


# ---------------------------------------------------------------------------------------------------------------
# Atomicity and errors.


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(small_ckpt, tmp_path, exc):
    dst = str(tmp_path / "out")
    seen = []

    def boom(name):
        seen.append(name)
        if len(seen) == 20:  # after at least one partial save has been written
            raise exc

    with pytest.raises(type(exc)):
        convert(small_ckpt, dst, progress=False, flush_bytes=1 << 16, on_tensor=boom)
    assert len(seen) == 20
    assert not os.path.exists(dst) and _no_tmp_left(dst)
    assert os.listdir(tmp_path) == []


def test_existing_destination_refused(small_ckpt, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    with pytest.raises(CheckpointError, match=r"exists: destination already exists"):
        convert(small_ckpt, str(dst), progress=False)
    assert os.listdir(dst) == [] and _no_tmp_left(str(dst))


def test_bad_dtype_refused(small_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"--dtype must be one of bfloat16, float32, got 'float16'"):
        convert(small_ckpt, str(tmp_path / "x"), dtype="float16")
    assert not os.path.exists(tmp_path / "x")


def test_converting_a_converted_dir_refused(hf_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"is already a converted directory"):
        convert(hf_ckpt[1], str(tmp_path / "again"))


def _cli(argv: list[str]) -> int:
    from glm41v_jax.cli import main

    return main(argv)


def _one_error_line(capsys, pattern: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and pattern in err[0], err
    assert "Traceback" not in err[0]


def test_cli_errors_exit_2(small_ckpt, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert _cli(["convert", small_ckpt, str(existing)]) == 2
    _one_error_line(capsys, "destination already exists")
    assert _cli(["convert", small_ckpt, str(tmp_path / "o"), "--dtype", "int8"]) == 2
    _one_error_line(capsys, "--dtype must be one of bfloat16, float32")
    assert _cli(["convert", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "no such directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert _cli(["convert", str(bad), str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "config.json: not valid JSON")
    (bad / "config.json").write_text(json.dumps(tiny.tiny_hf_config()))
    (bad / "model.pt").write_bytes(b"pickle")
    assert _cli(["convert", str(bad), str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "refusing to unpickle")
    assert not os.path.exists(tmp_path / "o")


def test_cli_success(small_ckpt, tmp_path, capsys):
    dst = str(tmp_path / "ok")
    assert _cli(["convert", small_ckpt, dst, "--dtype", "bfloat16", "--no-progress"]) == 0
    assert "error" not in capsys.readouterr().err
    params, _ = loading.load(dst, as_numpy=True)
    assert params["lm_head"]["kernel"].dtype == ml_dtypes.bfloat16
