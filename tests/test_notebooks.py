"""The notebooks of notebooks/: each .py source (jupytext percent format) against its committed .ipynb, and each
.ipynb executed top to bottom in test mode (GLM41V_NOTEBOOK_TEST=1: the tiny checkpoint and data, on the CPU).

Every notebooks/*.py is found and gets both tests:
  * test_ipynb_matches_its_source: jupytext's notebook from the .py has the same cells (type and source) as the
    committed .ipynb (outputs and metadata ignored). Regenerate with `jupytext --to ipynb notebooks/X.py`.
  * test_notebook_executes (slow): a copy of notebooks/ in a temporary folder (the cwd of the kernel, so whatever
    a notebook writes stays there), executed with nbclient in a kernel of this interpreter (a kernelspec written
    to a temporary folder: no `jupyter kernelspec install` needed), env GLM41V_NOTEBOOK_TEST=1, JAX_PLATFORMS=cpu,
    GLM41V_CACHE in the temporary folder. Checked: no error output, the test-mode banner, and the notebook's own
    checks from NOTEBOOKS. The executed notebook is saved as <tmp>/<name>.executed.ipynb; the execution seconds
    are a test property (`record_property`) and in the --durations table.

Adding a notebook: write notebooks/X.py, generate notebooks/X.ipynb, and add its checks to NOTEBOOKS, e.g.

    NOTEBOOKS["colab_qlora"] = Checks(
        image_cells=("display(sample)",),              # a cell whose source holds this shows an image (image/png)
        loss_plot_cell="plot.update(",                 # the cell that draws the loss plot (image/png)
        losses=True,                                   # a printed line {"losses": [...]}: finite and falling
        patterns=(r"RELOADED OK max\\|dlogits\\|=\\S+",),  # regexes the printed text must match
        streamed_cells=("ask(",),                      # that cell printed its text in 3+ pieces (streamed)
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})  # more environment for the kernel

A notebook without an entry gets the common checks only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the test extra installs nbclient, jupytext, ipykernel
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NB_DIR = REPO / "notebooks"
BANNER = "TEST MODE: tiny model, tiny data (GLM41V_NOTEBOOK_TEST=1)"
SOURCES = sorted(p.stem for p in NB_DIR.glob("*.py"))


@dataclasses.dataclass(frozen=True)
class Checks:
    """What an executed notebook must show besides no error and the banner (module docstring)."""

    image_cells: tuple[str, ...] = ()  # each: some cell whose source contains it has an image/png output
    loss_plot_cell: str | None = None  # the cell whose source contains it shows the loss plot (image/png)
    losses: bool = False  # a printed JSON line {"losses": [...]}: all finite, the last third below the first
    patterns: tuple[str, ...] = ()  # regexes matched against everything the notebook printed
    streamed_cells: tuple[str, ...] = ()  # each: the cell whose source contains it printed in 3+ pieces (streamed)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # more environment for the kernel
    cell_timeout: int = 300  # seconds per cell


NOTEBOOKS: dict[str, Checks] = {
    "colab_v5e1_inference": Checks(
        image_cells=("display(img)", "display(nb.draw_boxes("),
        streamed_cells=("reply = ask(video_request)",),  # 48 new tokens: 3 decode chunks of 16, each printed
        patterns=(r"SKIPPED in test mode: pip install", r"SKIPPED in test mode: snapshot_download",
                  r"expected tpu-v5e-1: CPU, no TPU", r"converted in [\d.]+s", r"fits: .* per chip",
                  r"timestamps in the prompt \(s\): \['0', '1', '2', '3'\]", r"4 messages in the history",
                  r"\d+ programs compiled", r"persistent compilation cache: .*glm41v_nb_work/jax_cache \([1-9]"),
        env={"XLA_FLAGS": ""}),  # one CPU device, as the v5e-1 has one chip
    "colab_qlora": Checks(
        image_cells=("display(sample)",), loss_plot_cell="run_training(cfg,", losses=True,
        patterns=(r"SKIPPED in test mode: git clone", r"SKIPPED in test mode: snapshot_download",
                  r"SKIPPED in test mode: hf_hub_download", r"converted to int8 in",
                  r"'status': 'completed', 'step': 40", r"A \(trained\): ", r"adapter_model\.safetensors +[\d,]+ bytes",
                  r"PEFT adapter: r = 8 lora_alpha = 16"),
        env={"XLA_FLAGS": ""}),  # one CPU device, as the v5e-1 has one chip
    "kaggle_v5e8_lora": Checks(
        loss_plot_cell="display(PngImage(", losses=True,
        patterns=(r"SKIPPED in test mode: git clone", r"SKIPPED in test mode: snapshot_download",
                  r"mesh: \{'data': 1, 'fsdp': 8, 'tensor': 1\} over 8 devices",
                  r"\$ glm41v plan --tpu v5e-8 train --config \S+kaggle_v5e8_lora\.yaml --set",
                  r"SKIPPED in test mode: glm41v plan's TPU compile",
                  r"resumed from \S+/checkpoints/3 at step 3", r"RESUMED at step 3, trained to step 6",
                  r"held-out loss: [\d.]+ before, [\d.]+ after", r"A \(trained\): ",
                  r"kaggle_nb/working: 0\.\d+ GB of the 20 GB cap used",
                  r"the adapter moves the logits by max [1-9]\d*\.\d+",  # so the comparison below can fail
                  r"RELOADED OK max\|dlogits\|=\S+ \(tolerance \S+; glm41v_jax and transformers\)")),
}


def test_every_checked_notebook_exists():
    assert SOURCES, "no notebooks/*.py"
    assert set(NOTEBOOKS) <= set(SOURCES), f"NOTEBOOKS names missing notebooks: {set(NOTEBOOKS) - set(SOURCES)}"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("name", SOURCES)
def test_ipynb_matches_its_source(name):
    ipynb = NB_DIR / f"{name}.ipynb"
    assert ipynb.is_file(), f"{ipynb} is missing: jupytext --to ipynb notebooks/{name}.py"
    from_py = _cells(jupytext.read(NB_DIR / f"{name}.py"))
    committed = _cells(nbformat.read(ipynb, as_version=4))
    assert committed == from_py, (f"notebooks/{name}.ipynb has drifted from notebooks/{name}.py: "
                                  f"jupytext --to ipynb notebooks/{name}.py")


def test_the_notebook_pins_the_tested_jax():
    """The install cell pins the jax of pyproject's test extra (the one CI runs)."""
    pin = re.search(r'"jax\[tpu\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'JAX_PIN = "{pin}"' in (NB_DIR / "colab_v5e1_inference.py").read_text()


def _kernel_manager(tmp: Path):
    """A kernel manager for a kernel of this very interpreter (a kernelspec in `tmp`, not the system's)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec = tmp / "kernels" / "glm41v-nbtest"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "glm41v-jax tests", "language": "python"}))
    return AsyncKernelManager(kernel_name="glm41v-nbtest",
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))


def _text(nb) -> str:
    """Everything the notebook printed (streams and text/plain results), in cell order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _errors(nb) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and "Traceback (most recent call last)" in out.text:
                found.append(f"cell {i}: a traceback on {out.name}: {out.text[-500:]}")
    return found


def _has_image(nb, needle: str) -> bool:
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert cells, f"no code cell contains {needle!r}"
    return any("image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", []))


def _losses(text: str) -> list[float]:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"losses"' in line:
            return json.loads(line)["losses"]
    raise AssertionError('no printed {"losses": [...]} line')


@pytest.mark.slow
@pytest.mark.parametrize("name", SOURCES)
def test_notebook_executes(name, tmp_path, record_property):
    checks = NOTEBOOKS.get(name, Checks())
    work = tmp_path / "notebooks"
    shutil.copytree(NB_DIR, work)
    nb = nbformat.read(work / f"{name}.ipynb", as_version=4)
    env = {**os.environ, "GLM41V_NOTEBOOK_TEST": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "GLM41V_CACHE": str(tmp_path / "glm41v_cache"), "MPLBACKEND": "agg", **checks.env}
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, timeout=checks.cell_timeout,
                                     resources={"metadata": {"path": str(work)}}, allow_errors=True)
    t0 = time.perf_counter()
    # nbclient shuts down only kernels it created itself; this one (our kernelspec) must go too, or every executed
    # notebook's kernel stays alive, holding its model and arrays, until pytest exits
    client.execute(env=env, cleanup_kc=True)
    seconds = time.perf_counter() - t0
    assert not km.has_kernel, f"notebooks/{name}: the kernel is still running after the notebook"
    record_property("seconds", round(seconds, 1))
    nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
    where = f"notebooks/{name} ({seconds:.0f} s; executed copy: {tmp_path / f'{name}.executed.ipynb'})"
    errors = _errors(nb)
    assert not errors, f"{where}: errors:\n" + "\n".join(errors)
    text = _text(nb)
    assert BANNER in text, f"{where}: the test-mode banner was not printed"
    for needle in checks.image_cells:
        assert _has_image(nb, needle), f"{where}: the cell with {needle!r} shows no image/png"
    if checks.loss_plot_cell is not None:
        assert _has_image(nb, checks.loss_plot_cell), f"{where}: no loss plot (image/png) in the cell with " \
                                                      f"{checks.loss_plot_cell!r}"
    if checks.losses:
        losses = _losses(text)
        assert len(losses) >= 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses), \
            f"{where}: losses {losses}"
        k = max(1, len(losses) // 3)
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k, f"{where}: losses do not fall: {losses}"
    for needle in checks.streamed_cells:
        pieces = [len([o for o in c.get("outputs", []) if o.output_type == "stream" and o.name == "stdout"])
                  for c in nb.cells if c.cell_type == "code" and needle in c.source]
        # a reply printed at the end is one piece (two with its closing newline); streamed, one per decode chunk
        assert pieces and max(pieces) >= 3, f"{where}: the cell with {needle!r} did not stream ({pieces} pieces)"
    for pattern in checks.patterns:
        assert re.search(pattern, text), f"{where}: nothing printed matches {pattern!r}"
    print(f"{where}: executed in {seconds:.1f} s")
