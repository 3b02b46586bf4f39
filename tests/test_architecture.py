"""The import layers of docs/ARCHITECTURE.md, checked on the source with `ast`.

Every import of every module counts, at module level and inside functions: a module may import its own layer and
the layers its row lists, nothing above. No two modules may import each other, directly or round a longer loop.
The command modules that pyproject.toml registers by entry point are imported by nobody.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The installed package name -> its folder in the repository (pyproject.toml's package-dir).
PACKAGES = {"glm41v_jax": "glm41v_jax", "glm41v_convert": "convert", "glm41v_train": "train"}

# layer -> (its modules, the layers it may import besides its own). Lowest first; the same table as
# docs/ARCHITECTURE.md. A module name `P.*` is P and everything under it; an exact name beats a prefix, a longer
# prefix a shorter one.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "core": (("glm41v_jax.*",), ()),
    "processing": (("glm41v_jax.processing.*",), ("core",)),
    "engine": (("glm41v_jax.generate", "glm41v_jax.buckets", "glm41v_jax.requests", "glm41v_jax.decode",
                "glm41v_jax.programs", "glm41v_jax.engine"), ("core", "processing")),
    "pipeline": (("glm41v_jax.pipeline", "glm41v_jax"), ("core", "processing", "engine")),
    "convert": (("glm41v_convert.*",), ("core",)),
    "train": (("glm41v_train.*",), ("core", "processing", "convert")),
    "plan": (("glm41v_jax.plan", "glm41v_jax.tpu_slices", "glm41v_jax.compiled_figures", "glm41v_jax.plan_report",
              "glm41v_jax.tpu_cost"), ("core", "processing", "engine", "pipeline", "train")),
    "notebook": (("glm41v_jax.notebook",), ("core", "processing", "engine", "pipeline", "plan")),
    "cli": (("glm41v_jax.cli.*", "glm41v_jax.__main__", "glm41v_convert.main", "glm41v_train.cli"),
            ("core", "processing", "engine", "pipeline", "convert", "train", "plan")),
}


def module_names(root: Path, packages: Mapping[str, str]) -> dict[str, Path]:
    """Every module of the packages under root: dotted name -> file (a package is its __init__.py)."""
    found = {}
    for pkg, folder in packages.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([pkg, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that `name` (at `path`) imports anywhere in its file. `from P import x` counts as P.x when
    that is a module, else as P."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a name that is not a module: its nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(module: str, layers: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> str | None:
    best, score = None, -1
    for layer, (patterns, _) in layers.items():
        for p in patterns:
            if p.endswith(".*"):
                prefix = p[:-2]
                s = len(prefix) if module == prefix or module.startswith(prefix + ".") else -1
            else:
                s = 10_000 if module == p else -1
            if s > score:
                best, score = layer, s
    return best


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path, packages: Mapping[str, str] = PACKAGES,
               layers: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = LAYERS,
               entry_point_modules: set[str] = frozenset()) -> list[str]:
    """Every import across the layers, every import loop, every import of an entry-point command module."""
    files = module_names(root, packages)
    known = set(files)
    graph = {m: imports_of(m, p, known) for m, p in files.items()}
    problems = []
    for m, targets in sorted(graph.items()):
        lm = layer_of(m, layers)
        assert lm is not None, f"{m} is in no layer of LAYERS"
        allowed = {lm, *layers[lm][1]}
        for t in sorted(targets):
            lt = layer_of(t, layers)
            if lt not in allowed:
                problems.append(f"{m} ({lm}) imports {t} ({lt})")
            if t in entry_point_modules:
                problems.append(f"{m} imports {t}, a command module found by entry point")
    problems += [f"import loop: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def entry_point_commands() -> dict[str, str]:
    """name -> "module:function" of pyproject.toml's `[project.entry-points."glm41v.commands"]` (read as text:
    tomllib is Python 3.11+, the project supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."glm41v.commands"]', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def test_the_tree_keeps_its_layers():
    modules = {v.split(":")[0] for v in entry_point_commands().values()}
    assert modules, "no command is registered by entry point"
    assert violations(REPO, entry_point_modules=modules) == []


def test_the_table_is_the_one_in_the_docs():
    """docs/ARCHITECTURE.md's layer table lists the same layers, modules and allowed imports as LAYERS."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and cells[0].startswith("**") and cells[0].endswith("**"):
            mods = tuple(re.findall(r"`([^`]+)`", cells[1]))
            may = tuple(x for x in re.split(r"[,\s]+", cells[2]) if x and x != "-")
            rows[cells[0].strip("*")] = (mods, may)
    assert rows == LAYERS


# ------------------------------------------------------------------------------------- the checker on itself


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


CLEAN = {
    "glm41v_jax/__init__.py": "from .pipeline import Pipeline\n",
    "glm41v_jax/errors.py": "",
    "glm41v_jax/model.py": "from . import errors\n",
    "glm41v_jax/generate.py": "from .model import x\nfrom glm41v_jax.processing import image\n",
    "glm41v_jax/processing/__init__.py": "from .image import load_image\n",
    "glm41v_jax/processing/image.py": "from ..errors import Glm41vError\n",
    "glm41v_jax/pipeline.py": "from .generate import Engine\n",
    "glm41v_jax/cli/__init__.py": "from . import common\n",
    "glm41v_jax/cli/common.py": "from ..pipeline import Pipeline\n",
    "convert/__init__.py": "",
    "convert/hf_to_orbax.py": "import glm41v_jax.model\n",
    "convert/main.py": "from glm41v_jax.cli.common import guarded\nfrom .hf_to_orbax import convert\n",
    "train/__init__.py": "",
    "train/loop.py": "from glm41v_convert.hf_to_orbax import save\n\ndef f():\n    from .data import x\n",
    "train/data.py": "from glm41v_jax.processing.image import load_image\n",
    "train/cli.py": "from glm41v_jax.cli.common import guarded\nfrom .loop import train\n",
}


def test_checker_passes_a_tree_that_keeps_the_layers(tmp_path):
    _write(tmp_path, CLEAN)
    assert violations(tmp_path, entry_point_modules={"glm41v_train.cli", "glm41v_convert.main"}) == []


@pytest.mark.parametrize("rel, text, expected", [
    # the core reaches up into the trainer, inside a function
    ("glm41v_jax/model.py", "def f():\n    import glm41v_train.loop\n",
     "glm41v_jax.model (core) imports glm41v_train.loop (train)"),
    # the core imports the command line
    ("glm41v_jax/generate.py", "from glm41v_jax.cli import common\n",
     "glm41v_jax.generate (engine) imports glm41v_jax.cli.common (cli)"),
    # the trainer imports the command line (its own cli module may)
    ("train/data.py", "from glm41v_jax.cli.common import guarded\n",
     "glm41v_train.data (train) imports glm41v_jax.cli.common (cli)"),
    # the converter imports the trainer
    ("convert/hf_to_orbax.py", "from glm41v_train import loop\n",
     "glm41v_convert.hf_to_orbax (convert) imports glm41v_train.loop (train)"),
    # the cli package imports a command registered by entry point
    ("glm41v_jax/cli/__init__.py", "from glm41v_train.cli import register\n",
     "glm41v_jax.cli imports glm41v_train.cli, a command module found by entry point"),
    # two modules of one layer import each other (one of them inside a function)
    ("train/data.py", "def f():\n    from .loop import y\n", "import loop: glm41v_train.data -> glm41v_train.loop"),
])
def test_checker_finds_each_kind_of_violation(tmp_path, rel, text, expected):
    _write(tmp_path, {**CLEAN, rel: CLEAN.get(rel, "") + text})
    found = violations(tmp_path, entry_point_modules={"glm41v_train.cli", "glm41v_convert.main"})
    assert expected in found, found


def test_checker_refuses_a_module_outside_the_table(tmp_path):
    _write(tmp_path, CLEAN)
    with pytest.raises(AssertionError, match=r"glm41v_train\S* is in no layer"):
        violations(tmp_path, layers={k: v for k, v in LAYERS.items() if k != "train"})
