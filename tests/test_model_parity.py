"""Whole-model and component parity against transformers' Glm4vForConditionalGeneration (float32, O(1) weights)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
import torch

from glm41v_jax import inputs, weights
from glm41v_jax import model as M

TOL = 1e-4


@pytest.fixture(scope="module", params=["a", "b", "c", "d"])
def pair(request):
    return (request.param, *R.hf_and_params(request.param, seed=7))


def _cases(rng: np.random.Generator, pd: int = 1176):
    return {
        "text": R.build_prompt(rng, n_text=9),
        "one_image": R.build_prompt(rng, images=[(1, 4, 6)], patch_dim=pd),
        "two_images": R.build_prompt(rng, images=[(1, 6, 4), (1, 2, 2)], patch_dim=pd),
        "aspect_20": R.build_prompt(rng, images=[(1, 2, 40)], patch_dim=pd),  # 1:20 in patches
        "video": R.build_prompt(rng, video=(3, 4, 4), patch_dim=pd),  # 3 temporal groups = 6 frames, ts 0 1 2
        "batch": R.left_pad_batch([R.build_prompt(rng, images=[(1, 4, 4)], n_text=3, patch_dim=pd),
                                   R.build_prompt(rng, images=[(1, 2, 6)], n_text=12, patch_dim=pd)]),
        "text_batch": R.left_pad_batch([R.build_prompt(rng, n_text=2), R.build_prompt(rng, n_text=11)]),
    }


def _hf_logits(hf, case: dict[str, np.ndarray]) -> np.ndarray:
    kw = R.to_torch(case)
    kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(case["input_ids"]))
    if "pixel_values" not in case and "pixel_values_videos" not in case and "attention_mask" in case:
        # Text-only left-padded batch: HF forward would use arange positions; generate uses the mask-aware
        # positions below, which is what we compute. Pass them explicitly.
        m = kw["attention_mask"]
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        kw["position_ids"] = pos[None].expand(3, -1, -1)
    with torch.no_grad():
        return hf(**kw).logits.numpy()


@pytest.mark.parametrize("case", ["text", "one_image", "two_images", "aspect_20", "video", "batch", "text_batch"])
def test_logits_match_transformers(pair, case):
    name, hf, cfg, params = pair
    c = _cases(np.random.default_rng(abs(hash((name, case))) % 2**32), cfg.vision.patch_dim)[case]
    ref = _hf_logits(hf, c)
    out = np.asarray(M.forward(params, cfg, **c))
    mask = c.get("attention_mask", np.ones(c["input_ids"].shape)).astype(bool)
    err = np.abs(out - ref)[mask].max()
    assert err <= TOL, f"config {name} case {case}: max |dlogit| {err}"
    assert (out.argmax(-1) == ref.argmax(-1))[mask].all()


def test_scanned_equals_unrolled(pair):
    name, hf, cfg, params = pair
    c = _cases(np.random.default_rng(3), cfg.vision.patch_dim)["two_images"]
    ref = np.asarray(M.forward(params, cfg, **c))
    scfg = cfg.with_runtime(scan_layers=True, remat_policy="full")
    out = np.asarray(M.forward(weights.stack_layers(params), scfg, **c))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # same math, different fusion order


def test_vision_tower_matches(pair):
    """The vision tower + merger output against HF's `get_image_features` (pooler output)."""
    name, hf, cfg, params = pair
    rng = np.random.default_rng(11)
    grids = np.array([[1, 6, 4], [1, 2, 8], [1, 4, 4]])
    pix = rng.standard_normal((int(np.prod(grids, -1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(torch.from_numpy(pix), torch.from_numpy(grids)).pooler_output)
    packed = inputs.pack_vision(cfg, pix, grids, None, None, pad_to=pix.shape[0] + 8)  # padding must not leak
    out = M.Glm4v(cfg).apply({"params": params}, packed, method=M.Glm4v.encode_vision)
    np.testing.assert_allclose(np.asarray(out)[: ref.shape[0]], ref.numpy(), atol=TOL, rtol=0)


def test_get_rope_index_matches(pair):
    name, hf, cfg, params = pair
    rng = np.random.default_rng(5)
    for case in _cases(rng, cfg.vision.patch_dim).values():
        ids = case["input_ids"]
        mask = case.get("attention_mask")
        types = R.mm_types(ids)
        ref_pos, ref_delta = hf.model.get_rope_index(
            torch.from_numpy(ids), torch.from_numpy(types),
            image_grid_thw=torch.from_numpy(case["image_grid_thw"]) if "image_grid_thw" in case else None,
            video_grid_thw=torch.from_numpy(case["video_grid_thw"]) if "video_grid_thw" in case else None,
            attention_mask=torch.from_numpy(mask) if mask is not None else None)
        pos, delta = inputs.get_rope_index(ids, types, case.get("image_grid_thw"), case.get("video_grid_thw"), mask)
        m = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        np.testing.assert_array_equal(pos[:, m], ref_pos.numpy()[:, m])
        np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_spec_worked_example_rope_index():
    """docs/MODEL.md §4.4 worked example (system prompt, 3x5 and 2x2 merged images), independent of HF."""
    # 8 text tokens: [gMASK] <sop> <|system|> \n 'sys' <|user|> \n <boi>
    ids = [R.GMASK, R.SOP, 151335, R.NL, 120, R.USER, R.NL, R.BOI] + [R.IMG] * 15 + [R.EOI, R.BOI] + [R.IMG] * 4 \
        + [R.EOI] + [130] * 5 + [R.ASSISTANT, R.NL]
    ids = np.asarray([ids])
    assert ids.shape[1] == 37
    pos, delta = inputs.get_rope_index(ids, R.mm_types(ids), np.array([[1, 6, 10], [1, 4, 4]]), None, None)
    t, h, w = pos[:, 0]
    np.testing.assert_array_equal(t[:8], np.arange(8))
    np.testing.assert_array_equal(t[8:23], 8)
    np.testing.assert_array_equal(h[8:23], np.repeat([8, 9, 10], 5))
    np.testing.assert_array_equal(w[8:23], np.tile(np.arange(8, 13), 3))
    np.testing.assert_array_equal(t[23:25], [13, 14])
    np.testing.assert_array_equal(h[25:29], [15, 15, 16, 16])
    np.testing.assert_array_equal(w[25:29], [15, 16, 15, 16])
    np.testing.assert_array_equal(t[29:], np.arange(17, 25))
    assert delta[0] == 24 + 1 - 37
