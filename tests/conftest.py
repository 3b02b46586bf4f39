"""Test session setup: 8 CPU devices (set before jax is imported), float32 matmuls, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent XLA compilation cache for the whole run (GLM41V_TEST_COMPILE_CACHE=0 turns it off): the xdist
# workers and the subprocesses the tests start inherit the folder through the environment (jax reads
# JAX_COMPILATION_CACHE_DIR), so a program compiled once (the tiny model's prefill and decode, compiled again by
# every CLI call, Engine and subprocess) is read back instead of compiled again. The folder is new for each run (a
# clean CI clone starts empty) and removed at the end by the process that made it. A cache hit is the executable
# XLA compiled for the same module, options and devices (jax's cache key), so no test's meaning changes. (An entry
# read while another worker is still writing it fails to load: jax warns and compiles it again.)
_CACHE_OWNER = False
if os.environ.get("GLM41V_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="glm41v_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    _CACHE_OWNER = True

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> str:
    """A GLM41V_CACHE folder holding the embedded tiny checkpoint (written once per test session)."""
    from glm41v_jax import tiny

    d = str(tmp_path_factory.mktemp("glm41v_cache"))
    old = os.environ.get("GLM41V_CACHE")
    os.environ["GLM41V_CACHE"] = d
    try:
        tiny.materialize_tiny_checkpoint()
    finally:
        if old is None:
            os.environ.pop("GLM41V_CACHE", None)
        else:
            os.environ["GLM41V_CACHE"] = old
    return d


@pytest.fixture
def run_cli(tiny_cache_dir, monkeypatch, capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `glm41v *argv`, in-process, on the tiny checkpoint."""
    from glm41v_jax.cli import main

    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)

    def call(*argv: str):
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return call


# The longest test files in CI (its --durations table, 2026-12-01: worker seconds), longest first. The suite runs
# with pytest-xdist, one file per worker (`--dist loadfile --no-loadscope-reorder` in pyproject's addopts), and files
# are handed to the workers in collection order: the long TPU-compiler files started last (xdist's default order is
# by test count, and they hold few tests) and were the run's tail. Files not listed keep their usual order after these.
LONGEST_FIRST = ("test_tpu_train.py", "test_quant.py", "test_tpu_compile.py", "test_train_step.py",
                 "test_tpu_generate_plans.py", "test_cli.py", "test_lora.py", "test_train_loop.py", "test_notebooks.py",
                 "test_train_hardening.py", "test_attention.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True, scope="module")
def _no_compile_cache_for_tpu_programs(request):
    """The TPU-compiler files (real 9B programs, each compiled once) run without the cache, as before it existed:
    nothing to reuse, and their executables are not written to disk."""
    if not (request.module.__name__.startswith("test_tpu_") and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache

    folder = os.environ.pop("JAX_COMPILATION_CACHE_DIR")  # subprocesses too
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def pytest_unconfigure(config) -> None:
    if _CACHE_OWNER:  # the process that made the run's compilation cache folder removes it
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
