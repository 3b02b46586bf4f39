"""RuntimeConfig: one vocabulary for how to run (param_dtype = the weights, compute_dtype = activations and matmul
inputs), and the CLIs' `--dtype` mapped onto both in one place (config.dtype_flag)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import pytest

from glm41v_jax.cli.common import add_model_args
from glm41v_jax.config import ConfigError, Glm4vConfig, RuntimeConfig, dtype_flag
from glm41v_jax.pipeline import Pipeline


def test_dtype_flag_sets_both_dtypes():
    assert dtype_flag("bfloat16") == {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"}
    assert dtype_flag(None) == {}  # not given: the caller's default applies
    assert RuntimeConfig(**dtype_flag("bfloat16")) == RuntimeConfig(param_dtype="bfloat16", compute_dtype="bfloat16")


def test_runtime_dtypes_are_named_and_checked():
    rt = RuntimeConfig(compute_dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert (rt.compute_dtype, rt.param_dtype) == ("bfloat16", "float32")  # normalised to names (hashable, equal)
    for field in ("compute_dtype", "param_dtype"):
        for bad in ("int32", "bool", "fp8", None):
            with pytest.raises(ConfigError, match=f"runtime: {field} must be a floating-point dtype"):
                RuntimeConfig(**{field: bad})
    cfg = Glm4vConfig().with_runtime(RuntimeConfig(scan_layers=True), compute_dtype="bfloat16")
    assert cfg.runtime == RuntimeConfig(scan_layers=True, compute_dtype="bfloat16")


def test_cli_dtype_flag_reaches_weights_and_compute(tiny_cache_dir, monkeypatch):
    """`--dtype bfloat16` as the generate/chat parser reads it, through Pipeline.load: the weights are stored in
    bf16 and the model computes in bf16; without the flag, float32 for both on CPU."""
    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for argv, want in ((["--dtype", "bfloat16"], "bfloat16"), ([], "float32")):
        args = parser.parse_args(argv)
        pipe = Pipeline.load(None, mesh=None, **dtype_flag(args.dtype))  # as cli.common.load_pipeline calls it
        rt = pipe.engine.cfg.runtime
        assert (rt.param_dtype, rt.compute_dtype) == (want, want), argv
        assert {str(x.dtype) for x in jax.tree.leaves(pipe.engine.params)} == {want}, argv
