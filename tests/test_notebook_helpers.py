"""glm41v_jax.notebook: the helpers the notebooks use (boxes, metrics, loss plots, device report, compile cache)."""

from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from glm41v_jax import notebook as nb
from glm41v_jax.errors import Glm41vError
from glm41v_jax.programs import ProgramCache
from glm41v_train.metrics import MetricsWriter

BG = (255, 255, 255)


def _px(v: float, dim: int) -> int:
    # GLM-V's coordinates are 0..1000 of the image; written here from the spec, not from the code under test.
    return int(math.floor(v / 1000 * dim + 0.5))


@pytest.fixture
def white() -> Image.Image:
    return Image.new("RGB", (200, 100), BG)


# ------------------------------------------------------------------------------------------------ draw_boxes


def test_draw_boxes_from_an_answer_draws_the_edges_in_pixels_of_the_image(white):
    answer = "<think>look</think><answer>The cat: <|begin_of_box|>[[100,200,600,700]]<|end_of_box|></answer>"
    out = nb.draw_boxes(white, answer, width=2)
    assert out is not white and (np.asarray(white) == 255).all()  # input untouched
    x1, y1, x2, y2 = _px(100, 200), _px(200, 100), _px(600, 200), _px(700, 100)
    assert (x1, y1, x2, y2) == (20, 20, 120, 70)
    a = np.asarray(out)
    color = tuple(int(c) for c in a[(y1 + y2) // 2, x1])
    assert color != BG
    mid_x, mid_y = (x1 + x2) // 2, (y1 + y2) // 2
    for x, y in [(x1, mid_y), (x1 + 1, mid_y), (x2, mid_y), (x2 - 1, mid_y), (mid_x, y2), (mid_x, y2 - 1)]:
        assert tuple(a[y, x]) == color, (x, y)
    for x, y in [(mid_x, mid_y), (x1 + 3, mid_y), (x2 - 3, mid_y), (x1 - 1, mid_y), (x2 + 1, mid_y), (mid_x, y2 + 1)]:
        assert tuple(a[y, x]) == BG, (x, y)
    # the label sits above the box's top edge: the top edge's middle is drawn, the pixels just below it are not
    assert tuple(a[y1, mid_x]) == color and tuple(a[y1 + 3, mid_x]) == BG


def test_draw_boxes_from_a_list_with_points_and_labels(white):
    out = nb.draw_boxes(white, [[0, 0, 1000, 1000], [500, 500]], labels=[None, "p"], width=1)
    a = np.asarray(out)
    assert tuple(a[0, 0]) != BG and tuple(a[99, 199]) != BG  # edges of the image (1000 -> the last pixel)
    assert tuple(a[_px(500, 100), _px(500, 200)]) not in (BG, tuple(a[0, 0]))  # the point, in the second colour
    assert tuple(a[30, 30]) == BG


def test_draw_boxes_accepts_a_path_and_parsed_boxes(tmp_path, white):
    p = tmp_path / "w.png"
    white.save(p)
    boxes = [{"box_1000": [500, 0, 1000, 1000], "label": "right half"}]
    a = np.asarray(nb.draw_boxes(str(p), boxes, width=1))
    assert tuple(a[50, _px(500, 200)]) != BG and tuple(a[50, 50]) == BG


def test_draw_boxes_text_without_boxes_draws_nothing(white):
    assert np.array_equal(np.asarray(nb.draw_boxes(white, "<answer>no box here</answer>")), np.asarray(white))


@pytest.mark.parametrize("bad, match", [
    ("<|begin_of_box|>[[1, 2, 3]]<|end_of_box|>", "malformed box"),
    ("<|begin_of_box|>[[100, 200, 1200, 300]]<|end_of_box|>", "0..1000"),
    ("<|begin_of_box|>[[600, 200, 100, 300]]<|end_of_box|>", "x1 <= x2"),
    ([[1, 2, 3]], r"box 0: expected \[x1, y1, x2, y2\]"),
    ([[1, 2, "3", 4]], "finite numbers"),
    ([[0, 0, 10, 10]], "labels for 1 boxes"),
])
def test_draw_boxes_malformed_box_is_one_clear_error(white, bad, match):
    kw = {"labels": ["a", "b"]} if match.startswith("labels") else {}
    with pytest.raises(nb.NotebookError, match=match) as e:
        nb.draw_boxes(white, bad, **kw)
    assert isinstance(e.value, Glm41vError)


# ------------------------------------------------------------------------------------------------ metrics


@pytest.fixture
def run_dir(tmp_path):
    """A metrics.jsonl written by the trainer's own writer: 6 steps, evals at steps 3 and 6."""
    w = MetricsWriter(str(tmp_path), total_steps=6, tensorboard=False, progress=False)
    recs = []
    for step in range(1, 7):
        rec = {"step": step, "loss": 3.0 / step, "lr": 1e-4, "grad_norm": 1.0}
        if step % 3 == 0:
            rec.update(eval_loss=2.0 / step, eval_tokens=10)
        recs.append(rec)
    w.write(recs[:4])
    w.write(recs[4:])
    w.close()
    return tmp_path


def test_read_metrics_reads_the_writers_file(run_dir):
    recs = nb.read_metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == [3.0 / s for s in range(1, 7)]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert nb.read_metrics(run_dir / "metrics.jsonl") == recs


def test_read_metrics_leaves_out_a_last_line_being_written(run_dir):
    path = run_dir / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')
    assert [r["step"] for r in nb.read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_read_metrics_errors(tmp_path, run_dir):
    with pytest.raises(nb.NotebookError, match="metrics file not found"):
        nb.read_metrics(tmp_path / "nothing")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[2:]]) + "\n")
    with pytest.raises(nb.NotebookError, match="line 2 is not JSON"):
        nb.read_metrics(run_dir)


def test_plot_losses_draws_the_records(run_dir, tmp_path):
    recs = nb.read_metrics(run_dir)
    out = tmp_path / "loss.png"
    fig = nb.plot_losses(run_dir, out)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"train loss", "eval loss"}
    assert list(lines["train loss"].get_xdata()) == [r["step"] for r in recs]
    assert list(lines["train loss"].get_ydata()) == [r["loss"] for r in recs]
    assert list(lines["eval loss"].get_xdata()) == [3, 6]
    assert list(lines["eval loss"].get_ydata()) == [recs[2]["eval_loss"], recs[5]["eval_loss"]]
    assert Image.open(out).size[0] > 100


def test_loss_plot_redraws_and_saves(run_dir, tmp_path):
    recs = nb.read_metrics(run_dir)
    plot = nb.LossPlot(title="t")
    plot.update(recs[:2])
    assert list(plot.figure.axes[0].get_lines()[0].get_ydata()) == [recs[0]["loss"], recs[1]["loss"]]
    plot.update(recs)
    assert len(plot.figure.axes) == 1 and len(plot.figure.axes[0].get_lines()[0].get_xdata()) == 6
    assert plot.figure.axes[0].get_title() == "t"
    assert Image.open(plot.save(tmp_path / "p.png")).size[0] > 100


# ------------------------------------------------------------------------------------------------ mode, device


def test_test_mode_and_banner(monkeypatch, capsys):
    monkeypatch.setenv("GLM41V_NOTEBOOK_TEST", "1")
    assert nb.test_mode() is True
    nb.banner()
    assert capsys.readouterr().out == "TEST MODE: tiny model, tiny data (GLM41V_NOTEBOOK_TEST=1)\n"
    monkeypatch.setenv("GLM41V_NOTEBOOK_TEST", "0")
    assert nb.test_mode() is False
    assert nb.banner().startswith("REAL MODE")
    monkeypatch.delenv("GLM41V_NOTEBOOK_TEST")
    assert nb.test_mode() is False
    monkeypatch.setenv("GLM41V_NOTEBOOK_TEST", "maybe")
    with pytest.raises(nb.NotebookError, match="GLM41V_NOTEBOOK_TEST: expected 1"):
        nb.test_mode()
    capsys.readouterr()
    nb.skipped("pip install", "the venv has it")
    assert capsys.readouterr().out == "SKIPPED in test mode: pip install (the venv has it)\n"


def test_device_report_on_this_cpu():
    assert jax.device_count() == 8  # tests/conftest.py's XLA_FLAGS
    r = nb.device_report()
    assert (r.platform, r.device_count, r.hbm_bytes, r.verdict, r.tpu_type()) == ("cpu", 8, None, None, None)
    versions = dict(r.versions)
    assert versions["jax"] == jax.__version__ and set(versions) == {"jax", "jaxlib", "libtpu"}
    text = str(r)
    assert "platform: cpu" in text and "devices: 8 x" in text and f"jax {jax.__version__}" in text
    r = nb.device_report(expect="tpu-v5e-1")
    assert not r.ok and "CPU" in r.verdict and "tiny test model only" in r.verdict and ">= 16 GB" in r.verdict
    assert r.verdict in r.text()


def _tpus(n: int, kind: str, limit: int | None = None) -> list[SimpleNamespace]:
    stats = {"bytes_limit": limit} if limit else {}
    return [SimpleNamespace(platform="tpu", device_kind=kind, memory_stats=lambda: stats) for _ in range(n)]


def test_device_report_on_tpus():
    gib = 1 << 30
    r = nb.device_report("tpu-v5e-1", _tpus(1, "TPU v5 lite", int(15.75 * gib)))
    assert r.ok and r.verdict.startswith("as expected") and r.hbm_bytes == int(15.75 * gib)
    assert r.hbm_source == "memory_stats"
    assert r.tpu_type() == "v5e-1"
    r = nb.device_report("tpu-v5e-1", _tpus(8, "TPU v5 lite"))
    assert r.tpu_type() == "v5e-8" and nb.device_report(devices=_tpus(4, "TPU v5")).tpu_type() == "v5p-8"
    assert r.ok and "v5e-1 expected, found 8 chips: fine, the mesh uses all of them" in r.verdict
    assert r.hbm_bytes == 16 * gib and "published v5e" in r.hbm_source
    r = nb.device_report("tpu-v5e-8", _tpus(1, "TPU v5 lite"))
    assert not r.ok and "too little HBM" in r.verdict
    r = nb.device_report("tpu-v5e-1", _tpus(1, "TPU v6 lite"))
    assert r.ok and "v6e instead of a v5e" in r.verdict and "--tpu v6e-1" in r.verdict
    r = nb.device_report("tpu", _tpus(4, "TPU v4"))
    assert r.ok and r.verdict.startswith("as expected")
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA T4", memory_stats=lambda: {"bytes_limit": 15 * 10**9})
    r = nb.device_report("tpu-v5e-1", [gpu])
    assert not r.ok and "only the tiny test model runs" in r.verdict and "[gpu,hub]" in r.verdict
    with pytest.raises(nb.NotebookError, match="expected 'tpu' or 'tpu-<family>-<chips>'"):
        nb.device_report("v5e")


# ------------------------------------------------------------------------------------------------ compiles


def test_compile_report_and_the_persistent_cache(tmp_path):
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        path = nb.enable_compilation_cache(tmp_path / "cache" / "sub")
        assert path == str(tmp_path / "cache" / "sub") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        cache = ProgramCache()
        x = jnp.ones((3,))
        cache.compile(("a",), "prefill", "x=(3,)", lambda: jax.jit(lambda v: v * 2 + 1).lower(x).compile())
        cache.compile(("b",), "decode", "x=(3,) steps=2", lambda: jax.jit(lambda v: v - 1).lower(x).compile())
        report = nb.compile_report(cache)
        lines = report.splitlines()
        assert lines[1].split()[:2] == ["1", "prefill"] and lines[1].endswith("x=(3,)")
        assert lines[2].split()[:2] == ["2", "decode"] and lines[2].endswith("x=(3,) steps=2")
        total = sum(dt for _, _, _, dt in cache.entries())
        assert lines[3] == f"2 programs compiled, {total:.2f}s in all"
        assert sorted(f.split("-")[0] for f in os.listdir(path) if "lambda" in f) == ["jit__lambda"] * 2
        assert lines[4].startswith(f"persistent compilation cache: {path} (")  # both programs were written to it
        assert int(lines[4].rpartition("(")[2].split()[0]) == len([f for f in os.listdir(path) if f.endswith("-cache")])
        # the same program compiled again in a new cache (a restarted runtime) is read from the persistent cache
        hits = re.compile(r"this process: (\d+) of (\d+) XLA compiles read from it")
        before = [int(v) for v in hits.search(report).groups()]
        again = ProgramCache()
        again.compile(("a",), "prefill", "x=(3,)", lambda: jax.jit(lambda v: v * 2 + 1).lower(x).compile())
        after = [int(v) for v in hits.search(nb.compile_report(again)).groups()]
        assert after == [before[0] + 1, before[1] + 1]
        # moved after compiles have opened the cache: the next program is written to the new folder
        moved = nb.enable_compilation_cache(tmp_path / "moved")
        jax.jit(lambda v: v * 3 - 2).lower(x).compile()
        assert [f for f in os.listdir(moved) if f.startswith("jit__lambda")]
        with pytest.raises(nb.NotebookError, match="expected a Pipeline, an Engine or a ProgramCache"):
            nb.compile_report(object())
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        compilation_cache.reset_cache()  # the rest of the session compiles without the test's cache



def test_colab_folders(tmp_path, monkeypatch, capsys):
    """Test mode: a folder under the current directory and its jax_cache. Real mode off Colab: /content and the
    local cache, said in one line. On Colab: Google Drive mounted at /content/drive and the cache on it; the
    `google.colab` module is a stand-in here (Colab's own cannot run on this machine), recording the mount."""
    import sys
    import types

    monkeypatch.chdir(tmp_path)
    assert nb.colab_folders(True, "nb work") == (str(tmp_path / "nb work"), str(tmp_path / "nb work" / "jax_cache"))
    monkeypatch.setitem(sys.modules, "google.colab", None)  # import fails: not on Colab
    assert nb.colab_folders(False, "x") == ("/content", os.path.expanduser("~/.cache/glm41v_jax/jax_cache"))
    assert "not on Colab" in capsys.readouterr().out
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert nb.colab_folders(False, "x") == ("/content", "/content/drive/MyDrive/glm41v_jax_cache")
    assert mounted == ["/content/drive"]
