"""Component parity against the torch modules, real-9B shapes via eval_shape, sharded forward on 8 CPU devices."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
import torch

from glm41v_jax import inputs, load, rope, sharding, weights
from glm41v_jax import model as M
from glm41v_jax.config import GLM41V_9B, ConfigError, Glm4vConfig


@pytest.fixture(scope="module")
def pair():
    return R.hf_and_params("a", seed=3)


@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (6, 4), (2, 40), (40, 2), (24, 18), (12, 12), (30, 8)])
def test_position_table_bicubic_matches_grid_sample(pair, grid):
    """Up- and down-sampling of the learned table (6x6 here) to a segment grid, against Glm4vVisionEmbeddings."""
    hf, cfg, params = pair
    h, w = grid
    grids = np.array([[1, h, w]])
    hpos, wpos = inputs.vision_patch_positions(grids, 2)
    emb = hf.model.visual.embeddings
    n = h * w
    with torch.no_grad():
        ref = emb(torch.zeros(n, cfg.vision.hidden_size), torch.tensor([n]), torch.from_numpy(grids),
                  torch.from_numpy(hpos.astype(np.int64)), torch.from_numpy(wpos.astype(np.int64))).numpy()
    table = params["visual"]["position_embedding"]
    out = rope.interpolate_pos_embed(jnp.asarray(table), jnp.asarray(hpos), jnp.asarray(wpos),
                                     jnp.full((n,), h), jnp.full((n,), w))
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)


def test_vision_rope_matches(pair):
    hf, cfg, params = pair
    grids = np.array([[1, 4, 6], [1, 2, 2]])
    hpos, wpos = inputs.vision_patch_positions(grids, 2)
    pid = torch.from_numpy(np.stack([hpos, wpos], -1).astype(np.int64))
    cos_r, sin_r = hf.model.visual.rotary_pos_emb(torch.zeros(1), pid)
    cos, sin = rope.vision_cos_sin(jnp.asarray(hpos), jnp.asarray(wpos), cfg.vision.head_dim, cfg.vision.rope_theta)
    np.testing.assert_allclose(np.asarray(cos), cos_r.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_r.numpy(), atol=1e-6)


def test_text_mrope_matches(pair):
    """Interleaved partial M-RoPE on q against HF's rotary embedding + apply_rotary_pos_emb."""
    from transformers.models.glm4v import modeling_glm4v as hfm

    hf, cfg, params = pair
    t = cfg.text
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 50, size=(3, 2, 7))
    q = rng.standard_normal((2, 7, t.num_attention_heads, t.head_dim)).astype(np.float32)
    k = rng.standard_normal((2, 7, t.num_key_value_heads, t.head_dim)).astype(np.float32)
    rot = hf.model.language_model.rotary_emb
    cos_r, sin_r = rot(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    qr, kr = hfm.apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                      cos_r, sin_r)
    cos, sin = rope.mrope_cos_sin(jnp.asarray(pos), t.head_dim, t.rotary_dim, t.rope_theta, t.mrope_section,
                                  jnp.float32)
    np.testing.assert_allclose(np.asarray(rope.apply_mrope(jnp.asarray(q), cos, sin)), qr.transpose(1, 2).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(rope.apply_mrope(jnp.asarray(k), cos, sin)), kr.transpose(1, 2).numpy(),
                               atol=1e-5)


def test_weight_roundtrip_is_exact(pair):
    hf, cfg, params = pair
    back = weights.flax_to_hf(params, cfg)
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_real_9b_shapes_eval_shape():
    """The released 9B config: every parameter's shape, at no memory cost, and the HF key table agrees."""
    ab = M.abstract_params(GLM41V_9B)
    flat = {"/".join(p): x for p, x in weights.iter_leaves(jax.tree.map(lambda x: x, ab,
                                                                           is_leaf=lambda x: hasattr(x, "names")))}
    shapes = {k: tuple(v.value.shape) for k, v in flat.items()}
    rules = weights.build_rules(GLM41V_9B)
    assert len(rules) == 4 + 24 * 7 + 9 + 1 + 40 * 13 + 1 + 1  # docs/MODEL.md §2 key count
    for name, r in rules.items():
        assert shapes["/".join(r.path)] == r.flax_shape, name
    assert set(shapes) == {"/".join(r.path) for r in rules.values()}
    assert rules["model.language_model.layers.0.mlp.gate_up_proj.weight"].hf_shape == (27392, 4096)
    assert rules["model.visual.downsample.weight"].hf_shape == (4096, 1536, 2, 2)
    assert rules["model.visual.patch_embed.proj.weight"].hf_shape == (1536, 3, 2, 14, 14)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert 10.2e9 < total < 10.4e9  # GLM-4.1V-9B-Thinking: ~10.3B parameters incl. vision tower
    # logits shape for a short prompt with an image, without materialising anything
    cfg = GLM41V_9B.with_runtime(compute_dtype="bfloat16", param_dtype="bfloat16")
    c = R.build_prompt(np.random.default_rng(0), images=[(1, 4, 4)])
    inp = inputs.prepare_inputs(cfg, **c).as_kwargs()
    out = jax.eval_shape(lambda p, kw: M.Glm4v(cfg).apply({"params": p}, **kw),
                         M.abstract_params(cfg), inp)
    assert out.shape == (1, c["input_ids"].shape[1], 151552) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("mesh_spec", ["fsdp=4,tensor=2", "data=2,tensor=4", "tensor=8"])
def test_sharded_forward_matches_single_device(pair, mesh_spec):
    hf, cfg, params = pair
    mesh = sharding.make_mesh(mesh_spec)
    shard = sharding.param_shardings(M.abstract_params(cfg), mesh)
    placed = jax.device_put(params, shard)
    c = R.build_prompt(np.random.default_rng(1), images=[(1, 4, 6)])
    ref = np.asarray(M.forward(params, cfg, **c))
    out = M.forward(placed, cfg, **c)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)  # only the reduction order differs
    assert (np.asarray(out).argmax(-1) == ref.argmax(-1)).all()
    # the rules table was applied: q heads (4) split over tensor, kv heads (2) replicated when tensor > 2
    q = placed["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    kv = placed["language_model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
    tp = mesh.shape["tensor"]
    assert q.sharding.spec[1] == ("tensor" if tp > 1 and 4 % tp == 0 else None)
    assert kv.sharding.spec[1] == ("tensor" if tp > 1 and 2 % tp == 0 else None)


def test_mesh_errors():
    with pytest.raises(sharding.MeshError, match="unknown axis 'model'"):
        sharding.parse_mesh("model=2", 8)
    with pytest.raises(sharding.MeshError, match="uses 6 devices but 8 are available"):
        sharding.parse_mesh("fsdp=3,tensor=2", 8)
    assert sharding.parse_mesh("tensor=2,fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_config_spellings_agree():
    legacy = R.hf_config_dict("a")
    v5 = Glm4vConfig.from_hf(legacy).to_hf()
    assert Glm4vConfig.from_hf(v5) == Glm4vConfig.from_hf(legacy)
    # transformers' own save_pretrained output parses too
    from transformers import Glm4vConfig as HF

    hf_dict = HF(**legacy).to_dict()
    assert Glm4vConfig.from_hf(hf_dict).text == Glm4vConfig.from_hf(legacy).text


@pytest.mark.parametrize("field,mutate,msg", [
    ("num_hidden_layers", lambda d: d["text_config"].pop("num_hidden_layers"),
     "required field 'num_hidden_layers' is missing"),
    ("partial_rotary_factor", lambda d: d["text_config"].pop("partial_rotary_factor"),
     "'partial_rotary_factor' is missing"),
    ("mrope_section", lambda d: d["text_config"]["rope_scaling"].update(mrope_section=[1, 1, 1]),
     "must have 3 entries summing"),
    ("vision_config", lambda d: d.pop("vision_config"), "'vision_config' is missing"),
    ("hidden_size", lambda d: d["vision_config"].update(hidden_size="big"), "'hidden_size' must be a positive"),
])
def test_config_errors_name_the_field(field, mutate, msg):
    d = R.hf_config_dict("a")
    mutate(d)
    with pytest.raises(ConfigError, match=msg):
        Glm4vConfig.from_hf(d)


@pytest.mark.parametrize("where,key,value,msg", [
    ("text_config", "rope_theta", float("nan"), "'rope_theta' must be a finite number > 0"),
    ("text_config", "rope_theta", "abc", "'rope_theta' must be a finite number > 0"),
    ("text_config", "partial_rotary_factor", "abc", "'partial_rotary_factor' must be a finite number > 0 and <= 1"),
    ("text_config", "rope_parameters", [1, 2], "'rope_parameters' must be an object, got list"),
    ("text_config", "rope_scaling", "x", "'rope_scaling' must be an object, got str"),
    ("text_config", "eos_token_id", ["x"], "'eos_token_id' must be a token id"),
    ("text_config", "eos_token_id", [-5], "'eos_token_id' must be a token id"),
    ("text_config", "pad_token_id", "x", "'pad_token_id' must be a token id"),
    ("text_config", "hidden_size", float("inf"), "'hidden_size' must be a positive integer"),
    ("text_config", "vocab_size", float("nan"), "'vocab_size' must be a positive integer"),
    ("text_config", "num_hidden_layers", 2**40, "'num_hidden_layers' must be a positive integer"),
    ("vision_config", "rope_parameters", "x", "'rope_parameters' must be an object"),
    ("vision_config", "attention_bias", "no", "'attention_bias' must be true or false"),
])
def test_config_hostile_values_are_config_errors(where, key, value, msg):
    """Wrong types and non-finite numbers in config.json are one ConfigError naming the field (they were float()/
    int()/dict() tracebacks, or NaN rope_theta accepted)."""
    d = R.hf_config_dict("a")
    d[where][key] = value
    with pytest.raises(ConfigError, match=msg):
        Glm4vConfig.from_hf(d)


def test_config_hostile_mrope_section():
    for section in (["a", 1, 1], 5, [1.5, 1, 1]):
        d = R.hf_config_dict("a")
        d["text_config"]["rope_scaling"] = {"type": "default", "mrope_section": section}
        d["text_config"].pop("rope_parameters", None)
        with pytest.raises(ConfigError, match="'mrope_section' must be a list of positive integers"):
            Glm4vConfig.from_hf(d)


@pytest.mark.parametrize("where,key", [("text_config", "num_hidden_layers"), ("vision_config", "depth"),
                                       ("text_config", "num_attention_heads"), ("text_config", "num_key_value_heads")])
def test_config_absurd_counts_fail_before_anything_is_built(tmp_path, where, key):
    """A config.json asking for a billion layers (or heads) is one ConfigError at parse time, through `load` too;
    it used to build per-layer weight rules until the machine ran out of memory."""
    d = R.hf_config_dict("a")
    d[where][key] = 1_000_000_000
    with pytest.raises(ConfigError, match=f"'{key}' must be a positive integer \\(at most"):
        Glm4vConfig.from_hf(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=key):
        load(str(tmp_path))


def test_load_tied_checkpoint_dir(tmp_path):
    """A save_pretrained dir with tied embeddings (no lm_head tensor) loads and matches transformers."""
    from glm41v_jax import load

    d = R.hf_config_dict("d")
    hf = R.write_checkpoint(str(tmp_path), d, seed=2)
    params, cfg = load(str(tmp_path), as_numpy=True)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    c = R.build_prompt(np.random.default_rng(4), images=[(1, 4, 4)], patch_dim=cfg.vision.patch_dim)
    kw = R.to_torch(c)
    kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(c["input_ids"]))
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
    np.testing.assert_allclose(np.asarray(M.forward(params, cfg, **c)), ref, atol=1e-4, rtol=0)
