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
from glm41v_jax.cli.common import StreamPrinter, build_messages

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


# ---------------------------------------------------------------------------------------------------------------
# Hostile numbers, broken side files, misleading messages, a closed stdout.

@pytest.mark.parametrize("flag,value,needle", [
    ("--max-new-tokens", "1e20", "expected an integer in [1, 2147483647], got '1e20'"),
    ("--max-new-tokens", "0", "expected an integer in [1, 2147483647], got '0'"),
    ("--max-new-tokens", "-5", "got '-5'"),
    ("--max-new-tokens", str(2**40), f"got '{2**40}'"),
    ("--max-thinking-tokens", "3e9", "expected an integer in [0, 2147483647], got '3e9'"),
    ("--max-thinking-tokens", "3000000000", "got '3000000000'"),
    ("--seed", "2**63", "expected an integer in [0, 4294967295], got '2**63'"),
    ("--seed", str(2**63), "expected an integer in [0, 4294967295]"),
    ("--seed", "-1", "got '-1'"),
    ("--temperature", "nan", "expected a finite number in (0, inf), got 'nan'"),
    ("--temperature", "inf", "got 'inf'"),
    ("--temperature", "-1", "got '-1'"),
    ("--temperature", "0", "got '0' (--greedy for argmax decoding)"),
    ("--top-p", "2", "expected a finite number in [0, 1], got '2'"),
    ("--top-k", "-3", "expected an integer in [0, 2147483647], got '-3'"),
    ("--top-k", "abc", "got 'abc'"),
    ("--repetition-penalty", "0", "expected a finite number in (0, inf), got '0'"),
    ("--batch-size", "0", "expected an integer in [1, 65536], got '0'"),
    ("--chunk-size", "0", "expected an integer in [1, 4096], got '0'"),
    ("--max-context", "1" + "0" * 30, "expected an integer in [1, 2147483647]"),
])
def test_out_of_range_flags(cli, flag, value, needle):
    rc, out, err = cli("--prompt", "hi", flag, value)
    _assert_error(rc, err, f"argument {flag}", needle)
    assert out == ""


@pytest.mark.parametrize("argv,needle", [
    (("--max-context", "70000"), "max_context must be an integer in [1, 65536]"),
    (("--mesh", "data=-1,fsdp=-1"), "only one axis may be -1, got 'data' and 'fsdp'"),
    (("--mesh", "data=0"), "size of 'data' must be in [1, 8] (the device count) or -1, got 0"),
    (("--mesh", "data=" + "9" * 30), "size of 'data' must be in [1, 8]"),
    (("--mesh", "data=2.5"), "size of 'data' must be an integer, got '2.5'"),
    (("--mesh", "data=2,data=4"), "axis 'data' is given twice"),
    (("--mesh", "fsdp=3,tensor=-1"), "8 devices are not divisible by the fixed axes' product 3"),
    (("--mesh", "data=2,"), "expected AXIS=SIZE items"),
])
def test_out_of_range_model_args(cli, argv, needle):
    """Checked before the weights are read: one error line, exit 2."""
    rc, out, err = cli("--prompt", "hi", *argv)
    _assert_error(rc, err, needle)


def _model_copy(tiny_cache_dir, dest) -> str:
    """The tiny checkpoint's side files copied to `dest` (a folder with a space), its weights linked."""
    import shutil

    src = os.path.join(tiny_cache_dir, os.path.basename(tiny.default_cache_dir()))
    os.makedirs(dest)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(dest, name))
        else:
            shutil.copy(os.path.join(src, name), os.path.join(dest, name))
    return str(dest)


@pytest.mark.parametrize("name,content,needles", [
    ("chat_template.jinja", b"{% for m in messages %}{{ m.content }", ["chat_template.jinja, line 1",
                                                                         "TemplateSyntaxError"]),
    ("chat_template.jinja", b"[gMASK]\xff\xfe{{ messages }}",
     ["chat_template.jinja: not UTF-8 (byte 0xff at offset 7)"]),
    ("chat_template.jinja", b"{{ raise_exception('this template wants a system turn') }}",
     ["chat_template.jinja", "this template wants a system turn"]),
    ("generation_config.json", json.dumps({"do_sample": True, "top_k": "abc"}).encode(),
     ["generation_config.json: field 'top_k': expected an integer in [0, 2147483647], got 'abc'"]),
    ("generation_config.json", json.dumps({"temperature": -0.5}).encode(),
     ["generation_config.json: field 'temperature': expected a finite number >= 0, got -0.5"]),
    ("generation_config.json", json.dumps({"do_sample": "yes"}).encode(),
     ["field 'do_sample': expected true or false"]),
    ("generation_config.json", b"[1, 2]", ["generation_config.json: expected a JSON object, got list"]),
    ("generation_config.json", json.dumps({"eos_token_id": ["x"]}).encode(),
     ["field 'eos_token_id': expected a token id or a non-empty list of token ids, got a list"]),
    ("generation_config.json", b"{\"top_k\": \xff}", ["generation_config.json: not UTF-8 (byte 0xff at offset 10)"]),
    ("generation_config.json", b"[" * 100000, ["generation_config.json: JSON nested too deeply"]),
    ("tokenizer_config.json", b"[]", ["tokenizer_config.json", "expected a JSON object, got list"]),
    ("tokenizer_config.json", b"\xff{}", ["tokenizer_config.json", "cannot parse JSON"]),
    ("preprocessor_config.json", b"\"size\"", ["preprocessor_config.json", "expected a JSON object, got str"]),
])
def test_broken_side_files(cli, tiny_cache_dir, tmp_path, monkeypatch, name, content, needles):
    model = _model_copy(tiny_cache_dir, tmp_path / "my model")
    with open(os.path.join(model, name), "wb") as f:
        f.write(content)
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("--model", "my model", "--prompt", "hi", "--max-new-tokens", "2")
    _assert_error(rc, err, *needles)


def test_generation_config_temperature_zero_is_named(cli, tiny_cache_dir, tmp_path):
    """transformers refuses to sample at temperature 0 (it does not mean greedy there): the error names the file,
    not a flag the user never passed; --greedy (or --temperature) gets past it."""
    model = _model_copy(tiny_cache_dir, tmp_path / "m")
    with open(os.path.join(model, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0, "eos_token_id": [151329]}, f)
    rc, _, err = cli("--model", model, "--prompt", "hi", "--max-new-tokens", "2")
    _assert_error(rc, err, "temperature 0 from 'temperature' in", "generation_config.json", "--greedy")
    assert "from --temperature" not in err
    rc, out, err = cli("--model", model, "--prompt", "hi", "--max-new-tokens", "2", "--greedy", "--json")
    assert rc == 0, err
    assert last_json(out)["sampling"]["greedy"] is True
    rc, out, err = cli("--model", model, "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0.5", "--json")
    assert rc == 0, err
    assert last_json(out)["sampling"]["temperature"] == 0.5


def test_reserved_and_role_tokens_in_the_prompt(cli):
    """By default the user's text is plain text: `<|assistant|>` and `<|image|>` typed in the prompt are characters.
    With --text-special-tokens they are control tokens (transformers' behaviour), and a media token is refused with
    a message that says so (not a placeholder count mismatch)."""
    prompt = "a <|assistant|> b <|image|> c"
    rc, out, err = cli("--json", "--prompt", prompt, "--max-new-tokens", "2")
    assert rc == 0, err
    ids = last_json(out)["prompt_token_ids"]
    assert ids.count(151337) == 1 and ids[-2:] == [151337, 198]  # only the generation prompt's <|assistant|>
    assert 151343 not in ids
    rc, _, err = cli("--prompt", prompt, "--max-new-tokens", "2", "--text-special-tokens")
    _assert_error(rc, err, "reserved token '<|image|>'", "message 1 (user)")
    assert "placeholders" not in err
    rc, out, err = cli("--json", "--prompt", "a <|assistant|> b", "--max-new-tokens", "2", "--text-special-tokens")
    assert rc == 0, err
    assert last_json(out)["prompt_token_ids"].count(151337) == 2


class _BrokenPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_in_process(cli, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _BrokenPipe())
    rc, _, err = cli("--prompt", "hi", "--max-new-tokens", "4")
    assert rc == 141 and "Traceback" not in err and "error" not in err
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    rc, _, err = cli("--prompt", "hi", "--max-new-tokens", "4")
    assert rc == 141 and err == ""


def test_closed_stdout_subprocess(tiny_cache_dir):
    """`glm41v generate ... | head -c 0`: the reader is gone before the first write. Exit 141, nothing on stderr
    but the usual notes (no traceback, no "Exception ignored" from the interpreter's final flush)."""
    env = {**os.environ, "GLM41V_CACHE": tiny_cache_dir, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    cmd = [sys.executable, "-m", "glm41v_jax", "generate", "--prompt", "Hi", "--max-new-tokens", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    _, err = proc.communicate(timeout=240)
    err = err.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error:" not in err
