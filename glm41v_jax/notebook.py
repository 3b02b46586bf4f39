"""What the notebooks in notebooks/ would otherwise write as helper code: the device check, the test-mode switch,
boxes drawn on an image, the training metrics and their loss plot, the compile figures and the persistent
compilation cache.

Nothing here imports Jupyter: IPython (to show a live plot) and matplotlib (to draw one) are imported inside the
functions that need them, so the module imports anywhere the package does.

    from glm41v_jax import notebook as nb
    TEST = nb.test_mode()                   # GLM41V_NOTEBOOK_TEST=1: the tiny model and data, as CI runs it
    nb.banner(TEST)                         # "TEST MODE: tiny model, tiny data (GLM41V_NOTEBOOK_TEST=1)"
    print(nb.device_report(expect="tpu-v5e-1"))
    nb.enable_compilation_cache("/content/drive/MyDrive/glm41v_jax_cache")   # before the first compile
    nb.draw_boxes("cat.png", answer)        # the answer's <|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|> boxes
    plot = nb.LossPlot(title="LoRA"); plot.update(nb.read_metrics(run_dir))
    print(nb.compile_report(pipe))
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from PIL import Image, ImageDraw

from .errors import Glm41vError
from .processing.image import load_image
from .thinking import BOX_RE, parse_response
from .tpu_slices import FAMILIES, GiB

TEST_ENV = "GLM41V_NOTEBOOK_TEST"
METRICS_FILE = "metrics.jsonl"  # train/metrics.py's MetricsWriter writes OUTPUT_DIR/metrics.jsonl
NINE_B_MIN_HBM = 16 * GiB  # the 9B in weight-only int8 needs one 16 GB chip (README "Run the 9B on a 16 GB chip")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
# jax device_kind (lower case) -> tpu_slices.FAMILIES key; first hit wins ("tpu v5" alone is the v5p).
_TPU_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
              ("tpu v5", "v5p"), ("tpu v4", "v4"))
COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (210, 245, 60))


class NotebookError(Glm41vError, ValueError):
    """Bad input to a notebook helper (a malformed box, a missing metrics file, a bad switch value)."""


# ---------------------------------------------------------------------------------------------------------------
# Test mode.


def test_mode(env: str = TEST_ENV) -> bool:
    """Whether the notebook runs in test mode (the tiny model and data): the environment variable `env` is 1, true,
    yes or on; unset, empty, 0, false, no or off is the real mode. Any other value is a NotebookError."""
    raw = os.environ.get(env, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise NotebookError(f"environment variable {env}: expected 1 (test mode) or 0 / unset (real mode), got {raw!r}")


test_mode.__test__ = False  # not a pytest test, whatever its name


def banner(test: bool | None = None, *, real: str = "GLM-4.1V-9B-Thinking from the Hub", env: str = TEST_ENV) -> str:
    """Print (and return) the one line that says which mode the notebook runs in. `test`: None reads `env`."""
    if test is None:
        test = test_mode(env)
    line = (f"TEST MODE: tiny model, tiny data ({env}=1)" if test
            else f"REAL MODE: {real} (set {env}=1 for the tiny test run)")
    print(line, flush=True)
    return line


def skipped(what: str, why: str) -> str:
    """Print (and return) "SKIPPED in test mode: <what> (<why>)": a cell that does not run in test mode says so."""
    line = f"SKIPPED in test mode: {what} ({why})"
    print(line, flush=True)
    return line


# ---------------------------------------------------------------------------------------------------------------
# Device report.


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tpu_family(device_kind: str) -> str | None:
    """The TPU family ("v5e", "v6e", "v5p", "v4") of a jax `device_kind` ("TPU v5 lite", ...), or None."""
    kind = device_kind.lower()
    return next((fam for key, fam in _TPU_KINDS if key in kind), None)


def _parse_expect(expect: str) -> tuple[str | None, int | None]:
    """'tpu' -> (None, None); 'tpu-v5e-1' -> ('v5e', 1)."""
    m = re.fullmatch(r"tpu(?:-(v5e|v6e|v5p|v4)-(\d+))?", str(expect).strip().lower())
    if m is None:
        raise NotebookError(f"device_report(expect=...): expected 'tpu' or 'tpu-<family>-<chips>' (e.g. 'tpu-v5e-1', "
                            f"'tpu-v5e-8'; families {', '.join(FAMILIES)}), got {expect!r}")
    return m.group(1), (int(m.group(2)) if m.group(2) else None)


def _gib(b: int | None) -> str:
    return "unknown" if b is None else f"{b / GiB:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What the notebook runs on. hbm_bytes: per device, from the runtime (`memory_stats()["bytes_limit"]`) when it
    reports it, else the published per-chip figure of the TPU family (hbm_source says which); None when unknown
    (CPU). verdict: a plain sentence of what will and will not work when `expect` was given, else None; ok: the
    device is what the notebook was written for (or better)."""

    platform: str
    device_kind: str
    device_count: int
    hbm_bytes: int | None
    hbm_source: str
    versions: tuple[tuple[str, str], ...]
    expect: str | None = None
    verdict: str | None = None
    ok: bool = True

    def text(self) -> str:
        lines = [f"platform: {self.platform}",
                 f"devices: {self.device_count} x {self.device_kind}",
                 f"HBM per device: {_gib(self.hbm_bytes)} ({self.hbm_source})",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in self.versions)]
        if self.verdict is not None:
            lines.append(f"expected {self.expect}: {self.verdict}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def tpu_type(self) -> str | None:
        """The Cloud TPU type of these devices as `glm41v plan --tpu` takes it ("v5e-1", "v5e-8", "v5p-8"), or None
        off a TPU or for a family plan does not know."""
        fam = tpu_family(self.device_kind) if self.platform == "tpu" else None
        if fam is None:
            return None
        return f"{fam}-{self.device_count * (2 if FAMILIES[fam].counts_cores else 1)}"


def _verdict(expect: str, platform: str, kind: str, count: int, hbm: int | None) -> tuple[str, bool]:
    want_family, want_chips = _parse_expect(expect)
    want = f"TPU {want_family}-{want_chips}" if want_family else "a TPU"
    if platform == "cpu":
        return (f"CPU, no TPU ({want} expected): this notebook runs the tiny test model only; the 9B needs a TPU "
                f"with >= {NINE_B_MIN_HBM // GiB} GB of HBM per chip (int8 weights)."), False
    if platform != "tpu":
        fits = hbm is not None and hbm >= NINE_B_MIN_HBM * 0.95
        return (f"{count} x {platform.upper()} {kind} ({want} expected): the JAX code runs here too (install "
                f"glm41v-jax[gpu,hub] instead of [tpu]); " + (
                    "the 9B in int8 fits its memory; " if fits else
                    f"the 9B needs >= {NINE_B_MIN_HBM // GiB} GB per device, this one has {_gib(hbm)}: only the "
                    "tiny test model runs; ") + "the `glm41v plan` table below is for TPUs, not this device."), fits
    family = tpu_family(kind)
    need = NINE_B_MIN_HBM * (want_chips or 1)  # what the notebook's slice has in all
    if hbm is not None and hbm * count < 0.95 * need:
        return (f"{count} x {kind} with {_gib(hbm)} each ({want} expected): too little HBM for what this notebook "
                f"runs on the 9B ({need // GiB} GB in all); only the tiny test model runs."), False
    notes = []
    ok = True
    if want_family and family != want_family:
        notes.append(f"a {family or kind} instead of a {want_family}: fine for memory, but the `glm41v plan` table "
                     f"below is for {want_family}-{want_chips}; run it with --tpu "
                     f"{family or want_family}-{count} for this machine")
    if want_chips is not None and count != want_chips:
        if count > want_chips:
            notes.append(f"{want_family}-{want_chips} expected, found {count} chips: fine, the mesh uses all of them")
        else:
            ok = False
            notes.append(f"{want_family}-{want_chips} expected, found {count} chip{'s' * (count > 1)}: the steps "
                         f"sized for {want_chips} chips may not fit; check with `glm41v plan --tpu "
                         f"{family or want_family}-{count}`")
    if not notes:
        return f"as expected ({count} x {kind}).", True
    return "; ".join(notes) + ".", ok


def device_report(expect: str | None = None, devices: Sequence[Any] | None = None) -> DeviceReport:
    """The platform, device kind and count, HBM per device and the jax / jaxlib / libtpu versions; with `expect`
    ('tpu', 'tpu-v5e-1', 'tpu-v5e-8', ...), a plain sentence of what will and will not work on what was found.
    `devices`: the jax devices to describe (default `jax.devices()`)."""
    if expect is not None:
        _parse_expect(expect)
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise NotebookError("device_report: no devices")
    d0 = devs[0]
    platform = str(d0.platform)
    kind = str(getattr(d0, "device_kind", platform))
    hbm, source = None, "not reported"
    try:
        stats = d0.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats (CPU)
        stats = None
    if stats and stats.get("bytes_limit"):
        hbm, source = int(stats["bytes_limit"]), "memory_stats"
    elif platform == "tpu" and tpu_family(kind) is not None:
        fam = tpu_family(kind)
        hbm, source = FAMILIES[fam].hbm_bytes, f"published {fam} figure"
    versions = tuple((name, _version(name)) for name in ("jax", "jaxlib", "libtpu"))
    verdict, ok = (None, True) if expect is None else _verdict(expect, platform, kind, len(devs), hbm)
    return DeviceReport(platform, kind, len(devs), hbm, source, versions, expect, verdict, ok)


# ---------------------------------------------------------------------------------------------------------------
# Boxes.


def _check_coords(vals: Any, where: str) -> list[float]:
    if isinstance(vals, (str, bytes)) or not isinstance(vals, Sequence) or len(vals) not in (2, 4):
        raise NotebookError(f"{where}: expected [x1, y1, x2, y2] (a box) or [x, y] (a point) in 0..1000, got "
                            f"{vals!r}")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise NotebookError(f"{where}: coordinates must be finite numbers, got {vals!r}")
        out.append(float(v))
    if not all(0 <= v <= 1000 for v in out):
        raise NotebookError(f"{where}: coordinates are normalised to 0..1000 of the image, got {vals!r}")
    if len(out) == 4 and (out[2] < out[0] or out[3] < out[1]):
        raise NotebookError(f"{where}: a box is [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {vals!r}")
    return out


def _shapes_from_text(text: str, size: tuple[int, int]) -> list[tuple[list[float], str | None]]:
    parsed = parse_response(text, size)
    found = [(b["box_1000"], b["label"], b["text"]) for b in parsed["boxes"]]
    found += [(p["point_1000"], p["label"], p["text"]) for p in parsed["points"]]
    for span in BOX_RE.findall(text):  # a <|begin_of_box|> span with nothing drawable in it is a malformed box
        if span.strip() and not any(t in span for _, _, t in found):
            raise NotebookError(f"answer: a malformed box {span.strip()[:80]!r} between <|begin_of_box|> and "
                                "<|end_of_box|>; expected [[x1,y1,x2,y2]] or [[x,y]] in 0..1000")
    return [(_check_coords(v, f"answer box {t!r}"), label) for v, label, t in found]


def _to_px(v: float, dim: int) -> int:
    """0..1000 -> pixel index, as thinking.py maps coordinates (round half up), kept inside the image."""
    return min(max(math.floor(v * dim / 1000.0 + 0.5), 0), dim - 1)


def draw_boxes(image: Image.Image | str | os.PathLike, answer_or_boxes: str | Sequence[Any], *,
               labels: Sequence[str | None] | None = None, width: int = 3) -> Image.Image:
    """A copy of `image` (a PIL image or a file path) with boxes and points drawn on it; the input is untouched.

    answer_or_boxes: the model's reply text (its `<|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>` boxes and
    `[[x,y]]` points, as `thinking.parse_response` reads them, labels included), or a list of boxes
    [x1, y1, x2, y2] / points [x, y] / parse_response's Box and Point dicts. Coordinates are GLM-V's: normalised to
    0..1000 of the image, origin top-left; a pixel is round(x / 1000 * width) (thinking.py's rule), the right and
    bottom edges clamped into the image. labels: one per box / point, overriding the parsed ones.
    A malformed box (wrong count, not numbers, outside 0..1000, x2 < x1, a box tag with no coordinates in it) is a
    NotebookError. Text with no box draws nothing.
    """
    if isinstance(image, Image.Image):
        img = image.convert("RGB") if image.mode != "RGB" else image.copy()
    elif isinstance(image, (str, os.PathLike)):
        img = load_image(image)
    else:
        raise NotebookError(f"draw_boxes: image must be a PIL image or a file path, got {type(image).__name__}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise NotebookError(f"draw_boxes: width must be an integer >= 1, got {width!r}")
    w, h = img.size
    if isinstance(answer_or_boxes, str):
        shapes = _shapes_from_text(answer_or_boxes, (w, h))
    elif isinstance(answer_or_boxes, Sequence):
        shapes = []
        for i, item in enumerate(answer_or_boxes):
            label = None
            if isinstance(item, Mapping):
                label = item.get("label")
                item = item.get("box_1000", item.get("point_1000"))
            shapes.append((_check_coords(item, f"box {i}"), label))
    else:
        raise NotebookError(f"draw_boxes: expected the answer text or a list of boxes, got "
                            f"{type(answer_or_boxes).__name__}")
    if labels is not None:
        if len(labels) != len(shapes):
            raise NotebookError(f"draw_boxes: {len(labels)} labels for {len(shapes)} boxes/points")
        shapes = [(v, lab) for (v, _), lab in zip(shapes, labels, strict=True)]
    draw = ImageDraw.Draw(img)
    for i, (v, label) in enumerate(shapes):
        color = COLORS[i % len(COLORS)]
        if len(v) == 4:
            x1, y1, x2, y2 = _to_px(v[0], w), _to_px(v[1], h), _to_px(v[2], w), _to_px(v[3], h)
            draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
            anchor = (x1, y1)
        else:
            x, y = _to_px(v[0], w), _to_px(v[1], h)
            r = max(3, 2 * width)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
            anchor = (x + r, y - r)
        if label:
            tx, ty = anchor[0], max(0, anchor[1] - 12)
            box = draw.textbbox((tx, ty), str(label))
            draw.rectangle(box, fill=color)
            draw.text((tx, ty), str(label), fill=(255, 255, 255))
    return img


# ---------------------------------------------------------------------------------------------------------------
# Training metrics and loss plots.


def read_metrics(run_dir_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a training run's metrics.jsonl (`glm41v train`'s OUTPUT_DIR, or the file itself), one dict
    per logged step: "step", "loss", "lr", ..., and "eval_loss" on the steps an eval ran. A last line cut short
    (a run still writing) is left out; a bad line before it is a NotebookError."""
    path = os.fspath(run_dir_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise NotebookError(f"metrics file not found: {path} (glm41v train writes OUTPUT_DIR/{METRICS_FILE})")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    out = []
    for i, ln in enumerate(lines[:last + 1]):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == last:
                break  # being written
            raise NotebookError(f"{path}: line {i + 1} is not JSON ({e.msg}): {ln[:80]!r}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise NotebookError(f"{path}: line {i + 1}: expected a JSON object with an integer 'step', got "
                                f"{ln[:80]!r}")
        out.append(rec)
    return out


def _records(records_or_run_dir: Sequence[Mapping[str, Any]] | str | os.PathLike) -> list[Mapping[str, Any]]:
    if isinstance(records_or_run_dir, (str, os.PathLike)):
        return read_metrics(records_or_run_dir)
    return list(records_or_run_dir)


def loss_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` ("loss", "eval_loss") over the records that hold a number for it."""
    steps, vals = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(r["step"]))
            vals.append(float(v))
    return steps, vals


def _draw_losses(fig: Any, records: Sequence[Mapping[str, Any]], title: str | None) -> None:
    fig.clear()
    ax = fig.add_subplot(1, 1, 1)
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, vals = loss_series(records, key)
        if steps:
            ax.plot(steps, vals, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    if ax.get_lines():
        ax.legend()
    ax.grid(True, alpha=0.3)


def _new_figure() -> Any:
    from matplotlib.figure import Figure  # no pyplot: no backend, and no second copy shown at the end of a cell

    return Figure(figsize=(7, 4), dpi=100, layout="tight")


def plot_losses(records_or_run_dir: Sequence[Mapping[str, Any]] | str | os.PathLike,
                path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
    """A matplotlib Figure of the train loss (every logged step) and the eval loss (the steps an eval ran) against
    the step, from metrics records or a run directory; saved to `path` (PNG, ...) when given."""
    fig = _new_figure()
    _draw_losses(fig, _records(records_or_run_dir), title)
    if path is not None:
        fig.savefig(os.fspath(path))
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class LossPlot:
    """A loss plot that redraws in place in a notebook: `update(records)` with all the records so far (or a run
    directory). Under IPython the first update displays the plot as a PNG and later ones replace it (a display
    handle: other output of the cell, a progress bar, stays); elsewhere it only redraws `figure`."""

    def __init__(self, title: str | None = None) -> None:
        self.title = title
        self.figure = _new_figure()
        self.records: list[Mapping[str, Any]] = []
        self._handle: Any = None

    def update(self, records_or_run_dir: Sequence[Mapping[str, Any]] | str | os.PathLike) -> None:
        self.records = _records(records_or_run_dir)
        _draw_losses(self.figure, self.records, self.title)
        self._show()

    def _show(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import Image as IPyImage
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        png = IPyImage(data=_png(self.figure), format="png")
        if self._handle is None:
            self._handle = display(png, display_id=True)
        else:
            self._handle.update(png)

    def save(self, path: str | os.PathLike) -> str:
        self.figure.savefig(os.fspath(path))
        return os.fspath(path)


# ---------------------------------------------------------------------------------------------------------------
# Compiles.


def _program_entries(obj: Any) -> list[tuple[str, str, float]]:
    """(kind, shape key, compile seconds) of the programs of a Pipeline, an Engine or a ProgramCache."""
    engine = getattr(obj, "engine", obj)
    if hasattr(engine, "programs") and hasattr(engine, "compile_log"):
        log = engine.compile_log
        return [(kind, desc, dt) for (kind, _, dt), (desc, _) in zip(engine.programs(), log, strict=True)]
    if hasattr(obj, "entries"):
        return [(kind, desc, dt) for kind, _, desc, dt in obj.entries()]
    raise NotebookError(f"compile_report: expected a Pipeline, an Engine or a ProgramCache, got {type(obj).__name__}")


# jax's persistent-cache events in this process, counted once enable_compilation_cache has registered listeners.
_CACHE_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
                 "/jax/compilation_cache/cache_hits": "hits"}
_cache_stats: dict[str, float] = {"requests": 0, "hits": 0, "saved_s": 0.0}
_listening = False


def _on_event(event: str, **_: Any) -> None:
    if event in _CACHE_EVENTS:
        _cache_stats[_CACHE_EVENTS[event]] += 1


def _on_duration(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        _cache_stats["saved_s"] += duration


def compile_report(obj: Any) -> str:
    """The programs a Pipeline / Engine / ProgramCache compiled, as a small table (kind, compile seconds, shapes),
    with their count and total, and where the persistent compilation cache is (if one is set)."""
    rows = _program_entries(obj)
    lines = [f"{'#':>3}  {'program':<8} {'compile':>9}  shapes"]
    for i, (kind, desc, dt) in enumerate(rows, 1):
        lines.append(f"{i:>3}  {kind:<8} {dt:>8.2f}s  {desc}")
    total = sum(dt for _, _, dt in rows)
    lines.append(f"{len(rows)} program{'s' * (len(rows) != 1)} compiled, {total:.2f}s in all")
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
        n = sum(f.endswith("-cache") for _, _, files in os.walk(cache_dir) for f in files)  # jax's entry names
        lines.append(f"persistent compilation cache: {cache_dir} ({n} entries)")
        if _listening:
            lines.append(f"  this process: {_cache_stats['hits']:.0f} of {_cache_stats['requests']:.0f} XLA compiles "
                         f"read from it ({_cache_stats['saved_s']:.2f}s of compiling saved)")
    return "\n".join(lines)


COLAB_WORK = "/content"  # the Colab runtime's large disk
COLAB_DRIVE = "/content/drive"
DRIVE_CACHE = "/content/drive/MyDrive/glm41v_jax_cache"
LOCAL_CACHE = "~/.cache/glm41v_jax/jax_cache"


def colab_folders(test: bool, test_dir: str) -> tuple[str, str]:
    """(work folder, compilation-cache folder) of a Colab notebook. Test mode: `test_dir` under the current directory
    and its `jax_cache`. Otherwise the weights go to /content (the runtime's large disk) and the cache to Google Drive
    (mounted here), so that a restarted runtime reads its compiled programs back; off Colab (no `google.colab`) the
    cache stays in ~/.cache, and the notebook says so."""
    if test:
        work = os.path.abspath(test_dir)
        return work, os.path.join(work, "jax_cache")
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError:
        print("not on Colab: the compilation cache stays on this machine")
        return COLAB_WORK, os.path.expanduser(LOCAL_CACHE)
    drive.mount(COLAB_DRIVE)
    return COLAB_WORK, DRIVE_CACHE


def enable_compilation_cache(path: str | os.PathLike) -> str:
    """Keep compiled programs in `path` (created if missing) across restarts: jax's persistent compilation cache,
    every program written (minimum compile time 0). Call it before the first compile. From then on compile_report
    also counts the compiles read from the cache. Returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NotebookError(f"compilation cache directory {path}: cannot create it ({e.strerror or e})") from None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # a cache opened by an earlier compile is reopened at `path` by the next one
    global _listening
    if not _listening:  # count the cache's hits for compile_report
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    return path
