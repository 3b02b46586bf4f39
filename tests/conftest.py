"""Test session setup: 8 CPU devices (set before jax is imported), float32 matmuls, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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

