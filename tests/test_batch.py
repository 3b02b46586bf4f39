"""Batched requests: `glm41v generate --batch-file` and `Pipeline.generate` on the embedded tiny checkpoint.

Every batched row must equal the same request generated alone (greedy), results come in input order, a malformed
line is reported with its line number while the others still run, and the summary line aggregates the timings.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from glm41v_jax.generate import GenerationError
from glm41v_jax.pipeline import Pipeline, Request, RequestError, auto_mesh_spec


@pytest.fixture
def cli(run_cli):
    def call(*argv: str):
        rc, out, err = run_cli("generate", *argv)
        return rc, [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")], err

    return call


def _image(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_batch_file(cli, tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", 60, 90, 0)
    _image(tmp_path / "img" / "b.png", 40, 30, 1)
    lines = [
        {"prompt": "Describe the weather.", "max_new_tokens": 6},
        {"prompt": "What is in the picture?", "images": ["img/a.png"], "system": "Be brief."},
        "{not json",
        {"prompt": "Two pictures.", "images": ["img/a.png", "img/b.png"], "max_new_tokens": 9},
        {"prompt": "Missing image.", "images": ["img/nope.png"]},
        {"prompt": ""},
        {"prompt": "Hello", "colour": "red"},
        {"prompt": "The last one, short.", "max_new_tokens": 3},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    rc, recs, err = cli("--batch-file", str(path), "--batch-size", "3", "--max-new-tokens", "7", "--greedy")
    assert rc == 2  # some lines failed
    *results, summary = recs
    assert [r["line"] for r in results] == list(range(1, 9))
    bad = {3: "not valid JSON", 5: "image file not found", 6: "field 'prompt'", 7: "unknown field(s) 'colour'"}
    for r in results:
        if r["line"] in bad:
            assert bad[r["line"]] in r["error"] and f"error: {path}:{r['line']}: " in err
        else:
            assert {"prompt_token_ids", "token_ids", "text", "thinking", "answer", "timings"} <= set(r)
    limits = {1: 6, 2: 7, 4: 9, 8: 3}
    for r in results:
        if r["line"] in limits:
            assert 1 <= len(r["token_ids"]) <= limits[r["line"]]
    s = summary["summary"]
    assert s["requests"] == 8 and s["failed"] == 4 and s["batches"] == 2
    assert s["decode_tokens_per_s"] > 0 and s["num_compiles"] >= 2 and "prefill_s" in s
    # Each batched row equals the same request alone.
    for line, argv in ((2, ["--prompt", "What is in the picture?", "--image", str(tmp_path / "img" / "a.png"),
                            "--system", "Be brief.", "--max-new-tokens", "7"]),
                       (4, ["--prompt", "Two pictures.", "--image", str(tmp_path / "img" / "a.png"), "--image",
                            str(tmp_path / "img" / "b.png"), "--max-new-tokens", "9"])):
        rc1, (alone,), _ = cli("--json", "--greedy", *argv)
        assert rc1 == 0
        row = next(r for r in results if r["line"] == line)
        assert row["token_ids"] == alone["token_ids"] and row["prompt_token_ids"] == alone["prompt_token_ids"]


def test_batch_file_errors(cli, tmp_path):
    rc, _, err = cli("--batch-file", str(tmp_path / "none.jsonl"))
    assert rc == 2 and "batch file not found" in err
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    rc, _, err = cli("--batch-file", str(p))
    assert rc == 2 and "has no requests" in err
    rc, _, err = cli("--batch-file", str(p), "--prompt", "x")
    assert rc == 2 and "drop --prompt" in err
    rc, _, err = cli("--prompt", "x", "--batch-size", "0")
    assert rc == 2 and "error: argument --batch-size: expected an integer in [1, 65536], got '0'" in err


@pytest.mark.parametrize("mesh,msg", [("model=8", "unknown axis 'model'"), ("data=3", "uses 3 devices but 8"),
                                      ("tensor=x", "must be an integer")])
def test_bad_mesh(cli, mesh, msg):
    rc, _, err = cli("--prompt", "hi", "--mesh", mesh, "--max-new-tokens", "2")
    assert rc == 2 and msg in err and "Traceback" not in err


def test_too_long_and_empty_prompt(cli):
    rc, _, err = cli("--prompt", "hi " * 40, "--max-context", "64", "--max-new-tokens", "30")
    assert rc == 2 and "too long for the context of 64" in err
    rc, _, err = cli("--prompt", "   ")
    assert rc == 2 and "empty prompt" in err


def test_pipeline_api(tiny_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    pipe = Pipeline.load(mesh="data=2,tensor=4")
    _image(tmp_path / "x.png", 50, 70, 2)
    reqs = [Request("First?"), Request("Second, with a picture.", images=[str(tmp_path / "x.png")]),
            {"prompt": "Third.", "max_new_tokens": 2}]
    outs = pipe.generate(reqs, batch_size=2, max_new_tokens=5)
    assert [len(o["token_ids"]) <= n for o, n in zip(outs, (5, 5, 2), strict=True)] == [True] * 3
    alone = Pipeline.load(mesh=None)
    for req, out in zip(reqs, outs, strict=True):
        (a,) = alone.generate([req], max_new_tokens=5)
        assert a["token_ids"] == out["token_ids"]
    with pytest.raises(RequestError, match="image file not found"):
        pipe.generate([Request("x", images=[str(tmp_path / "missing.png")])])
    (err,) = pipe.generate([Request("x", images=[str(tmp_path / "missing.png")])], errors="return")
    assert "image file not found" in err["error"]
    assert auto_mesh_spec(32, 8) == "tensor=8,fsdp=1" and auto_mesh_spec(12, 8) == "tensor=4,fsdp=2"
    assert auto_mesh_spec(32, 1) is None


def test_hostile_lines_each_get_their_error(cli, tmp_path, monkeypatch):
    """Every hostile line is its own {"line", "error"} record (the others still run), exit code 2, no traceback."""
    import glm41v_jax.cli.generate as generate_cmd

    monkeypatch.setattr(generate_cmd, "MAX_LINE_BYTES", 300_000)
    _image(tmp_path / "a.png", 40, 40, 3)
    good = json.dumps({"prompt": "Good line.", "images": ["a.png"], "max_new_tokens": 2}).encode()
    hostile = [
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at column 16)"),
        (b'{"prompt": "hi", "max_new_tokens": ' + str(10**30).encode() + b"}",
         "field 'max_new_tokens': expected an integer in [1, 2147483647], got 1000000000000000000000000000000"),
        (b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit"),
        (b'{"prompt": "hi", "max_new_tokens": 2.5}', "field 'max_new_tokens': expected an integer"),
        (b'{"prompt": "hi", "max_new_tokens": true}', "field 'max_new_tokens': expected an integer"),
        (b'{"prompt": "hi", "max_new_tokens": "5"}', "field 'max_new_tokens': expected an integer"),
        (b'{"prompt": "hi", "max_new_tokens": 1e400}', "field 'max_new_tokens': expected an integer"),
        (b'{"prompt": "hi", "max_new_tokens": NaN}', "not valid JSON (NaN is not JSON)"),
        (b'{"prompt": "hi", "max_new_tokens": 0}', "got 0"),
        (b'{"prompt": "hi", "max_new_tokens": 70000}', "too long for the context"),
        (b'{"prompt": ["hi"]}', "field 'prompt': expected a string, got a JSON array"),
        (b'{"prompt": "\\ud800"}', "field 'prompt': not valid Unicode (lone surrogate"),
        (b'{"prompt": "hi", "system": {"a": 1}}', "field 'system': expected a string, got a JSON object"),
        (b'{"prompt": "hi", "images": 5}', "field 'images': expected a list of file paths"),
        (b'{"prompt": "hi", "images": [[[["a.png"]]]]}', "field 'images': expected a list of file paths"),
        (b'{"prompt": "hi", "images": ["a\\u0000.png"]}', "NUL character"),
        (b'{"prompt": "hi", "videos": [""]}', "field 'videos': expected a non-empty string"),
        (b'{"prompt": "hi", "\\ud800": 1}', "unknown field(s) '\\ud800'"),
        (b'[1, 2]', "expected a JSON object, got a JSON array"),
        (b'null', "expected a JSON object, got None"),
        (b'"just a string"', "expected a JSON object, got 'just a string'"),
        (b'{"prompt": "' + b"x" * 400_000 + b'"}', "line longer than 300000 bytes"),
        (b'{"prompt": "hi <|image|>", "images": []}', None),  # plain text by default: not a placeholder
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b"\n".join(line for line, _ in hostile) + b"\n\n" + good + b"\n")
    rc, recs, err = cli("--batch-file", str(path), "--batch-size", "2", "--max-new-tokens", "3")
    assert rc == 2, err
    assert "Traceback" not in err
    *results, summary = recs
    assert [r["line"] for r in results] == list(range(1, len(hostile) + 2)) + [len(hostile) + 3]
    for r, (_, needle) in zip(results[1:], hostile, strict=False):
        if needle is None:
            assert "token_ids" in r, r
        else:
            assert needle in r["error"], (needle, r)
            assert f"error: {path}:{r['line']}: " in err
    assert "token_ids" in results[0] and "token_ids" in results[-1]
    n_bad = sum(1 for _, needle in hostile if needle is not None)
    assert summary["summary"]["failed"] == n_bad and summary["summary"]["requests"] == len(hostile) + 2
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == n_bad


def test_stream_reads_one_batch_at_a_time(tiny_cache_dir, monkeypatch, tmp_path):
    """Pipeline.stream reads the requests lazily: the first batch's records come out before the third batch's
    requests are read, the order is the input order (errors included), and the records equal generate()'s."""
    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    pipe = Pipeline.load(mesh=None)
    reqs = [Request(f"Question {i}?", max_new_tokens=2 + i % 3) for i in range(7)]
    reqs.insert(3, RequestError("a bad line"))
    consumed = []

    def source():
        for i, r in enumerate(reqs):
            consumed.append(i)
            yield r

    seen = []
    for i, rec in pipe.stream(source(), batch_size=2, max_new_tokens=4, errors="return"):
        seen.append((i, len(consumed), rec))
    assert [i for i, _, _ in seen] == list(range(8))
    assert seen[0][1] <= 3  # the first record came out after at most one batch (+ the next request) was read
    assert seen[3][2] == {"error": "a bad line"}
    assert pipe.last_summary["requests"] == 8 and pipe.last_summary["failed"] == 1
    assert pipe.last_summary["batches"] == 4
    listed = pipe.generate(reqs, batch_size=2, max_new_tokens=4, errors="return")
    assert [r.get("token_ids") for _, _, r in seen] == [r.get("token_ids") for r in listed]
    with pytest.raises(RequestError, match="field 'max_new_tokens'"):
        Request("x", max_new_tokens=10**30)
    with pytest.raises(GenerationError, match="seed must be an integer"):
        list(pipe.stream([Request("x")], seed=2**63))


def test_batch_file_relative_path_with_spaces_from_elsewhere(cli, tmp_path, monkeypatch):
    """`--batch-file "my requests/r.jsonl"` typed from another directory: media paths resolve against the file's
    folder, not the working directory."""
    folder = tmp_path / "my requests"
    (folder / "pics dir").mkdir(parents=True)
    _image(folder / "pics dir" / "a b.png", 40, 50, 4)
    (folder / "r.jsonl").write_text(json.dumps({"prompt": "Look.", "images": ["pics dir/a b.png"]}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, recs, err = cli("--batch-file", "../my requests/r.jsonl", "--max-new-tokens", "2")
    assert rc == 0, err
    assert recs[0]["line"] == 1 and 151343 in recs[0]["prompt_token_ids"]


def test_batch_file_paths_that_are_not_regular_files(cli, tmp_path, monkeypatch):
    """A pipe (`--batch-file <(...)`) is read like a file (it used to be 'batch file not found'), /dev/null has no
    requests, a symlink loop and a directory are named as such; an image path that is a folder says so in its line's
    record (not 'not found'). Relative paths from the batch file's folder."""
    import threading

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs dir").mkdir()
    fifo = tmp_path / "requests pipe"
    os.mkfifo(fifo)
    lines = [{"prompt": "From a pipe.", "max_new_tokens": 2}, {"prompt": "A folder.", "images": ["imgs dir"]}]

    def feed() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(d) + "\n" for d in lines))

    writer = threading.Thread(target=feed)
    writer.start()
    rc, results, err = cli("--batch-file", "requests pipe", "--max-new-tokens", "2")
    writer.join(timeout=30)
    assert rc == 2 and "Traceback" not in err, err
    by_line = {r["line"]: r for r in results if "line" in r}
    assert by_line[1]["token_ids"] and "error" not in by_line[1]
    assert "image file is a directory" in by_line[2]["error"], by_line[2]
    rc, _, err = cli("--batch-file", os.devnull)
    assert rc == 2 and "has no requests" in err and "not found" not in err
    os.symlink("loop b", tmp_path / "loop a")
    os.symlink("loop a", tmp_path / "loop b")
    rc, _, err = cli("--batch-file", "loop a")
    assert rc == 2 and "symbolic link loop" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli("--prompt", "x", "--image", "loop a")
    assert rc == 2 and "image file is a broken symbolic link or a symbolic link loop: loop a" in err, err
