"""Integrity of converted directories: the checksums and file sizes recorded at conversion, `glm41v verify`,
`load(..., verify=True)`, and damaged data files (deleted, truncated, bit-flipped, a broken format file) reported as
one error that names the checkpoint and the array or file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from glm41v_convert.hf_to_orbax import convert
from glm41v_jax import loading, tiny
from glm41v_jax.cli import main
from glm41v_jax.loading import FORMAT_FILE, CheckpointError
from glm41v_jax.weights import iter_leaves


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF dir, converted dir, the converted arrays as NumPy) of a small-vocab fp32 checkpoint."""
    root = tmp_path_factory.mktemp("verify")
    hf = tiny.write_random_hf_dir(root / "hf", 7, vocab_size=512)
    dst = convert(hf, str(root / "conv"), progress=False)
    params, _ = loading.load(dst, as_numpy=True)
    return hf, dst, {"/".join(p): a for p, a in iter_leaves(params)}


def _copy(converted, tmp_path) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(converted[1], d)
    return d


def _data_files(d: str) -> list[str]:
    """The data files under params/, largest first."""
    out = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "params")) for f in fs
           if os.path.basename(r) == "d"]
    return sorted(out, key=os.path.getsize, reverse=True)


def _fmt(d: str) -> dict:
    with open(os.path.join(d, FORMAT_FILE)) as f:
        return json.load(f)


def _edit_fmt(d: str, **changes) -> None:
    fmt = _fmt(d)
    for k, v in changes.items():
        if v is None:
            fmt.pop(k, None)
        else:
            fmt[k] = v
    with open(os.path.join(d, FORMAT_FILE), "w") as f:
        json.dump(fmt, f)


def _verify(capsys, *argv: str) -> tuple[int, str, list[str]]:
    rc = main(["verify", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


# ---------------------------------------------------------------------------------------------------------------


def _load_in_a_fresh_process(d: str) -> subprocess.CompletedProcess:
    """`loading.load(d)` in a new interpreter, a CheckpointError printed as the CLI does: whatever Orbax's
    abandoned reads print at exit shows up in its stderr."""
    code = ("import sys\nfrom glm41v_jax import loading\nfrom glm41v_jax.errors import one_line\n"
            "try:\n    loading.load(sys.argv[1], as_numpy=True)\nexcept loading.CheckpointError as e:\n"
            "    print('error:', one_line(e), file=sys.stderr)\n")
    return subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_checksums_and_sizes_recorded(converted):
    _, dst, arrays = converted
    fmt = _fmt(dst)
    assert fmt["checksums"]["algorithm"] == "crc32"
    recorded = fmt["checksums"]["arrays"]
    assert set(recorded) == set(arrays) and len(recorded) == fmt["num_tensors"]
    for name, arr in arrays.items():  # zlib over the bytes of the array read back, computed here
        assert recorded[name] == f"{zlib.crc32(np.ascontiguousarray(arr).tobytes()):08x}", name
    files = fmt["files"]
    assert files and all(k.startswith("params/") for k in files)
    for rel, size in files.items():
        assert os.path.getsize(os.path.join(dst, rel)) == size, rel
    with open(os.path.join(dst, "config.json"), "rb") as f:
        assert fmt["side_files"]["config.json"] == f"{zlib.crc32(f.read()):08x}"


def test_verify_ok(converted, capsys):
    rc, out, err = _verify(capsys, converted[1])
    assert rc == 0 and err == []
    assert out.startswith(f"OK {converted[1]}: {len(converted[2])} arrays")
    rc, out, err = _verify(capsys, converted[1], "--json")
    rec = json.loads(out)
    assert rc == 0 and rec["ok"] and rec["damaged"] == {} and rec["arrays"] == len(converted[2])


def test_bit_flip_is_named_by_verify_and_load_verify(converted, tmp_path, capsys):
    d = _copy(converted, tmp_path)
    path = _data_files(d)[0]
    with open(path, "r+b") as f:  # one bit in the middle of the largest data file
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x04]))
    # Which array changed, found by comparing with the arrays of the intact copy.
    flipped, _ = loading.load(d, as_numpy=True)  # a plain load only checks sizes: the flip passes unseen
    changed = [n for n, a in ((("/".join(p)), a) for p, a in iter_leaves(flipped))
               if not np.array_equal(a.view(np.uint8), converted[2][n].view(np.uint8))]
    assert len(changed) == 1
    rc, out, err = _verify(capsys, d)
    assert rc == 1
    assert out.splitlines() == [f"DAMAGED {changed[0]}: checksum mismatch: crc32 "
                                f"{zlib.crc32(flipped_bytes(flipped, changed[0])):08x}, "
                                f"{_fmt(d)['checksums']['arrays'][changed[0]]} recorded"]
    assert len(err) == 1 and err[0].startswith(f"error: {d}: verification failed, 1 damaged: {changed[0]} (checksum "
                                               "mismatch)")
    with pytest.raises(CheckpointError, match=rf"verification failed, 1 damaged: {changed[0]} \(checksum mismatch"):
        loading.load(d, as_numpy=True, verify=True)


def flipped_bytes(params: dict, name: str) -> bytes:
    node = params
    for k in name.split("/"):
        node = node[k]
    return np.ascontiguousarray(node).tobytes()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_data_file_is_one_error(converted, tmp_path, capsys, damage):
    d = _copy(converted, tmp_path)
    path = _data_files(d)[0]
    size = os.path.getsize(path)
    rel = os.path.relpath(path, d)
    if damage == "delete":
        os.remove(path)
        why = "missing"
    else:
        with open(path, "r+b") as f:
            f.truncate(size // 3)
        why = f"truncated to {size // 3} bytes, {size} written"
    with pytest.raises(CheckpointError) as e:
        loading.load(d, as_numpy=True)
    assert str(e.value) == (f"{d}: damaged converted checkpoint: 1 data file(s) missing or changed: {rel} ({why}); "
                            "convert again")
    rc, out, err = _verify(capsys, d)
    assert rc == 1 and f"DAMAGED {rel}: {why}" in out.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {d}: verification failed")


def test_damage_without_a_files_record_names_the_array(converted, tmp_path, capsys):
    """A directory converted before file sizes were recorded: TensorStore's read error becomes one line naming the
    array, and no 'Event loop is closed' noise follows (checked in a fresh process, where it would print at exit)."""
    d = _copy(converted, tmp_path)
    _edit_fmt(d, files=None, checksums=None, side_files=None)
    os.remove(_data_files(d)[0])
    with pytest.raises(CheckpointError, match=rf"^{d}: damaged converted checkpoint: array '[\w/]+' could not be read "
                                              r"\(DATA_LOSS: .*\); `glm41v verify .*` lists every damaged array"):
        loading.load(d, as_numpy=True)
    rc, out, err = _verify(capsys, d)
    assert rc == 1 and out.startswith("DAMAGED ") and ": unreadable: DATA_LOSS" in out
    p = _load_in_a_fresh_process(d)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 1 and lines[0].startswith(f"error: {d}: damaged"), p.stderr[-2000:]


def test_old_checkpoint_without_checksums(converted, tmp_path, capsys):
    d = _copy(converted, tmp_path)
    _edit_fmt(d, checksums=None, files=None, side_files=None)
    params, _ = loading.load(d, as_numpy=True)  # loads as before
    assert len(list(iter_leaves(params))) == len(converted[2])
    rc, out, err = _verify(capsys, d)
    assert rc == 2 and out == ""
    assert len(err) == 1 and "no checksums were recorded when it was written" in err[0]
    assert f"all {len(converted[2])} arrays read back without error" in err[0]
    with pytest.raises(CheckpointError, match=r"cannot verify: no checksums were recorded"):
        loading.load(d, verify=True)


def test_metadata_unreadable_is_not_reported_as_missing_arrays(converted, tmp_path):
    d = _copy(converted, tmp_path)
    _edit_fmt(d, files=None)
    os.remove(os.path.join(d, "params", "state", "_METADATA"))
    with pytest.raises(CheckpointError, match=r"params: unreadable Orbax checkpoint .*convert again") as e:
        loading.load(d, as_numpy=True)
    assert "missing" not in str(e.value).split("(")[0]


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"text"', "expected a JSON object, got str"),
    (b"\xff\xfe{", "not valid JSON"),
    (b"{" * 100000, "not valid JSON"),
    (b'{"format": "glm41v-jax-orbax", "format_version": 1, "checksums": [1]}', "field 'checksums' must be an object"),
    (b'{"format": "glm41v-jax-orbax", "format_version": 1, "files": {"params/x": "big"}}', "field 'files' must map"),
    (b'{"format": "glm41v-jax-orbax", "format_version": 1, "files": [3]}', "field 'files' must map file names"),
])
def test_broken_format_file(converted, tmp_path, capsys, content, message):
    d = _copy(converted, tmp_path)
    with open(os.path.join(d, FORMAT_FILE), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loading.load(d, as_numpy=True)
    rc, out, err = _verify(capsys, d)
    assert rc in (1, 2) and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in out


def test_verify_refuses_what_it_cannot_check(converted, tmp_path, capsys):
    hf = converted[0]
    rc, _, err = _verify(capsys, hf)
    assert rc == 2 and err == [f"error: {hf}: not a converted directory (no glm41v_jax.json); `glm41v verify` checks "
                               "the output of `glm41v convert`"]
    rc, _, err = _verify(capsys, str(tmp_path / "nope"))
    assert rc == 2 and err == [f"error: {tmp_path / 'nope'}: no such directory"]
    (tmp_path / "file").write_text("x")
    rc, _, err = _verify(capsys, str(tmp_path / "file"))
    assert rc == 2 and err == [f"error: {tmp_path / 'file'}: not a directory"]
    with pytest.raises(CheckpointError, match=r"cannot verify an HF checkpoint directory"):
        loading.load(hf, verify=True)


def test_side_file_damage_is_named(converted, tmp_path, capsys):
    d = _copy(converted, tmp_path)
    with open(os.path.join(d, "config.json"), "a") as f:
        f.write(" ")
    rc, out, _ = _verify(capsys, d)
    assert rc == 1 and out.startswith("DAMAGED config.json: checksum mismatch")


def test_data_file_overwritten_in_place_is_one_line(converted, tmp_path):
    """A data file overwritten with garbage of the same size passes the size check and fails inside Orbax's
    restore: one error line naming the array, in a fresh process, with none of the abandoned reads' reports
    ("Exception ignored in: <coroutine object ...>", "Event loop is closed") after it at exit."""
    d = _copy(converted, tmp_path)
    path = _data_files(d)[0]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    p = _load_in_a_fresh_process(d)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"error: {d}: damaged converted checkpoint: array '"), lines[0]
