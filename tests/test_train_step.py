"""The SFT train step (train/): loss and gradients against transformers, packing, accumulation, freezing, weight-decay
masks, sharding, overfitting. Tiny O(1)-weight configs, float32, CPU (8 devices from conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as R
import torch

from glm41v_jax import backend, tiny, weights
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.inputs import pack_vision, prepare_inputs
from glm41v_jax.sharding import make_mesh
from glm41v_jax.weights import get_path
from glm41v_train import loss as L
from glm41v_train import optim as O
from glm41v_train import step as S

EOS = 151329
FP32 = S.StepConfig(compute_dtype="float32", loss_chunk=16, remat_policy="full")


# ---------------------------------------------------------------------------------------------------------------
# Samples and batches (processor-like arrays, built without the processor).


def sample(rng, cfg: Glm4vConfig, images=(), video=None, n_text=4, n_answer=6) -> dict:
    """A chat prompt (+ media) followed by an answer and <|endoftext|>; labels on the answer only (HF-aligned)."""
    p = R.build_prompt(rng, images=list(images), video=video, n_text=n_text, patch_dim=cfg.vision.patch_dim)
    answer = R.text_ids(rng, n_answer) + [EOS]
    prompt = p.pop("input_ids")[0].tolist()
    p["ids"] = np.asarray(prompt + answer, np.int64)
    p["labels"] = np.asarray([-100] * len(prompt) + answer, np.int64)
    return p


def hf_arrays(samples: list[dict], length: int | None = None) -> dict:
    """Right-padded (B, T) ids / mask / labels and the media of all rows concatenated in row order."""
    t = length or max(len(s["ids"]) for s in samples)
    ids = np.full((len(samples), t), EOS, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, s in enumerate(samples):
        n = len(s["ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = s["ids"], 1, s["labels"]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [s for s in samples if key in s]
        if parts:
            out[key] = np.concatenate([s[key] for s in parts])
            out[grid] = np.concatenate([s[grid] for s in parts])
    return out


def our_batch(cfg: Glm4vConfig, arrays: dict, vision_pad_to: int | None = None) -> dict:
    kw = {k: v for k, v in arrays.items() if k != "labels"}
    inputs = prepare_inputs(cfg, **kw, vision_pad_to=vision_pad_to, vision_attention="dense")
    return {**inputs.as_kwargs(), "labels": arrays["labels"].astype(np.int32)}


def hf_loss(hf, groups: list[list[dict]]) -> torch.Tensor:
    """Token-weighted mean of HF's losses over groups of samples. Transformers' Glm4v cannot take images and
    videos in one batch (its placeholder masks count video-frame <|image|> tokens as image tokens), so a mixed
    batch is one HF call per group, combined by label-token counts."""
    total, count = 0.0, 0
    for samples in groups:
        arrays = hf_arrays(samples)
        kw = R.to_torch(arrays)
        kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(arrays["input_ids"]))
        n = int((arrays["labels"][:, 1:] != -100).sum())
        total = total + hf(**kw).loss * n
        count += n
    return total / count


@pytest.fixture(scope="module")
def ref():
    return R.hf_and_params("a", seed=3)


# The step tests run a small-vocabulary twin of config "a" (random O(1) weights, no HF model needed): the special
# ids 151xxx are moved to 300 + (id - 151000), so a 700-token head replaces the 151552-token one and a step costs
# milliseconds instead of a second on CPU. The parity tests above keep the real vocabulary.
SMALL_VOCAB = 700


def small_ids(x):
    x = np.asarray(x)
    return np.where(x >= 151000, x - 151000 + 300, x)


@pytest.fixture(scope="module")
def small():
    d = R.hf_config_dict("a")
    d["text_config"].update(vocab_size=SMALL_VOCAB, pad_token_id=int(small_ids(EOS)),
                            eos_token_id=[int(small_ids(EOS))])
    for key in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                "video_start_token_id", "video_end_token_id"):
        d[key] = int(small_ids(d[key]))
    cfg = Glm4vConfig.from_hf(d)
    return cfg, weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=5), cfg)


def media_samples(cfg, seed=0) -> tuple[list[dict], list[list[dict]]]:
    """Rows with images, a video and text only; and the same rows grouped the way HF can take them."""
    rng = np.random.default_rng(seed)
    rows = [sample(rng, cfg, images=[(1, 4, 6)], n_answer=7),
            sample(rng, cfg, video=(2, 4, 4), n_text=3, n_answer=5),
            sample(rng, cfg, images=[(1, 2, 4), (1, 4, 4)], n_text=2, n_answer=9),
            sample(rng, cfg, n_text=8, n_answer=4)]
    return rows, [[rows[0], rows[2], rows[3]], [rows[1]]]


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers.


def test_loss_matches_transformers(ref):
    hf, cfg, params = ref
    rows, groups = media_samples(cfg)
    arrays = hf_arrays(rows)
    with torch.no_grad():
        want = float(hf_loss(hf, groups))
    tcfg = S.train_config(cfg, FP32)
    s, n = jax.jit(lambda p, b: L.loss_and_count(p, b, tcfg, chunk_size=16))(weights.stack_layers(params),
                                                                            our_batch(cfg, arrays))
    assert int(n) == int((arrays["labels"][:, 1:] != -100).sum())
    np.testing.assert_allclose(float(s) / float(n), want, rtol=1e-5)


def test_tied_head_loss_matches_transformers():
    # tied embeddings (the head is the (V, D) table), vision qkv bias, 7-px patches
    hf, cfg, params = R.hf_and_params("d", seed=4)
    rng = np.random.default_rng(9)
    rows = [sample(rng, cfg, images=[(1, 4, 4)]), sample(rng, cfg, n_text=7, n_answer=4)]
    with torch.no_grad():
        want = float(hf_loss(hf, [rows]))
    s, n = jax.jit(lambda p, b: L.loss_and_count(p, b, cfg, chunk_size=8))(params, our_batch(cfg, hf_arrays(rows)))
    np.testing.assert_allclose(float(s) / float(n), want, rtol=1e-5)


def test_gradients_match_torch(ref):
    hf, cfg, params = ref
    rows, groups = media_samples(cfg, seed=1)
    arrays = hf_arrays(rows)
    hf.zero_grad()
    hf_loss(hf, groups).backward()
    want = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    ts = S.TrainStep(cfg, O.OptimConfig(), sc=FP32)
    _, _, grads = ts.grads(ts.place_params(params), our_batch(cfg, arrays))
    got = weights.flax_to_hf(weights.unstack_layers(jax.tree.map(np.asarray, grads)), cfg)
    assert set(got) == set(want)
    worst = {}
    for name, g in want.items():
        err = np.linalg.norm(got[name] - g) / max(np.linalg.norm(g), 1e-30)
        worst[name] = err
        assert np.linalg.norm(g) > 0, name
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, bad
    print("worst relative gradient error", max(worst.values()), max(worst, key=worst.get))


# ---------------------------------------------------------------------------------------------------------------
# Packing and accumulation.


def _tokens(s, grid_key):
    return int(np.prod(s[grid_key], -1).sum()) // 4 if grid_key in s else 0


def packed_batch(cfg, rows: list[list[dict]], length: int, vision_pad: int = 8) -> dict:
    """Rows of samples concatenated: segment ids 1, 2, ... per row, per-sample M-RoPE positions, one vision pack of
    all images (row-major) then all videos, the order `vision_index` counts in."""
    flat = [s for row in rows for s in row]
    n_img, n_vid = [_tokens(s, "image_grid_thw") for s in flat], [_tokens(s, "video_grid_thw") for s in flat]
    out = {k: [] for k in ("input_ids", "labels", "segment_ids", "vision_index", "positions")}
    j = 0
    for row in rows:
        cols = {k: [] for k in out}
        for k, smp in enumerate(row):
            p = our_batch(cfg, hf_arrays([smp]))
            n = p["input_ids"].shape[1]
            v = np.full(n, -1) if p["vision_index"] is None else p["vision_index"][0]
            img_off, vid_off = sum(n_img[:j]), sum(n_img) + sum(n_vid[:j])
            cols["vision_index"].append(np.where(v < 0, -1, np.where(v < n_img[j], v + img_off,
                                                                     v - n_img[j] + vid_off)))
            cols["input_ids"].append(p["input_ids"][0])
            cols["labels"].append(p["labels"][0])
            cols["segment_ids"].append(np.full(n, k + 1))
            cols["positions"].append(p["positions"][:, 0])
            j += 1
        pad = length - sum(len(x) for x in cols["input_ids"])
        assert pad >= 0
        for key, fill in (("input_ids", EOS), ("labels", -100), ("segment_ids", 0), ("vision_index", -1)):
            out[key].append(np.concatenate([*cols[key], np.full(pad, fill)]))
        out["positions"].append(np.concatenate([*cols["positions"], np.zeros((3, pad))], axis=1))
    batch = {k: np.stack(v, axis=1 if k == "positions" else 0).astype(np.int32) for k, v in out.items()}
    media = hf_arrays(flat)
    n_rows = sum(len(media.get(k, ())) for k in ("pixel_values", "pixel_values_videos"))
    batch["vision"] = pack_vision(cfg, media.get("pixel_values"), media.get("image_grid_thw"),
                                  media.get("pixel_values_videos"), media.get("video_grid_thw"),
                                  pad_to=n_rows + vision_pad, vision_attention="dense")
    return batch


def test_packed_loss_equals_unpacked(ref):
    _, cfg, params = ref
    tcfg = S.train_config(cfg, FP32)
    sp = weights.stack_layers(params)
    rng = np.random.default_rng(5)
    samples = [sample(rng, cfg, images=[(1, 4, 4)], n_answer=8), sample(rng, cfg, n_text=6, n_answer=3),
               sample(rng, cfg, video=(2, 2, 4), n_answer=5), sample(rng, cfg, images=[(1, 2, 2)], n_answer=4)]
    samples[1]["labels"] = samples[1]["ids"].copy()  # every token a label, the first one included: only the
    # segment-boundary rule keeps the previous sample's last token from predicting it
    fn = jax.jit(lambda p, b: L.loss_and_count(p, b, tcfg, chunk_size=16))
    unpacked_sum, unpacked_count = fn(sp, our_batch(cfg, hf_arrays(samples)))  # one sample per padded row
    rows = [samples[:2], samples[2:]]
    length = 3 + max(sum(len(s["ids"]) for s in r) for r in rows)
    s, n = fn(sp, packed_batch(cfg, rows, length))
    assert float(n) == float(unpacked_count) == sum(int((x["labels"][1:] != -100).sum()) for x in samples)
    np.testing.assert_allclose(float(s) / float(n), float(unpacked_sum) / float(unpacked_count), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: weight-decay mask, frozen groups, bf16 moments, state shardings (no model compile).


def _toy_params(cfg):
    from glm41v_jax.model import abstract_params
    from glm41v_jax.sharding import unbox

    shapes = unbox(abstract_params(S.train_config(cfg, FP32)))
    return jax.tree.map(lambda a: jnp.ones(a.shape, jnp.float32), shapes)


def test_no_weight_decay_on_norms_and_biases(small):
    cfg, _ = small
    params = _toy_params(cfg)
    oc = O.OptimConfig(peak_lr=0.01, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=None)
    tx = O.make_optimizer(oc)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    lm = upd["language_model"]["layers"]
    # zero gradient: Adam's step is 0, so what remains is the decoupled decay -lr * wd * p (= -0.005) or nothing
    np.testing.assert_array_equal(lm["input_layernorm"]["scale"], 0.0)
    np.testing.assert_array_equal(lm["self_attn"]["q_proj"]["bias"], 0.0)
    np.testing.assert_array_equal(upd["visual"]["merger"]["post_projection_norm"]["bias"], 0.0)
    np.testing.assert_allclose(lm["self_attn"]["q_proj"]["kernel"], -0.005, rtol=1e-6)
    np.testing.assert_allclose(upd["lm_head"]["kernel"], -0.005, rtol=1e-6)
    np.testing.assert_allclose(upd["visual"]["position_embedding"], -0.005, rtol=1e-6)  # decayed (documented)
    no_emb = O.make_optimizer(O.OptimConfig(peak_lr=0.01, warmup_steps=0, total_steps=10, weight_decay=0.5,
                                            decay_embeddings=False))
    upd, _ = jax.jit(no_emb.update)(zeros, no_emb.init(params), params)
    np.testing.assert_array_equal(upd["visual"]["position_embedding"], 0.0)
    np.testing.assert_array_equal(upd["language_model"]["embed_tokens"]["embedding"], 0.0)
    np.testing.assert_allclose(upd["visual"]["patch_embed"]["kernel"], -0.005, rtol=1e-6)


def test_clip_takes_the_step_norm(small):
    """Through make_optimizer's chain, `grad_norm=` (the train step's one norm) replaces the clip's own: the true
    norm gives the same update as none, and a norm 4x the true one clips 4x harder, so the argument reaches the clip.
    b1 = b2 = 0, eps = 1: Adam's step is g / (|g| + 1), which sees the gradient's scale."""
    cfg, _ = small
    params = _toy_params(cfg)
    lr = 0.01
    tx = O.make_optimizer(O.OptimConfig(peak_lr=lr, warmup_steps=0, total_steps=10, b1=0.0, b2=0.0, eps=1.0,
                                        weight_decay=0.0, clip_norm=1.0))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    norm = float(O.global_norm(grads))
    update = jax.jit(lambda g, s, p, n: tx.update(g, s, p, grad_norm=n)[0])
    own = jax.jit(tx.update)(grads, tx.init(params), params)[0]
    given = update(grads, tx.init(params), params, jnp.float32(norm))
    harder = update(grads, tx.init(params), params, jnp.float32(4 * norm))
    for name, a, b, c in zip(["/".join(map(str, k)) for k, _ in jax.tree_util.tree_leaves_with_path(own)],
                             jax.tree.leaves(own), jax.tree.leaves(given), jax.tree.leaves(harder), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)
        for clipped, got in ((0.5 / norm, a), (0.5 / (4 * norm), c)):
            np.testing.assert_allclose(got, -lr * clipped / (clipped + 1.0), rtol=1e-5, err_msg=name)


def test_frozen_groups_get_no_update_and_no_moments(small):
    cfg, _ = small
    params = _toy_params(cfg)
    oc = O.OptimConfig(peak_lr=0.01, warmup_steps=0, total_steps=10, freeze=("vision",))
    tx = O.make_optimizer(oc)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
    upd, _ = jax.jit(tx.update)(grads, state, params)
    groups = O.param_groups(params)
    for g, u in zip(jax.tree.leaves(groups), jax.tree.leaves(upd), strict=True):
        assert (np.abs(np.asarray(u)).max() == 0) == (g == "vision"), g
    n_moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    n_train = sum(p.size for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(groups), strict=True)
                  if g != "vision")
    assert n_moments == 2 * n_train  # mu and nu for the trained leaves only
    with pytest.raises(ValueError, match="unknown group"):
        O.OptimConfig(freeze=("tower",))


def test_bf16_moments_stochastic_rounding():
    x = jnp.full((1 << 16,), 1.0 + 2.0**-10, jnp.float32)  # a quarter of a bf16 ulp above 1.0
    r = O.stochastic_round(x, jax.random.PRNGKey(0), jnp.bfloat16).astype(jnp.float32)
    assert set(np.unique(np.asarray(r)).tolist()) == {1.0, 1.0 + 2.0**-7}
    np.testing.assert_allclose(float(r.mean()), 1.0 + 2.0**-10, rtol=2e-5)
    # nu decays under zero gradients (round-to-nearest would keep 0.999 * 1.0 at 1.0 forever)
    tx = O.scale_by_adam_lowp(0.9, 0.999, 1e-8)
    p = {"w": jnp.zeros((4096,))}
    st = tx.init(p)._replace(nu={"w": jnp.ones((4096,), jnp.bfloat16)})
    step = jax.jit(lambda s: tx.update({"w": jnp.zeros((4096,))}, s)[1])
    for _ in range(300):
        st = step(st)
    assert st.nu["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(st.nu["w"].astype(jnp.float32).mean()), 0.999**300, rtol=1e-2)
    # and it tracks fp32 Adam on a real gradient sequence
    ref_tx, g = optax.scale_by_adam(0.9, 0.999, 1e-8), jax.random.normal(jax.random.PRNGKey(1), (50, 256))
    s16, s32 = tx.init({"w": g[0]}), ref_tx.init({"w": g[0]})
    for i in range(50):
        u16, s16 = tx.update({"w": g[i]}, s16)
        u32, s32 = ref_tx.update({"w": g[i]}, s32)
    np.testing.assert_allclose(u16["w"], u32["w"], atol=0.05)


@pytest.mark.parametrize("shape,dtype", [((300, 1024), jnp.float32), ((7, 1000, 3), jnp.float32),
                                         ((129, 2048), jnp.bfloat16), ((5,), jnp.float32)])
def test_sum_of_squares_and_clipping(monkeypatch, shape, dtype):
    """The blocked CPU sum of squares (forced here on small arrays: remainder rows, widths that are not 1024, bf16)
    equals NumPy's; the clip equals optax.clip_by_global_norm (and leaves gradients under the limit untouched)."""
    monkeypatch.setattr(backend, "BLOCKED_SUM_OF_SQUARES_MIN", 1)
    monkeypatch.setattr(backend, "SUM_OF_SQUARES_BLOCK", 4096)
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32).astype(dtype)
    want = np.sum(np.square(np.asarray(x, np.float64)))
    np.testing.assert_allclose(float(jax.jit(O.sum_of_squares)(x)), want, rtol=1e-5)
    tree = {"a": x, "b": 3.0 * jnp.ones((17,), dtype)}
    norm = np.sqrt(want + 9 * 17)
    np.testing.assert_allclose(float(jax.jit(O.global_norm)(tree)), norm, rtol=1e-5)
    for max_norm in (norm / 4, norm * 2):
        ours = jax.jit(lambda t, m=max_norm: O.clip_by_global_norm(m).update(t, optax.EmptyState())[0])(tree)
        if dtype == jnp.float32:  # (optax's own clip rejects bf16 leaves)
            ref = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())[0]
        else:
            ref = {k: np.asarray(t, np.float64) * min(1.0, max_norm / norm) for k, t in tree.items()}
        for k in tree:
            np.testing.assert_allclose(np.asarray(ours[k], np.float32), np.asarray(ref[k], np.float32),
                                       rtol=1e-5 if dtype == jnp.float32 else 1e-2)
        if max_norm > norm:
            np.testing.assert_array_equal(np.asarray(ours["a"], np.float32), np.asarray(x, np.float32))


def test_opt_state_mirrors_param_shardings(ref):
    _, cfg, _ = ref
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    ts = S.TrainStep(cfg, O.OptimConfig(state_dtype="bfloat16", freeze=("projector",)), mesh, FP32)
    state = jax.eval_shape(ts.tx.init, ts.abstract_params)
    mus = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, O.ScaleByAdamLowpState))
           if isinstance(x, O.ScaleByAdamLowpState)][0]
    q_sh = ts.param_shardings["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_sh.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    for tree in (mus.mu, mus.nu):
        sh = O.opt_state_shardings(tree, ts.abstract_params, ts.param_shardings, mesh)
        assert sh["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"] == q_sh
        assert tree["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert not jax.tree.leaves(mus.mu["visual"]["merger"])  # frozen: MaskedNode, no memory


# ---------------------------------------------------------------------------------------------------------------
# The jitted step: accumulation, freezing, sharding, overfitting.


def _batch_rows(cfg, seed, n, length, vision_pad):
    """n rows of the small-vocabulary config, each one sample (images on even rows, text on odd rows), padded to
    `length`, vision to `vision_pad`."""
    rng = np.random.default_rng(seed)
    rows = [sample(rng, cfg, images=[(1, 4, 4)] if i % 2 == 0 else (), n_text=3 + i % 3, n_answer=4 + i % 4)
            for i in range(n)]
    for r in rows:
        r["ids"], r["labels"] = small_ids(r["ids"]), np.where(r["labels"] < 0, r["labels"], small_ids(r["labels"]))
    return _small_batch(cfg, rows, length, vision_pad), rows


def _small_batch(cfg, rows, length, vision_pad):
    arrays = hf_arrays(rows, length)
    arrays["input_ids"] = small_ids(arrays["input_ids"])  # the padding id
    return our_batch(cfg, arrays, vision_pad_to=vision_pad)


def _run(ts, params, batches):
    p = ts.place_params(params)
    st = ts.init_opt_state(p)
    losses = []
    for b in batches:
        p, st, m = ts(p, st, b)
        losses.append(float(m["loss"]))
    return p, st, losses


OC = O.OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=100, eps=1e-6)


def test_grad_accumulation_equals_one_batch(small):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: the same token-weighted mean loss and the same gradient, the
    input of the (deterministic) optimizer update. The two differ only in fp32 summation order (different matmul
    shapes), which this O(1)-weight network amplifies to ~2e-6 over the whole tree (3e-7 when the same comparison
    runs the network in float64), so: 5e-6 over the tree, 1e-5 per tensor (the k-bias gradient is a sum of nearly
    cancelling terms). Updates are not compared elementwise: Adam's first step g / (|g| + eps) amplifies such
    differences near g = 0 by up to 1/eps."""
    cfg, params = small
    big, rows = _batch_rows(cfg, 11, 4, 40, 64)
    micro = [_small_batch(cfg, rows[i:i + 2], 40, 32) for i in (0, 2)]
    one = S.TrainStep(cfg, OC, sc=FP32)
    two = S.TrainStep(cfg, OC, sc=S.dataclasses.replace(FP32, accum_steps=2))
    l1, n1, g1 = one.grads(one.place_params(params), big)
    l2, n2, g2 = two.grads(two.place_params(params), S.stack_batches(micro))
    assert float(n1) == float(n2) == sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    num = den = 0.0
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g1), jax.tree.leaves(g2),
                          strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a) > 0
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), jax.tree_util.keystr(path[0])
        num, den = num + np.sum((b - a) ** 2), den + np.sum(a**2)
    assert np.sqrt(num / den) <= 5e-6


def test_unrolled_step_equals_scanned(small):
    """StepConfig(scan_layers=False) (per-layer weights, the faster layout on XLA:CPU) runs the same step: the same
    loss and gradients as the scanned step, and two updates that stay equal (params compared after unstacking)."""
    cfg, params = small
    batch, _ = _batch_rows(cfg, 13, 2, 40, 64)
    scanned = S.TrainStep(cfg, OC, sc=FP32)
    unrolled = S.TrainStep(cfg, OC, sc=S.dataclasses.replace(FP32, scan_layers=False))
    assert unrolled.cfg.runtime.scan_layers is False
    ps, pu = scanned.place_params(params), unrolled.place_params(params)
    assert "layers_0" in pu["language_model"] and "layers" in ps["language_model"]
    ls, ns, gs = scanned.grads(ps, batch)
    lu, nu, gu = unrolled.grads(pu, batch)
    assert float(ns) == float(nu)
    np.testing.assert_allclose(float(lu), float(ls), rtol=1e-6)
    gs = weights.unstack_layers(jax.tree.map(np.asarray, gs))
    for path, a in jax.tree_util.tree_flatten_with_path(gs)[0]:
        b = np.asarray(get_path(gu, tuple(str(getattr(k, "key", k)) for k in path)))
        assert np.linalg.norm(b - a) <= 1e-5 * max(np.linalg.norm(a), 1e-30), jax.tree_util.keystr(path)
    os_, ou = scanned.init_opt_state(ps), unrolled.init_opt_state(pu)
    for _ in range(2):
        ps, os_, ms = scanned(ps, os_, batch)
        pu, ou, mu = unrolled(pu, ou, batch)
        np.testing.assert_allclose(float(mu["loss"]), float(ms["loss"]), rtol=1e-5)
    for path, a in jax.tree_util.tree_flatten_with_path(weights.unstack_layers(jax.tree.map(np.asarray, ps)))[0]:
        b = np.asarray(get_path(pu, tuple(str(getattr(k, "key", k)) for k in path)))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_frozen_decoder_is_unchanged(small):
    cfg, params = small
    batch, _ = _batch_rows(cfg, 12, 2, 40, 32)
    ts = S.TrainStep(cfg, S.dataclasses.replace(OC, freeze=("decoder",)), sc=FP32)
    p, st, _ = _run(ts, params, [batch])
    start = weights.stack_layers(params)
    groups = O.param_groups(start)
    for path, g, a, b in zip(jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(groups),
                             jax.tree.leaves(start), jax.tree.leaves(p), strict=True):
        changed = bool(np.abs(np.asarray(b) - a).max() > 0)
        assert changed == (g != "decoder"), (jax.tree_util.keystr(path[0]), g)
    moments = [x for x in jax.tree.leaves(st) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(np.size(a) for a, g in zip(jax.tree.leaves(start),
                                                                             jax.tree.leaves(groups), strict=True)
                                                   if g != "decoder")


def test_sharded_steps_match_single_device(small):
    cfg, params = small
    batch, _ = _batch_rows(cfg, 13, 8, 40, 128)
    runs = {}
    for name, mesh in (("1 device", None), ("fsdp=4,tensor=2", make_mesh({"fsdp": 4, "tensor": 2})),
                       ("data=2,fsdp=4", make_mesh({"data": 2, "fsdp": 4}))):
        ts = S.TrainStep(cfg, OC, mesh, FP32)
        runs[name] = _run(ts, params, [ts.shard_batch(batch) if mesh is not None else batch] * 5)[2]
    base = runs.pop("1 device")
    assert base[-1] < base[0]
    for name, losses in runs.items():
        np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=name)


def test_overfits_eight_samples(small):
    cfg, params = small
    batch, _ = _batch_rows(cfg, 14, 8, 40, 64)
    oc = O.OptimConfig(peak_lr=3e-3, warmup_steps=5, total_steps=50, end_lr=3e-4, weight_decay=0.0)
    _, _, losses = _run(S.TrainStep(cfg, oc, sc=FP32), params, [batch] * 50)
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


def test_bf16_recipe_trains(small):
    """The memory recipe (bf16 compute, bf16 gradients, bf16 moments, remat dots, frozen vision tower, sharded):
    fp32 master weights stay fp32, the first loss agrees with fp32 to bf16 accuracy, and the loss falls."""
    cfg, params = small
    batch, _ = _batch_rows(cfg, 15, 4, 32, 64)
    sc = S.StepConfig(compute_dtype="bfloat16", grad_dtype="bfloat16", remat_policy="dots", loss_chunk=16)
    oc = O.OptimConfig(peak_lr=3e-3, warmup_steps=0, total_steps=20, state_dtype="bfloat16", freeze=("vision",))
    ts = S.TrainStep(cfg, oc, make_mesh({"fsdp": 4, "tensor": 2}), sc)
    p, st, losses = _run(ts, params, [ts.shard_batch(batch)] * 3)
    tcfg = S.train_config(cfg, FP32)
    s, n = jax.jit(lambda p, b: L.loss_and_count(p, b, tcfg))(weights.stack_layers(params), batch)
    np.testing.assert_allclose(losses[0], float(s) / float(n), rtol=2e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(st) if x.ndim > 0 and x.dtype != jnp.uint32} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("label_rows", [0, 3, 17, 64])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_head_over_label_rows_equals_full_logits(label_rows, vocab_major):
    """The fused head (label rows compacted to the front, chunks of 8 rows, label-free chunks skipped) gives the
    loss and both gradients of plain autodiff through full (B, T, V) logits; 0 label rows included."""
    rng = np.random.default_rng(label_rows)
    b, t, d, v = 2, 32, 16, 50
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d) if vocab_major else (d, v)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    wt = np.zeros(b * t, np.float32)
    wt[rng.choice(b * t, label_rows, replace=False)] = 1.0
    wt = jnp.asarray(wt.reshape(b, t))

    def fused(h, w):
        return L.head_cross_entropy(h, w, tgt, wt, 8, vocab_major, "float32")

    def plain(h, w):
        logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, w)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0] * wt)

    (lf, gf), (lp, gp) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w) for f in (fused, plain))
    np.testing.assert_allclose(float(lf), float(lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(jax.jit(fused)(h, w)), float(lp), rtol=1e-5, atol=1e-5)  # forward-only path
    for a, r in zip(gf, gp, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
    if label_rows == 0:
        assert float(lf) == 0.0 and not np.asarray(gf[0]).any() and not np.asarray(gf[1]).any()


def test_bf16_params_update_by_stochastic_rounding():
    """`apply_updates` on bf16 leaves: an update of a quarter bf16 step is kept in expectation (round-to-nearest, as
    optax.apply_updates does, drops it), different leaves get different draws, fp32 leaves add exactly."""
    w = jnp.full((1 << 15,), 1.0, jnp.bfloat16)
    u = jnp.full(w.shape, 2.0**-9, jnp.float32)  # a quarter of the bf16 step at 1.0
    out = S.apply_updates({"a": w, "b": w, "c": w.astype(jnp.float32)}, {"a": u, "b": u, "c": u},
                          jax.random.key(3))
    assert out["a"].dtype == out["b"].dtype == jnp.bfloat16 and out["c"].dtype == jnp.float32
    np.testing.assert_allclose(float(out["a"].astype(jnp.float32).mean()), 1.0 + 2.0**-9, rtol=5e-5)
    assert not np.array_equal(np.asarray(out["a"]), np.asarray(out["b"]))
    np.testing.assert_array_equal(np.asarray(out["c"]), 1.0 + 2.0**-9)
    assert float(optax.apply_updates({"a": w}, {"a": u})["a"].astype(jnp.float32).mean()) == 1.0  # what SR avoids


def test_bf16_param_dtype_step(small):
    """`step.param_dtype: bfloat16`: the weights and their moments' params stay bf16 through steps, the gradients
    are bf16, and the losses follow the fp32-master run of the same batches within bf16 precision."""
    cfg, params = small
    batches = [_batch_rows(cfg, 20 + i, 2, 40, 32)[0] for i in range(3)]
    sc16 = S.dataclasses.replace(FP32, param_dtype="bfloat16", grad_dtype="bfloat16")
    ts16, ts32 = S.TrainStep(cfg, OC, sc=sc16), S.TrainStep(cfg, OC, sc=FP32)
    p16, _, l16 = _run(ts16, params, batches)
    _, _, l32 = _run(ts32, params, batches)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    assert all(np.isfinite(l16))
    np.testing.assert_allclose(l16, l32, rtol=0.05)
    assert l16[-1] < l16[0]
    with pytest.raises(ValueError, match="param_dtype"):
        S.StepConfig(param_dtype="float16")
