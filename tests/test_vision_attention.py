"""The grouped (segment-major) vision attention plan against the dense (P x P) masked reference.

The dense path is the tower with the dense plan (`vision_attention="dense"`: no `attn_*` arrays). Segment
lengths are h*w of even grids (multiples of 4, the 2x2 merge constraint).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
import torch

from glm41v_jax import inputs, vision, vision_plan, weights
from glm41v_jax import model as M
from glm41v_jax.buckets import vision_bucket
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.programs import signature

TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    cfg = Glm4vConfig.from_hf(R.hf_config_dict("a"))
    m2 = cfg.vision.spatial_merge_size**2
    dummy = inputs.pack_vision(cfg, np.zeros((m2, cfg.vision.patch_dim), np.float32), np.array([[1, 2, 2]]), None, None)
    visual = vision.VisionModel(cfg).init(jax.random.PRNGKey(1), dummy)["params"]
    return cfg, {"visual": nn.meta.unbox(visual)}  # the tower's params only


def _grids(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "random":
        return np.array([[1, 2 * rng.integers(1, 9), 2 * rng.integers(1, 9)] for _ in range(5)])
    if kind == "many_tiny":
        return np.array([[1, 2, 2]] * 23 + [[1, 2, 4]] * 5)
    if kind == "big_and_small":
        return np.array([[1, 2, 2], [1, 16, 12]] + [[1, 2, 2 * rng.integers(1, 4)] for _ in range(9)])
    if kind == "equal":  # like video frames
        return np.array([[1, 6, 8]] * 6)
    raise ValueError(kind)


def _tower(cfg, params, packed):
    fn = jax.jit(lambda p, kw: M.Glm4v(cfg).apply({"params": p}, kw, method=M.Glm4v.encode_vision))
    return np.asarray(fn(params, packed))


@pytest.mark.parametrize("kind", ["random", "many_tiny", "big_and_small", "equal"])
@pytest.mark.parametrize("pad", [0, 36])
def test_grouped_matches_dense(setup, kind, pad):
    cfg, params = setup
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    grids = _grids(rng, kind)
    n = int(np.prod(grids, -1).sum())
    pix = rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    dense = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + pad, vision_attention="dense")
    grouped = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + pad, vision_attention="grouped")
    assert dense.attn_groups == () and dense.attn_inverse is None and grouped.grouped
    ref = _tower(cfg, params, dense)[: n // 4]
    out = _tower(cfg, params, grouped)
    np.testing.assert_allclose(out[: n // 4], ref, atol=TOL, rtol=0)
    assert np.isfinite(out).all()  # padding rows too


@pytest.mark.parametrize("kind", ["big_and_small", "equal"])
def test_grouped_scanned_remat_and_grads(setup, kind):
    """scan_layers + remat (the plan is broadcast to every block) and the gradients through the gathers."""
    cfg, params = setup
    rng = np.random.default_rng(7)
    grids = _grids(rng, kind)
    n = int(np.prod(grids, -1).sum())
    pix = rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((n // 4, cfg.vision.out_hidden_size)).astype(np.float32))

    def loss(c, p, packed):
        out = M.Glm4v(c).apply({"params": p}, packed, method=M.Glm4v.encode_vision)
        return jnp.sum(out[: n // 4] * w)

    dense = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + 8, vision_attention="dense")
    grouped = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + 8, vision_attention="grouped")
    g_ref = jax.jit(jax.grad(lambda p, kw: loss(cfg, p, kw)))(params, dense)
    for rt in (dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots")):
        c = cfg.with_runtime(**rt)
        p = weights.stack_layers(params) if c.runtime.scan_layers else params
        out = _tower(c, p, grouped)[: n // 4]
        np.testing.assert_allclose(out, _tower(cfg, params, dense)[: n // 4], atol=TOL, rtol=0)
        g = jax.jit(jax.grad(lambda p, kw, c=c: loss(c, p, kw)))(p, grouped)
        if c.runtime.scan_layers:
            g_ref_c = weights.stack_layers(g_ref)
        else:
            g_ref_c = g_ref
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref_c), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_attention_impl_reaches_the_tower(setup, monkeypatch):
    """RuntimeConfig.attention_impl is threaded into the vision attention: "pallas" (splash kernel, Pallas
    interpreter on CPU) runs the grouped plan's calls and matches the dense XLA reference."""
    from glm41v_jax import attention as A

    cfg, params = setup
    calls = []
    real = A.pallas_attention
    monkeypatch.setattr(A, "PALLAS_INTERPRET", True)
    monkeypatch.setattr(A, "pallas_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4], [1, 4, 4]])
    n = int(np.prod(grids, -1).sum())
    pix = np.random.default_rng(0).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    ref = _tower(cfg, params, inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + 8, vision_attention="dense"))
    grouped = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=n + 8, vision_attention="grouped")
    out = _tower(cfg.with_runtime(attention_impl="pallas"), params, grouped)
    assert calls and all(s[:2] == grouped.attn_groups[0].shape for s in calls)
    np.testing.assert_allclose(out[: n // 4], ref[: n // 4], atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_layout_tables_cover_every_row_once(seed):
    rng = np.random.default_rng(seed)
    lens = (4 * rng.integers(1, 1 + rng.choice([2, 40, 400]), size=rng.integers(1, 40))).tolist()
    total = sum(lens) + 4 * int(rng.integers(0, 30))
    groups, inv = vision_plan.plan_tables(lens, total, "grouped")
    flat = np.concatenate([t.reshape(-1) for t in groups])
    n = sum(lens)
    np.testing.assert_array_equal(flat[inv[:n]], np.arange(n))  # every real row is in exactly one slot
    assert (inv[n:] == flat.size).all()  # padding rows point past the end (-> 0)
    assert np.sort(flat[flat >= 0]).tolist() == list(range(n))
    seg_of = np.repeat(np.arange(len(lens)), lens)
    for t in groups:
        assert t.shape[1] % 16 == 0 and t.shape[0] & (t.shape[0] - 1) == 0  # power-of-two buckets
        for row in t:  # a row holds whole segments, each as one contiguous run, then empty slots
            r = row[row >= 0]
            assert (row[len(r):] == -1).all()
            for s in np.unique(seg_of[r]):
                np.testing.assert_array_equal(r[seg_of[r] == s], np.flatnonzero(seg_of == s))


def test_auto_rule():
    p = vision_plan.plan_attention([1024], 1024)
    assert p.mode == "dense"  # one image filling its bucket: the gathers would be pure overhead
    p = vision_plan.plan_attention([1024] * 4, 4096)
    assert p.mode == "grouped" and p.shape_key == ("grouped", ((4, 1024),))
    p = vision_plan.plan_attention([1024] * 8, 8192)  # a 16-frame video
    assert p.shape_key == ("grouped", ((8, 1024),))
    p = vision_plan.plan_attention([4096] + [256] * 6, 6144)  # one 896x896 + six 224x224: a group for each size
    assert p.shape_key == ("grouped", ((8, 256), (1, 4096)))
    assert p.grouped_cost < 0.5 * p.dense_cost
    p = vision_plan.plan_attention([4] * 200, 1024)  # tiny segments share rows
    assert p.shape_key == ("grouped", ((64, 16),)) and len(p.groups[0][2]) == 50
    p = vision_plan.plan_attention([1024, 512, 256, 256], 2048)  # packed into 2 rows of 1024
    assert p.shape_key == ("grouped", ((2, 1024),))
    with pytest.raises(ValueError, match="plan must be one of"):
        vision_plan.plan_attention([4], 4, "banded")


def _vision_key(cfg, grids):
    n = int(np.prod(grids, -1).sum())
    pix = np.zeros((n, cfg.vision.patch_dim), np.float32)
    packed = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=vision_bucket(n))
    return signature(jax.tree.map(np.asarray, packed))  # the generation engine's compile key for these arrays


def _random_grid(rng):  # 8x8 to 64x64 patches (112 to 896 px), even sides
    return [1, 2 * int(rng.integers(4, 33)), 2 * int(rng.integers(4, 33))]


@pytest.mark.parametrize("seed", range(3))
def test_compiled_shapes_stay_bounded(setup, seed):
    """Compile keys (programs.signature of the VisionInputs) over 12 random image sizes: one image per request and
    batches of 4 equal images add no key to the dense path's (one per patch bucket); batches of 4 images of 4
    random sizes add at most a few per patch bucket."""
    cfg, _ = setup
    rng = np.random.default_rng(seed)
    for make in (lambda: [_random_grid(rng)], lambda: [_random_grid(rng)] * 4):
        grids = [np.array(make()) for _ in range(12)]
        keys = {_vision_key(cfg, g) for g in grids}
        dense_keys = {vision_bucket(int(np.prod(g, -1).sum())) for g in grids}
        assert len(keys) == len(dense_keys), (len(keys), len(dense_keys))
    grids = [np.array([_random_grid(rng) for _ in range(4)]) for _ in range(12)]
    keys = {_vision_key(cfg, g) for g in grids}
    dense_keys = {vision_bucket(int(np.prod(g, -1).sum())) for g in grids}
    assert len(keys) <= 3 * len(dense_keys), (len(keys), len(dense_keys))


def test_layout_menu_is_small():
    """500 random requests of 1-6 images of random sizes (~490 distinct size lists): few distinct plans, all from
    the menu (powers of two, at most 2 groups), and on average well under the dense cost."""
    rng = np.random.default_rng(0)
    sizes, keys, ratio = set(), set(), []
    for _ in range(500):
        lens = tuple(int(np.prod(_random_grid(rng))) for _ in range(int(rng.integers(1, 7))))
        total = vision_bucket(sum(lens))
        plan = vision_plan.plan_attention(lens, total)
        sizes.add(lens)
        keys.add((total, plan.shape_key))
        for n, length, _ in plan.groups:
            assert n & (n - 1) == 0 and length & (length - 1) == 0 and length >= 16
        assert len(plan.groups) <= 2
        ratio.append((plan.grouped_cost if plan.mode == "grouped" else plan.dense_cost) / plan.dense_cost)
    dense_keys = {k[0] for k in keys}
    assert len(sizes) > 450 and len(keys) <= 5 * len(dense_keys), (len(sizes), len(keys), len(dense_keys))
    assert max(ratio) <= 1.0 and np.mean(ratio) < 0.7


def test_forward_grouped_matches_transformers():
    """Whole-model logits with the grouped plan forced, against transformers (two images, 20:1, video, batch)."""
    hf, cfg, params = R.hf_and_params("d", seed=7)  # qkv bias, 7-px patches
    rng = np.random.default_rng(0)
    pd = cfg.vision.patch_dim
    cases = [R.build_prompt(rng, images=[(1, 6, 4), (1, 2, 2), (1, 4, 4)], patch_dim=pd),
             R.build_prompt(rng, images=[(1, 2, 40), (1, 2, 2)], patch_dim=pd),
             R.build_prompt(rng, video=(3, 4, 4), patch_dim=pd),
             R.left_pad_batch([R.build_prompt(rng, images=[(1, 4, 4)], n_text=3, patch_dim=pd),
                               R.build_prompt(rng, images=[(1, 2, 6)], n_text=12, patch_dim=pd)])]
    for c in cases:
        kw = R.to_torch(c)
        kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(c["input_ids"]))
        with torch.no_grad():
            ref = hf(**kw).logits.numpy()
        mi = inputs.prepare_inputs(cfg, **c, vision_attention="grouped")
        assert mi.vision.grouped
        out = np.asarray(jax.jit(lambda p, kw: M.Glm4v(cfg).apply({"params": p}, **kw))(params, mi.as_kwargs()))
        mask = c.get("attention_mask", np.ones(c["input_ids"].shape)).astype(bool)
        assert np.abs(out - ref)[mask].max() <= 1e-4
