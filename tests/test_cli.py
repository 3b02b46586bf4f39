"""`glm41v generate` on the embedded tiny checkpoint: JSON output, images, streaming labels, errors (exit 2)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glm41v_jax import tiny
from glm41v_jax.generate_cli import StreamPrinter, build_messages

REQUIRED = {"prompt_token_ids", "token_ids", "text", "thinking", "answer", "timings", "num_compiles"}


@pytest.fixture
def cli(run_cli):
    return lambda *argv: run_cli("generate", *argv)


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1])


def test_json_tiny(cli):
    rc, out, err = cli("--json", "--prompt", "Describe the weather.", "--max-new-tokens", "8")
    assert rc == 0, err
    rec = last_json(out)
    assert set(rec) >= REQUIRED
    assert 1 <= len(rec["token_ids"]) <= 8
    assert rec["prompt_token_ids"][:2] == [151331, 151333]
    assert rec["prompt_token_ids"][-2:] == [151337, 198]
    assert {"prefill_s", "decode_tokens_per_s", "compile_s"} <= set(rec["timings"])
    assert rec["num_compiles"] >= 1
    assert "random" in err.lower() and "meaningless" in err.lower()


def test_image_and_sampling(cli, tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "pic.png"
    Image.fromarray(img).save(path)
    args = ("--json", "--image", str(path), "--prompt", "What is in the picture?", "--max-new-tokens", "6",
            "--system", "Be brief.")
    rc, out, err = cli(*args)
    assert rc == 0, err
    rec = last_json(out)
    ids = rec["prompt_token_ids"]
    assert ids[:3] == [151331, 151333, 151335]  # [gMASK] <sop> <|system|>
    assert 151339 in ids and ids.count(151343) > 0 and 151340 in ids
    assert ids.index(151339) < ids.index(151340) < len(ids) - 2
    assert len(rec["token_ids"]) <= 6
    samp = ("--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "7")
    rc1, out1, _ = cli(*args, *samp)
    rc2, out2, _ = cli(*args, *samp)
    assert rc1 == rc2 == 0
    r1, r2 = last_json(out1), last_json(out2)
    assert r1["sampling"]["greedy"] is False and r1["sampling"]["repetition_penalty"] == 1.1
    assert r1["token_ids"] == r2["token_ids"]


def test_console_subprocess(tiny_cache_dir):
    env = {**os.environ, "GLM41V_CACHE": tiny_cache_dir, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    cmd = [sys.executable, "-m", "glm41v_jax", "generate", "--json", "--prompt", "Hi", "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rec = last_json(proc.stdout)
    assert set(rec) >= REQUIRED
    assert len(rec["token_ids"]) <= 8 and rec["prompt_token_ids"][:2] == [151331, 151333]


def _assert_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_image(cli, tmp_path):
    missing = str(tmp_path / "nope.png")
    rc, _, err = cli("--image", missing, "--prompt", "hi")
    _assert_error(rc, err, "image", missing)


def test_empty_prompt(cli):
    rc, _, err = cli("--prompt", "   ")
    _assert_error(rc, err, "empty prompt")


def test_corrupt_image(cli, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    rc, _, err = cli("--image", str(bad), "--prompt", "hi")
    _assert_error(rc, err, str(bad))


def test_bad_model_path(cli, tmp_path):
    rc, _, err = cli("--model", str(tmp_path / "no_such_model"), "--prompt", "hi")
    _assert_error(rc, err, "no_such_model")


def test_too_long(cli):
    rc, _, err = cli("--prompt", "hi", "--max-new-tokens", "70000")
    _assert_error(rc, err, "too long")


def test_stream_printer_sections():
    tok = tiny.build_tokenizer()
    ids = tok.encode("<think>some thought</think><answer>the answer").ids
    buf = io.StringIO()
    printer = StreamPrinter(lambda x: tok.decode(x, skip_special_tokens=True), buf)
    for i in range(0, len(ids), 3):
        printer.feed(ids[i:i + 3])
    text = printer.finish()
    assert text == "<think>some thought</think><answer>the answer"
    assert buf.getvalue() == "thinking:\nsome thought\n\nanswer:\nthe answer\n"


def test_build_messages_order():
    msgs = build_messages("q", ["a.png", "b.png"], ["v.mp4"], system="s")
    assert msgs[0] == {"role": "system", "content": "s"}
    assert [c["type"] for c in msgs[1]["content"]] == ["image", "image", "video", "text"]


def test_image_then_video(cli, tmp_path):
    av = pytest.importorskip("av")
    video = str(tmp_path / "clip.mp4")
    with av.open(video, "w") as c:
        s = c.add_stream("mpeg4", rate=2)
        s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
        for i in range(6):
            arr = np.random.default_rng(i).integers(0, 255, (84, 112, 3), dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    image = tmp_path / "pic.png"
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(image)
    rc, out, err = cli("--json", "--image", str(image), "--video", video, "--prompt", "What happens?",
                       "--max-new-tokens", "4")
    assert rc == 0, err
    ids = last_json(out)["prompt_token_ids"]
    assert ids.index(151339) < ids.index(151341) < ids.index(151342)  # image first, then the video span
    assert ids.count(151339) >= 3  # the image + at least two temporal groups (>= 4 frames)
