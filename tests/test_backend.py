"""glm41v_jax.backend: the XLA flag set at import (its rules and its off switch, in fresh processes), the
per-platform defaults, and the CPU special cases (each equal to the plain math it replaces)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm41v_jax import backend
from glm41v_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_xla_cpu_flag_rules():
    """Only for jaxlib 0.10.x, never over a user's own YNN choice, not when switched off; other flags are kept."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert backend.add_xla_cpu_flag(env, "0.10.2")
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + backend.XLA_CPU_FLAG
    assert not backend.add_xla_cpu_flag(env, "0.10.2")  # already there: not added twice
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    for env, version in (({}, "0.11.0"), ({}, ""), ({"GLM41V_XLA_CPU_TUNING": "0"}, "0.10.2"),
                         ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, "0.10.2")):
        before = dict(env)
        assert not backend.add_xla_cpu_flag(env, version)
        assert env == before
    assert backend.add_xla_cpu_flag(env := {}, "0.10.0") and env["XLA_FLAGS"] == backend.XLA_CPU_FLAG


def _import_in_fresh_process(extra_env: dict[str, str], tmp_path) -> dict:
    """XLA_FLAGS and backend.XLA_CPU_FLAG_ADDED after `import glm41v_jax` in a new interpreter, started from another
    working directory (the package found through PYTHONPATH), with XLA_FLAGS unset unless `extra_env` sets it."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLM41V_XLA_CPU_TUNING")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra_env)
    code = ("import json, os\nimport glm41v_jax\nfrom glm41v_jax import backend\n"
            "print(json.dumps({'flags': os.environ.get('XLA_FLAGS'), 'added': backend.XLA_CPU_FLAG_ADDED}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_flag_and_the_off_switch_keeps_xla_flags_untouched(tmp_path):
    """Importing the package adds the documented flag (on this jaxlib 0.10.x); GLM41V_XLA_CPU_TUNING=0 leaves
    XLA_FLAGS exactly as it was, unset or set."""
    if not jax.lib.__version__.startswith("0.10."):
        pytest.skip(f"the flag is only added for jaxlib 0.10.x; this is {jax.lib.__version__}")
    on = _import_in_fresh_process({}, tmp_path)
    assert on == {"flags": backend.XLA_CPU_FLAG, "added": True}
    assert _import_in_fresh_process({"GLM41V_XLA_CPU_TUNING": "0"}, tmp_path) == {"flags": None, "added": False}
    mine = "--xla_force_host_platform_device_count=2"
    off = _import_in_fresh_process({"GLM41V_XLA_CPU_TUNING": "0", "XLA_FLAGS": mine}, tmp_path)
    assert off == {"flags": mine, "added": False}


def test_backend_defaults():
    assert backend.backend_default("cpu", "engine_kernel_layout") == "out_in"
    assert backend.backend_default("tpu", "engine_kernel_layout") == "in_out"
    for gpu in ("gpu", "cuda", "rocm"):
        assert backend.backend_default(gpu, "engine_kernel_layout") == backend.BACKEND_TUNING["gpu"][
            "engine_kernel_layout"]
    assert backend.backend_default("metal", "engine_kernel_layout") == "out_in"  # unknown: the CPU row
    assert [backend.backend_default(p, "dtype") for p in ("cpu", "tpu", "cuda")] == ["float32", "bfloat16", "bfloat16"]


def test_cpu_switches_follow_the_target_platform():
    """Blocked attention from BLOCKED_ATTENTION_MIN_QUERIES queries on CPU only; the mesh's platform decides."""
    assert backend.target_platform() == "cpu"
    assert not backend.use_blocked_attention(1)
    assert not backend.use_blocked_attention(backend.BLOCKED_ATTENTION_MIN_QUERIES - 1)
    assert backend.use_blocked_attention(backend.BLOCKED_ATTENTION_MIN_QUERIES)
    with jax.set_mesh(make_mesh("data=2,fsdp=2,tensor=2")):
        assert backend.target_platform() == "cpu" and backend.use_blocked_attention(512)
    assert backend.embed_attend_rows_first(backend.EMBED_ATTEND_SMALL_ROWS)
    assert not backend.embed_attend_rows_first(backend.EMBED_ATTEND_SMALL_ROWS + 1)


@pytest.mark.parametrize("shape,dtype", [((300, 1024), jnp.float32), ((7, 1000, 3), jnp.float32),
                                         ((129, 2048), jnp.bfloat16), ((5,), jnp.float32)])
def test_blocked_sum_of_squares(monkeypatch, shape, dtype):
    """The blocked CPU sum of squares (forced on small arrays: remainder rows, widths that are not 1024, bf16, an
    array smaller than one block) equals NumPy's in float64."""
    monkeypatch.setattr(backend, "BLOCKED_SUM_OF_SQUARES_MIN", 1)
    monkeypatch.setattr(backend, "SUM_OF_SQUARES_BLOCK", 4096)
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32).astype(dtype)
    want = np.sum(np.square(np.asarray(x, np.float64)))
    np.testing.assert_allclose(float(jax.jit(backend.sum_of_squares)(x)), want, rtol=1e-5)
    text = jax.jit(backend.sum_of_squares).lower(x).as_text()
    assert ("while" in text) == (int(np.prod(shape)) >= 4096), text[:2000]  # the loop runs where rows fit a block
