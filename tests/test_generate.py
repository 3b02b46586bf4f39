"""Generation: greedy parity with transformers' `generate`, KV-cache consistency, sampling semantics, compile counts.

Inputs are built as raw arrays (ids / pixels / grids) so that these tests do not depend on the processor; one
end-to-end test goes through `Processor`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from prompts import (
    GMASK,
    N_NEW,
    PAD,
    SOP,
    Ref,
    chat,
    hf_generate,
    image_span,
    make_inputs,
    pixels,
    text_ids,
    video_span,
)
from reference import to_torch

from glm41v_jax.buckets import bucket_length
from glm41v_jax.decode import prefill_logits, step_logits
from glm41v_jax.generate import Engine, GenerationError, generate, generate_batch
from glm41v_jax.inputs import mm_token_types
from glm41v_jax.model import Glm4v, forward
from glm41v_jax.requests import prepare_batch
from glm41v_jax.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample_tokens,
)


@pytest.fixture(scope="module")
def ref_a() -> Ref:
    return Ref("a")


@pytest.fixture(scope="module")
def ref_b() -> Ref:
    return Ref("b")


# ---------------------------------------------------------------------------------------------------------------
# Greedy parity with transformers.


def test_text_only(ref_a):
    rng = np.random.default_rng(0)
    inputs = make_inputs(ref_a.cfg, chat(text_ids(rng, 21)))
    ours = ref_a.ours(inputs)
    assert len(ours) == N_NEW
    assert ours == hf_generate(ref_a.hf, inputs)[0].tolist()


def test_one_image(ref_a):
    rng = np.random.default_rng(1)
    grid = (1, 6, 8)
    inputs = make_inputs(ref_a.cfg, chat(image_span(grid) + text_ids(rng, 7)), pixels(rng, ref_a.cfg, [grid]), [grid])
    assert ref_a.ours(inputs) == hf_generate(ref_a.hf, inputs)[0].tolist()


def test_two_images_of_different_sizes(ref_b):
    rng = np.random.default_rng(2)
    grids = [(1, 4, 6), (1, 10, 8)]
    body = text_ids(rng, 3) + image_span(grids[0]) + text_ids(rng, 4) + image_span(grids[1]) + text_ids(rng, 5)
    inputs = make_inputs(ref_b.cfg, chat(body), pixels(rng, ref_b.cfg, grids), grids)
    assert ref_b.ours(inputs) == hf_generate(ref_b.hf, inputs)[0].tolist()


def test_extreme_aspect_image(ref_a):
    rng = np.random.default_rng(3)
    grid = (1, 2, 40)  # 20:1
    inputs = make_inputs(ref_a.cfg, chat(image_span(grid) + text_ids(rng, 6)), pixels(rng, ref_a.cfg, [grid]), [grid])
    assert ref_a.ours(inputs) == hf_generate(ref_a.hf, inputs)[0].tolist()


def test_video_four_frames(ref_b):
    rng = np.random.default_rng(4)
    grid = (2, 6, 4)  # 2 temporal groups = 4 frames
    body = video_span(grid, [0, 1]) + text_ids(rng, 8)
    inputs = make_inputs(ref_b.cfg, chat(body), videos=pixels(rng, ref_b.cfg, [grid]), video_grids=[grid])
    assert (inputs["mm_token_type_ids"] == 2).sum() == 12
    assert ref_b.ours(inputs) == hf_generate(ref_b.hf, inputs)[0].tolist()


def test_repetition_penalty_greedy(ref_a):
    rng = np.random.default_rng(13)
    grid = (1, 4, 6)
    inputs = make_inputs(ref_a.cfg, chat(image_span(grid) + text_ids(rng, 6)), pixels(rng, ref_a.cfg, [grid]), [grid])
    res = ref_a.engine.generate(inputs, max_new_tokens=N_NEW, eos_ids=(),
                                sampling=SamplingParams(repetition_penalty=1.3))
    with torch.no_grad():
        want = ref_a.hf.generate(**to_torch(inputs), do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                 eos_token_id=None, pad_token_id=PAD, repetition_penalty=1.3)
    assert res.token_ids == want[0, inputs["input_ids"].shape[1]:].tolist()


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(14)
    logits = rng.standard_normal((2, 500)).astype(np.float32) * 3
    ids = rng.integers(0, 500, (2, 40))
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), torch.from_numpy(logits)).numpy()
    seen = np.zeros((2, 500), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3))
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    assert not np.allclose(ours, logits)


def test_left_padded_batch(ref_a):
    rng = np.random.default_rng(5)
    grid = (1, 4, 4)
    p0 = chat(image_span(grid) + text_ids(rng, 3))  # 15 tokens
    p1 = chat(text_ids(rng, 30))  # 36 tokens (a different prompt bucket than p0 alone)
    length = max(len(p0), len(p1))
    ids = np.full((2, length), PAD, np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, p in enumerate((p0, p1)):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    pix = pixels(rng, ref_a.cfg, [grid])
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_token_types(ids, ref_a.cfg),
             "pixel_values": pix, "image_grid_thw": np.asarray([grid])}
    ours = ref_a.engine.generate_batch(batch, max_new_tokens=N_NEW, eos_ids=())
    assert [r.prompt_token_ids for r in ours] == [p0, p1]
    hf_batch = hf_generate(ref_a.hf, batch)
    alone0 = make_inputs(ref_a.cfg, p0, pix, [grid])
    alone1 = make_inputs(ref_a.cfg, p1)
    for b, alone in enumerate((alone0, alone1)):
        assert ours[b].token_ids == hf_batch[b].tolist()
        assert ours[b].token_ids == ref_a.ours(alone)
        assert ours[b].token_ids == hf_generate(ref_a.hf, alone)[0].tolist()


def test_functional_api_and_eos(ref_a):
    rng = np.random.default_rng(6)
    inputs = make_inputs(ref_a.cfg, chat(text_ids(rng, 9)))
    free = generate(ref_a.params, ref_a.cfg, inputs, max_new_tokens=12, eos_ids=())
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    # Declare the 5th generated token an eos id: generation stops there and includes it.
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    res = generate(ref_a.params, ref_a.cfg, inputs, max_new_tokens=12, eos_ids=[stop])
    assert res.finish_reason == "eos" and res.token_ids == free.token_ids[: first + 1]
    streamed: list[int] = []
    res2 = generate(ref_a.params, ref_a.cfg, inputs, max_new_tokens=12, eos_ids=(), stream_callback=streamed.extend)
    assert streamed == res2.token_ids == free.token_ids
    assert set(res2.timings) >= {"compile_s", "prefill_s", "decode_tokens_per_s"}
    rows = generate_batch(ref_a.params, ref_a.cfg, inputs, max_new_tokens=12, eos_ids=())
    assert rows[0].token_ids == free.token_ids


# ---------------------------------------------------------------------------------------------------------------
# KV cache consistency.


def teacher_forced_logits(params, cfg, inputs, continuation):
    """Logits (N+1, V) from the engine's own device functions: prefill of the prompt (one row), then one cached
    decode step per continuation token. Row i predicts the token after `continuation[:i]`."""
    prep = prepare_batch(cfg, inputs, max(len(continuation), 1))
    assert prep.next_positions.shape[0] == 1, "one prompt"
    model = Glm4v(cfg)
    kw = jax.tree.map(jnp.asarray, prep.model_kwargs)
    prefill = jax.jit(lambda p, k: prefill_logits(p, k, model=model, cfg=cfg, max_len=prep.max_len))
    step = jax.jit(lambda *a: step_logits(*a, model=model), donate_argnums=(1,))
    logits, cache, kv_seg = prefill(params, kw)
    rows = [np.asarray(logits[0])]
    for i, tok in enumerate(continuation):
        logits, cache, kv_seg = step(params, cache, kv_seg, jnp.int32(prep.prompt_len + i),
                                     jnp.asarray(prep.next_positions + i), jnp.asarray([tok], jnp.int32))
        rows.append(np.asarray(logits[0]))
    return np.stack(rows)


def test_prefill_plus_decode_equals_long_prefill(ref_b):
    rng = np.random.default_rng(7)
    grid = (1, 4, 8)
    prompt = chat(image_span(grid) + text_ids(rng, 5))
    cont = text_ids(rng, 6)
    pix = pixels(rng, ref_b.cfg, [grid])
    inputs = make_inputs(ref_b.cfg, prompt, pix, [grid])
    stepped = teacher_forced_logits(ref_b.params, ref_b.cfg, inputs, cont)
    full_inputs = make_inputs(ref_b.cfg, prompt + cont, pix, [grid])
    full_inputs.pop("input_ids")
    full = np.asarray(forward(ref_b.params, ref_b.cfg, np.asarray([prompt + cont]), **full_inputs))[0]
    want = full[len(prompt) - 1:]
    assert stepped.shape == want.shape
    np.testing.assert_allclose(stepped, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Sampling.


def test_sampling_deterministic_and_topk1_is_greedy(ref_a):
    rng = np.random.default_rng(8)
    inputs = make_inputs(ref_a.cfg, chat(text_ids(rng, 11)))
    kw = dict(max_new_tokens=10, eos_ids=())
    s = SamplingParams(greedy=False, temperature=1.5, top_k=50, top_p=0.9)
    a = ref_a.engine.generate(inputs, sampling=s, seed=3, **kw).token_ids
    b = ref_a.engine.generate(inputs, sampling=s, seed=3, **kw).token_ids
    c = ref_a.engine.generate(inputs, sampling=s, seed=4, **kw).token_ids
    assert a == b and a != c
    full = SamplingParams(greedy=False, temperature=2.0)
    assert ref_a.engine.generate(inputs, sampling=full, seed=5, **kw).token_ids == \
        ref_a.engine.generate(inputs, sampling=full, seed=5, **kw).token_ids
    greedy = ref_a.engine.generate(inputs, **kw).token_ids
    top1 = ref_a.engine.generate(inputs, sampling=SamplingParams(greedy=False, temperature=0.7, top_k=1), seed=9, **kw)
    assert top1.token_ids == greedy


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.3, 20, None), (1.0, None, 0.8),
                                                     (0.5, 50, 0.9), (2.0, 5, 0.3)])
def test_warpers_match_hf(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(10).standard_normal((3, 1000)).astype(np.float32) * 3
    scores = torch.from_numpy(logits)
    ids = torch.zeros((3, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    ours = np.asarray(process_logits(jnp.asarray(logits), temperature, top_k, top_p))
    want = scores.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(want))
    np.testing.assert_allclose(ours[np.isfinite(ours)], want[np.isfinite(want)], rtol=1e-6)


def test_topk_topp_edges():
    x = jnp.asarray([[1.0, 3.0, 2.0, 3.0]])
    assert np.isinf(np.asarray(apply_top_k(x, 1))).tolist() == [[True, False, True, False]]  # ties survive
    assert np.isfinite(np.asarray(apply_top_p(x, 0.0))).sum() >= 1  # always keeps the best
    assert np.isfinite(np.asarray(apply_top_p(x, 1.0))).all()
    key = jax.random.PRNGKey(0)
    toks = sample_tokens(jnp.tile(x, (4, 1)), key, SamplingParams(greedy=False, top_k=2))
    assert set(np.asarray(toks).tolist()) <= {1, 3}
    with pytest.raises(ValueError):
        SamplingParams(greedy=False, temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Compile counting, buckets, errors.


def test_same_bucket_compiles_once(ref_b):
    eng = Engine(ref_b.params, ref_b.cfg, chunk_size=8)
    rng = np.random.default_rng(11)
    lengths = [10, 15, 20, 26]
    assert len({bucket_length(n + 6) for n in lengths}) == 1
    for n in lengths:
        res = eng.generate(make_inputs(ref_b.cfg, chat(text_ids(rng, n))), max_new_tokens=9, eos_ids=())
        assert len(res.token_ids) == 9
    assert eng.num_compiles == 2  # one prefill + one decode program
    eng.generate(make_inputs(ref_b.cfg, chat(text_ids(rng, 40))), max_new_tokens=9, eos_ids=())
    assert eng.num_compiles == 3  # a new prompt bucket: one more prefill, same decode program
    inputs = make_inputs(ref_b.cfg, chat(text_ids(rng, 14)))
    for temperature, top_p in [(0.5, 0.9), (1.7, 0.3)]:
        eng.generate(inputs, max_new_tokens=9, sampling=SamplingParams(greedy=False, temperature=temperature,
                                                                       top_k=10, top_p=top_p), seed=1)
    assert eng.num_compiles == 5  # sampling: one prefill + one decode, shared by every temperature / top_p


def test_errors(ref_a):
    with pytest.raises(GenerationError, match="too long"):
        ref_a.engine.generate({"input_ids": np.ones((1, 10), np.int64)}, max_new_tokens=70000)
    with pytest.raises(GenerationError, match="empty"):
        ref_a.engine.generate({"input_ids": np.ones((1, 4)), "attention_mask": np.zeros((1, 4))}, max_new_tokens=4)
    with pytest.raises(GenerationError, match="image"):
        ref_a.engine.generate({"input_ids": np.asarray([chat(image_span((1, 4, 4)))])}, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
# End to end through the processor.


def test_processor_end_to_end(tmp_path, ref_a):
    from PIL import Image

    from glm41v_jax import processing, tiny

    tiny.write_tokenizer_files(tmp_path)
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(tiny.TINY_PREPROCESSOR))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(tiny.TINY_VIDEO_PREPROCESSOR))
    img = np.random.default_rng(12).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    proc = processing.Processor.from_dir(tmp_path)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "x.png")},
                                         {"type": "text", "text": "What is this?"}]}]
    inputs = proc.encode_messages(msgs)
    assert inputs["input_ids"][0, :2].tolist() == [GMASK, SOP]
    ours = ref_a.ours(inputs, 16)
    assert ours == hf_generate(ref_a.hf, {k: v for k, v in inputs.items() if k != "video_metadata"}, 16)[0].tolist()
    assert isinstance(proc.decode(ours, skip_special_tokens=True), str)
