"""The "out_in" decode kernel layout (layers.Dense, model.to_kernel_layout) computes what "in_out" computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R

from glm41v_jax import inputs, layers
from glm41v_jax import model as M
from glm41v_jax.config import ConfigError, Glm4vConfig, RuntimeConfig
from glm41v_jax.generate import Engine, GenerationError, synthetic_inputs
from glm41v_jax.sharding import unbox


@pytest.mark.parametrize("rows", [1, 4, 17, 40])
@pytest.mark.parametrize("n_in,features", [(1, (24,)), (1, (3, 8)), (2, (20,))])
def test_dense_layouts_agree(rows, n_in, features):
    """The out_in kernel contracted as W.x^T equals x.W, for few and many rows, one or two in/out axes."""
    rng = np.random.default_rng(rows)
    in_shape = (4, 6) if n_in == 2 else (12,)
    axes = ("a", "b", "c")[: n_in + len(features)]
    x = jnp.asarray(rng.normal(size=(rows, 1, *in_shape)).astype(np.float32))
    io = layers.Dense(features, axes, n_in=n_in, use_bias=True)
    oi = layers.Dense(features, axes, n_in=n_in, use_bias=True, kernel_layout="out_in")
    p_io = jax.tree.map(np.asarray, io.init(jax.random.PRNGKey(0), x)["params"])
    p_io = jax.tree.map(lambda a: a + 0.5, unbox(p_io))  # non-zero bias
    k = p_io["kernel"]
    perm = (*range(n_in, k.ndim), *range(n_in))
    p_oi = {"kernel": np.transpose(k, perm), "bias": p_io["bias"]}
    assert unbox(oi.init(jax.random.PRNGKey(0), x)["params"])["kernel"].shape == p_oi["kernel"].shape
    y_io = io.apply({"params": p_io}, x)
    y_oi = oi.apply({"params": p_oi}, x)
    assert y_oi.shape == (rows, 1, *features)
    np.testing.assert_allclose(np.asarray(y_oi), np.asarray(y_io), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,scan", [("a", True), ("c", False)])
def test_to_kernel_layout_round_trip_and_logits(name, scan):
    """in_out -> out_in -> in_out is bit-exact; the model gives the same logits in both layouts (few and many rows);
    scanned (stacked "layers" axis) and tied-embedding configs included."""
    d = R.hf_config_dict(name)
    cfg = Glm4vConfig.from_hf(d, scan_layers=scan)
    params = R.numpy_params(d, cfg, 1)
    p_oi, cfg_oi = M.to_kernel_layout(params, cfg, "out_in")
    assert cfg_oi.runtime.kernel_layout == "out_in" and cfg_oi.text == cfg.text
    q_io = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"] if scan else \
        params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    q_oi = p_oi["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"] if scan else \
        p_oi["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_oi.shape == (q_io.shape[:-3] + q_io.shape[-2:] + q_io.shape[-3:-2])
    # The vision tower keeps its layout.
    assert jax.tree.map(np.shape, p_oi["visual"]) == jax.tree.map(np.shape, params["visual"])
    back, cfg_back = M.to_kernel_layout(p_oi, cfg_oi, "in_out")
    assert cfg_back == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)

    for n in (3, 40):  # decode-like and prefill-like row counts (tied: both Embed.attend forms)
        ids = np.random.default_rng(n).integers(0, cfg.text.vocab_size, (1, n))
        mi = inputs.prepare_inputs(cfg, ids, attention_mask=np.ones_like(ids))
        l_io = jax.jit(lambda p, kw: M.Glm4v(cfg).apply({"params": p}, **kw))(params, mi.as_kwargs())
        l_oi = jax.jit(lambda p, kw: M.Glm4v(cfg_oi).apply({"params": p}, **kw))(p_oi, mi.as_kwargs())
        np.testing.assert_allclose(np.asarray(l_oi), np.asarray(l_io), rtol=2e-5, atol=2e-4)


def test_engine_layouts_give_the_same_tokens():
    d = R.hf_config_dict("a")
    cfg = Glm4vConfig.from_hf(d)
    params = R.numpy_params(d, cfg, 2)  # O(1) weights: argmax is sensitive
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    inputs = synthetic_inputs(cfg, batch=1, prompt_tokens=20, images=[(unit * 2, unit * 3)])
    inputs["pixel_values"] = np.random.default_rng(0).normal(size=inputs["pixel_values"].shape).astype(np.float32)
    inputs["input_ids"][0, -8:] = np.arange(8) + 7
    toks = {lay: Engine(params, cfg, kernel_layout=lay).generate(inputs, max_new_tokens=10, eos_ids=()).token_ids
            for lay in ("in_out", "out_in")}
    assert toks["in_out"] == toks["out_in"] and len(toks["out_in"]) == 10


def test_bad_layout_is_a_clear_error():
    with pytest.raises(ConfigError, match="kernel_layout"):
        RuntimeConfig(kernel_layout="transposed")
    d = R.hf_config_dict("a")
    cfg = Glm4vConfig.from_hf(d)
    params = R.numpy_params(d, cfg)
    with pytest.raises(ValueError, match=r"\['kernel'\]: shape .* expects"):
        M.to_kernel_layout(params, cfg.with_runtime(kernel_layout="out_in"), "in_out")
    with pytest.raises(GenerationError, match="kernel_layout must be 'in_out' or 'out_in', got 'oi'"):
        Engine(params, cfg, kernel_layout="oi")
