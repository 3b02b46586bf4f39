"""The README's command lines, run as a user types them: relative paths, paths with spaces, a trailing slash, `~`, a
symbolic link, and from another working directory. The model is the embedded tiny checkpoint (random weights).

    glm41v convert ./hf ./glm41v-9b --dtype bfloat16
    glm41v verify ./glm41v-9b
    glm41v generate --model ./glm41v-9b --image cat.jpg --prompt "What kind of animal is this?" --dtype bfloat16
    printf '/image cat.jpg\\nWhat animal is this?\\n' | glm41v chat --model ./glm41v-9b
    glm41v loss --model ./glm41v-9b --data smoke/train.jsonl --seq-len 128 --json
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glm41v_jax import loading, tiny
from glm41v_jax.weights import iter_leaves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> str:
    """A user's folder: hf/ (the tiny HF checkpoint), cat.jpg, "my images/a cat.jpg", smoke/ (train data)."""
    ws = tmp_path_factory.mktemp("ws")
    tiny.materialize_tiny_checkpoint(str(ws / "hf"))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    img.save(ws / "cat.jpg")
    (ws / "my images").mkdir()
    img.save(ws / "my images" / "a cat.jpg")
    shutil.copytree(os.path.join(REPO, "train", "configs", "smoke_data"), ws / "smoke")
    (ws / "elsewhere" / "deeper").mkdir(parents=True)
    return str(ws)


@pytest.fixture(scope="module")
def converted(workspace) -> str:
    """`glm41v convert ./hf ./glm41v-9b --dtype bfloat16`, run from the workspace (in a fresh process, as typed)."""
    p = subprocess.run([sys.executable, "-m", "glm41v_jax.cli", "convert", "./hf", "./glm41v-9b", "--dtype",
                        "bfloat16", "--no-progress"], cwd=workspace, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"converted ./hf -> {workspace}/glm41v-9b"
    return os.path.join(workspace, "glm41v-9b")


@pytest.fixture(scope="module")
def reference(converted) -> dict:
    params, _ = loading.load(converted, as_numpy=True)
    return {p: a for p, a in iter_leaves(params)}


def _same(params, reference) -> bool:
    got = dict(iter_leaves(params))
    return got.keys() == reference.keys() and all(
        np.array_equal(np.asarray(got[k]).view(np.uint16), reference[k].view(np.uint16)) for k in got)


# ---------------------------------------------------------------------------------------------------------------
# Loading and verifying: every spelling of the path the user may type.


@pytest.mark.parametrize("cwd, spec", [
    (".", "glm41v-9b"),
    (".", "./glm41v-9b"),
    (".", "glm41v-9b/"),
    (".", "./glm41v-9b//"),
    ("elsewhere", "../glm41v-9b"),
    ("elsewhere/deeper", "../../glm41v-9b/"),
])
def test_load_relative(workspace, converted, reference, monkeypatch, cwd, spec):
    monkeypatch.chdir(os.path.join(workspace, cwd))
    params, cfg = loading.load(spec, as_numpy=True)
    assert _same(params, reference)
    assert loading.resolve_model_dir(spec) == converted


def test_load_spaces_tilde_symlink(workspace, converted, reference, tmp_path, monkeypatch):
    spaced = tmp_path / "my models" / "glm 9b"
    shutil.copytree(converted, spaced)
    link = tmp_path / "link to model"
    link.symlink_to(spaced, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for spec in ("my models/glm 9b", "./my models/glm 9b/", "~/my models/glm 9b", "link to model", "~/link to model/"):
        params, _ = loading.load(spec, as_numpy=True, verify=True)
        assert _same(params, reference), spec


def test_verify_relative_and_from_elsewhere(workspace, converted, run_cli, monkeypatch):
    monkeypatch.chdir(os.path.join(workspace, "elsewhere"))
    rc, out, err = run_cli("verify", "../glm41v-9b/")
    assert rc == 0 and out.startswith(f"OK {converted}: 56 arrays") and err == ""


def test_convert_relative_with_spaces_from_elsewhere(workspace, reference, run_cli, monkeypatch):
    monkeypatch.chdir(os.path.join(workspace, "elsewhere", "deeper"))
    rc, _, err = run_cli("convert", "../../hf/", "out dir/glm 9b/", "--dtype", "bfloat16", "--no-progress")
    assert rc == 0, err
    dst = os.path.join(workspace, "elsewhere", "deeper", "out dir", "glm 9b")
    assert err.strip() == f"converted ../../hf/ -> {dst}"
    assert sorted(os.listdir(os.path.dirname(dst))) == ["glm 9b"]  # no lock or tmp folder left
    assert _same(loading.load("out dir/glm 9b", as_numpy=True)[0], reference)


def test_missing_relative_paths_say_where_they_looked(workspace, run_cli, monkeypatch):
    monkeypatch.chdir(workspace)
    rc, _, err = run_cli("generate", "--model", "./no-such-model", "--prompt", "hi")
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"error: ./no-such-model (looked for {workspace}/no-such-model): no such directory, and not a hub id of the "
        "form 'owner/name'")
    rc, _, err = run_cli("generate", "--model", "models/glm-9b", "--prompt", "hi")  # shaped like a hub id
    line = err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith(f"error: models/glm-9b (looked for {workspace}/models/glm-9b): no such local "
                                       "directory; as a hub id ")
    assert "HF_HUB_OFFLINE is set" in line or "huggingface_hub is not installed" in line


# ---------------------------------------------------------------------------------------------------------------
# generate / chat / loss, as in the README.


def test_generate_readme_line_relative(workspace, converted, run_cli, monkeypatch):
    monkeypatch.chdir(workspace)
    rc, out, err = run_cli("generate", "--model", "./glm41v-9b", "--image", "cat.jpg", "--prompt",
                           "What kind of animal is this?", "--dtype", "bfloat16", "--max-new-tokens", "2", "--json",
                           "--verify")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert len(rec["token_ids"]) >= 1 and rec["prompt_token_ids"].count(151343) > 0  # the image's tokens


@pytest.mark.slow
def test_generate_spaces_from_another_directory(workspace, converted, run_cli, monkeypatch, tmp_path):
    spaced = tmp_path / "my models" / "glm 9b"
    shutil.copytree(converted, spaced)
    monkeypatch.chdir(os.path.join(workspace, "elsewhere"))
    rc, out, err = run_cli("generate", "--model", os.path.relpath(spaced), "--image", "../my images/a cat.jpg",
                           "--prompt", "Describe.", "--max-new-tokens", "2", "--json")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["prompt_token_ids"].count(151343) > 0


def test_chat_stdin_relative(workspace, converted, run_cli, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/image cat.jpg\nWhat animal is this?\n"))
    log = os.path.join(workspace, "chat log.jsonl")
    rc, out, err = run_cli("chat", "--model", "./glm41v-9b", "--max-new-tokens", "2", "--log-jsonl", "chat log.jsonl")
    assert rc == 0, err
    assert "error" not in err
    with open(log) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["prompt_token_ids"].count(151343) > 0  # the relative /image was read


@pytest.mark.slow
def test_loss_relative(workspace, converted, run_cli, monkeypatch):
    monkeypatch.chdir(workspace)
    rc, out, err = run_cli("loss", "--model", "./glm41v-9b", "--data", "smoke/train.jsonl", "--seq-len", "128",
                           "--json")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert np.isfinite(rec["loss"]) and rec["tokens"] > 0 and rec["samples"] > 0


def test_generate_verify_refuses_a_bit_flip(workspace, converted, run_cli, monkeypatch, tmp_path):
    shutil.copytree(converted, tmp_path / "flipped")
    data = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "flipped" / "params") for f in fs
            if os.path.basename(r) == "d"]
    path = max(data, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("generate", "--model", "flipped", "--prompt", "hi", "--verify")
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[")]
    assert rc == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path}/flipped: verification failed, 1 damaged: ")
    assert "(checksum mismatch)" in lines[0]
