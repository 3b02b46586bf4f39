"""Batched requests: `glm41v generate --batch-file` and `Pipeline.generate` on the embedded tiny checkpoint.

Every batched row must equal the same request generated alone (greedy), results come in input order, a malformed
line is reported with its line number while the others still run, and the summary line aggregates the timings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

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
