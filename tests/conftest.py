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
