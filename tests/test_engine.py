"""The generation engine (issue 3): batched requests against transformers row by row, per-row limits, the thinking
budget inside the compiled loop, meshes on 8 CPU devices, buckets / warmup / compile counts, and limits.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from prompts import (
    IMG,
    Ref,
    chat,
    hf_generate,
    image_span,
    make_inputs,
    pixels,
    text_ids,
    video_span,
)

from glm41v_jax import tiny, weights
from glm41v_jax.buckets import bucket_length, cache_length, kv_cache_bytes, vision_bucket
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.engine import Engine
from glm41v_jax.requests import GenerationError, collate
from glm41v_jax.sampling import SamplingParams
from glm41v_jax.sharding import make_mesh

THINK, END_THINK, ANSWER = 151350, 151351, 151347
N = 24


@pytest.fixture(scope="module")
def ref_a() -> Ref:
    return Ref("a")


def four_prompts(cfg: Glm4vConfig) -> list[dict]:
    """Text only; two images of different sizes; a 20:1 image; a 4-frame video (2 temporal patches)."""
    rng = np.random.default_rng(40)
    g2 = [(1, 4, 6), (1, 8, 4)]
    g3 = (1, 2, 40)
    gv = (2, 4, 4)
    return [
        make_inputs(cfg, chat(text_ids(rng, 13))),
        make_inputs(cfg, chat(image_span(g2[0]) + text_ids(rng, 3) + image_span(g2[1]) + text_ids(rng, 5)),
                    pixels(rng, cfg, g2), g2),
        make_inputs(cfg, chat(image_span(g3) + text_ids(rng, 6)), pixels(rng, cfg, [g3]), [g3]),
        make_inputs(cfg, chat(video_span(gv, [0, 2]) + text_ids(rng, 4)), videos=pixels(rng, cfg, [gv]),
                    video_grids=[gv]),
    ]


def test_batched_requests_match_transformers_alone(ref_a):
    prompts = four_prompts(ref_a.cfg)
    res = ref_a.engine.generate_batch(collate(prompts, ref_a.cfg.text.pad_token_id), max_new_tokens=N, eos_ids=())
    for i, (p, r) in enumerate(zip(prompts, res, strict=True)):
        assert r.token_ids == hf_generate(ref_a.hf, p, N)[0].tolist(), f"row {i}"
        assert r.prompt_token_ids == p["input_ids"][0].tolist()
    # Per-row limits: each row stops at its own limit with the same tokens.
    limits = [3, N, 9, 1]
    short = ref_a.engine.generate_batch(collate(prompts), max_new_tokens=limits, eos_ids=())
    for r_full, r, lim in zip(res, short, limits, strict=True):
        assert r.token_ids == r_full.token_ids[:lim]
        assert r.finish_reason == "length"


def test_per_row_eos_stopping(ref_a):
    prompts = four_prompts(ref_a.cfg)
    full = ref_a.engine.generate_batch(collate(prompts), max_new_tokens=N, eos_ids=())
    # Make row 1's 5th token and row 2's 2nd token the eos: those rows stop there, the others run on.
    eos = (full[1].token_ids[4], full[2].token_ids[1])
    res = ref_a.engine.generate_batch(collate(prompts), max_new_tokens=N, eos_ids=eos)
    for r_full, r in zip(full, res, strict=True):
        cut = next((i + 1 for i, t in enumerate(r_full.token_ids) if t in eos), N)
        assert r.token_ids == r_full.token_ids[:cut]
        assert r.finish_reason == ("eos" if cut < N or r_full.token_ids[-1] in eos else "length")


def test_batch_padding_rows_do_not_change_results(ref_a):
    prompts = four_prompts(ref_a.cfg)[:3]
    plain = ref_a.engine.generate_batch(collate(prompts), max_new_tokens=8, eos_ids=())
    padded = ref_a.engine.generate_batch(collate(prompts), max_new_tokens=8, eos_ids=(), pad_batch_to=4)
    assert [r.token_ids for r in padded] == [r.token_ids for r in plain]


# ---------------------------------------------------------------------------------------------------------------
# Thinking budget.


def _gen(eng: Engine, ids: list[int], n: int, **kw) -> list[int]:
    return eng.generate(make_inputs(eng.cfg, ids), max_new_tokens=n, eos_ids=(), **kw).token_ids


def test_thinking_budget_forces_the_close_then_continues_like_a_prompt(ref_a):
    eng = ref_a.engine
    rng = np.random.default_rng(41)
    prompt = chat(text_ids(rng, 9)) + [THINK]  # the prompt ends inside an open <think> block
    free = _gen(eng, prompt, N)
    assert END_THINK not in free[:3]
    forced = _gen(eng, prompt, N, max_thinking_tokens=3, think_end_ids=[END_THINK, ANSWER], think_start_id=THINK)
    assert forced[:3] == free[:3]
    assert forced[3:5] == [END_THINK, ANSWER]
    # After the forced ids the model continues exactly as if they had been part of the prompt.
    assert forced[5:] == _gen(eng, prompt + forced[:5], N - 5)
    # Budget 0: the close comes first.
    zero = _gen(eng, prompt, 6, max_thinking_tokens=0, think_end_ids=[END_THINK, ANSWER], think_start_id=THINK)
    assert zero[:2] == [END_THINK, ANSWER]


def test_thinking_budget_counts_from_the_generated_think_tag(ref_a):
    eng = ref_a.engine
    rng = np.random.default_rng(42)
    prompt = chat(text_ids(rng, 7))
    free = _gen(eng, prompt, 12)
    # Declare the model's own 2nd token to be `<think>`: thinking starts after it; 4 thinking tokens, then the close.
    start = free[1]
    forced = _gen(eng, prompt, 12, max_thinking_tokens=4, think_end_ids=[END_THINK], think_start_id=start)
    assert start not in free[:1]
    assert forced[:6] == free[:6]
    assert forced[6] == END_THINK


def test_thinking_budget_leaves_closed_blocks_alone(ref_a):
    eng = ref_a.engine
    rng = np.random.default_rng(43)
    closed = chat(text_ids(rng, 8)) + [THINK, END_THINK]  # the --no-thinking prefill
    opened = chat(text_ids(rng, 11)) + [THINK]
    kw = dict(max_thinking_tokens=2, think_end_ids=[END_THINK, ANSWER], think_start_id=THINK)
    free_closed = _gen(eng, closed, 10)
    assert _gen(eng, closed, 10, **kw) == free_closed
    # Both kinds in one batch: each row keeps its own state.
    batch = collate([make_inputs(eng.cfg, closed), make_inputs(eng.cfg, opened)])
    rows = eng.generate_batch(batch, max_new_tokens=10, eos_ids=(), **kw)
    assert rows[0].token_ids == free_closed
    assert rows[1].token_ids[2:4] == [END_THINK, ANSWER]
    # Without a start id, a prompt with no close counts as thinking from the first token.
    no_start = _gen(eng, opened, 10, max_thinking_tokens=2, think_end_ids=[END_THINK, ANSWER])
    assert no_start[2:4] == [END_THINK, ANSWER]
    assert _gen(eng, closed, 10, max_thinking_tokens=2, think_end_ids=[END_THINK, ANSWER]) == free_closed
    with pytest.raises(GenerationError, match="think_end_ids"):
        _gen(eng, opened, 4, max_thinking_tokens=2)


# ---------------------------------------------------------------------------------------------------------------
# Meshes (8 CPU devices): the same tokens as one device.


def gqa_config() -> dict:
    """8 query heads and 2 KV heads (GLM-4.1V's ratio is 32:2), so tensor=4 and 8 replicate the KV heads."""
    d = tiny.tiny_hf_config()
    d["text_config"].update(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
    d["vision_config"].update(depth=2, hidden_size=64, num_heads=4, out_hidden_size=128, intermediate_size=80,
                              image_size=56)
    return d


@pytest.fixture(scope="module")
def gqa():
    d = gqa_config()
    cfg = Glm4vConfig.from_hf(d)
    params = weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=3), cfg)
    rng = np.random.default_rng(44)
    grid = (1, 4, 6)
    prompts = [make_inputs(cfg, chat(image_span(grid) + text_ids(rng, 5)), pixels(rng, cfg, [grid]), [grid]),
               make_inputs(cfg, chat(text_ids(rng, 17)))]
    batch = collate(prompts)
    ref = [r.token_ids for r in Engine(params, cfg).generate_batch(batch, max_new_tokens=12, eos_ids=())]
    return cfg, params, batch, ref


@pytest.mark.parametrize("spec", ["fsdp=4,tensor=2", "data=2,tensor=4", "tensor=8", "fsdp=8", "data=2,fsdp=4"])
def test_mesh_gives_the_same_tokens(gqa, spec):
    cfg, params, batch, ref = gqa
    mesh = make_mesh(spec)
    eng = Engine(params, cfg, mesh=mesh)
    res = eng.generate_batch(batch, max_new_tokens=12, eos_ids=())
    assert [r.token_ids for r in res] == ref
    # Params are sharded by the rules table: query heads over `tensor`; 2 KV heads only while tensor <= 2.
    # The engine keeps the "out_in" decode layout: q kernel (N, H, D), k kernel (K, H, D).
    assert eng.cfg.runtime.kernel_layout == "out_in"
    q = eng.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    k = eng.params["language_model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
    assert q.shape == (cfg.text.num_attention_heads, cfg.text.head_dim, cfg.text.hidden_size)
    t = mesh.shape["tensor"]
    assert q.sharding.spec[0] == ("tensor" if t > 1 else None)
    assert k.sharding.spec[0] == ("tensor" if 1 < t <= 2 else None)
    # The KV cache follows the same table.
    cache = eng.cache_shardings({"k": [jax.ShapeDtypeStruct((2, 2, 128, 16), np.float32)]})["k"][0]  # (B, K, S, H)
    assert cache.spec[1] == ("tensor" if 1 < t <= 2 else None)
    assert cache.spec[0] == ("data" if mesh.shape["data"] == 2 else None)  # 2 rows: split over data=2 only


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching's pieces: prefill, insert, decode.


@pytest.mark.parametrize("spec", [None, "fsdp=2,tensor=4"])
def test_insert_a_prefilled_request_into_a_running_batch(ref_a, spec):
    """A request prefilled alone and inserted into row 1 of a two-row batch that has already decoded a chunk (its
    prompt bucket is shorter, so its cache rows move along the slots) generates the tokens it generates alone, and
    row 0 goes on undisturbed."""
    cfg = ref_a.cfg
    eng = Engine(ref_a.params, cfg, chunk_size=4, mesh=None if spec is None else make_mesh(spec))
    rng = np.random.default_rng(48)
    long, other, short = (make_inputs(cfg, chat(text_ids(rng, n))) for n in (40, 20, 9))
    n = 10
    alone = [eng.generate(x, max_new_tokens=n, eos_ids=()).token_ids for x in (long, short)]
    prep = eng.prepare(collate([long, other]), n)
    state = eng.prefill(prep)
    rows = [[int(t)] for t in np.asarray(state.tok)]
    state, buf, k = eng.decode(state)
    rows[0] += np.asarray(buf)[0, : int(k)].tolist()
    sprep = eng.prepare(short, n)
    assert sprep.prompt_len < prep.prompt_len
    prefix = eng.prefill(sprep, max_len=prep.max_len)
    before = eng.num_compiles
    state = eng.insert(prefix, state, 1)
    assert eng.num_compiles == before + 1  # the insert program
    rows[1] = [int(np.asarray(prefix.tok)[0])]
    while not np.asarray(state.done).all():
        state, buf, k = eng.decode(state)
        for b in range(2):
            rows[b] += np.asarray(buf)[b, : int(k)].tolist()
    assert [r[:n] for r in rows] == alone
    with pytest.raises(GenerationError, match="not inside the batch of 2 rows"):
        eng.insert(prefix, state, 2)
    with pytest.raises(GenerationError, match="the prefix has 256 cache slots, the state 128"):
        eng.insert(eng.prefill(eng.prepare(short, 100)), state, 0)
    with pytest.raises(GenerationError, match="optional parts"):
        eng.insert(eng.prefill(sprep, max_len=prep.max_len, sampling=SamplingParams(repetition_penalty=1.2)), state, 0)


# ---------------------------------------------------------------------------------------------------------------
# Buckets, warmup, compile counts.


def test_twelve_requests_compile_no_more_programs_than_buckets(ref_a):
    cfg = ref_a.cfg
    eng = Engine(ref_a.params, cfg, chunk_size=8)
    rng = np.random.default_rng(45)
    touched_prefill, touched_decode = set(), set()
    for _ in range(12):
        h, w = (int(x) * 2 for x in rng.integers(1, 7, size=2))  # grid sides (patches), even
        n_text = int(rng.integers(3, 60))
        inputs = make_inputs(cfg, chat(image_span((1, h, w)) + text_ids(rng, n_text)),
                             pixels(rng, cfg, [(1, h, w)]), [(1, h, w)])
        n_prompt = inputs["input_ids"].shape[1]
        t = bucket_length(n_prompt)
        touched_prefill.add((t, vision_bucket(h * w), cache_length(t, 6)))
        touched_decode.add(cache_length(t, 6))
        assert len(eng.generate(inputs, max_new_tokens=6, eos_ids=()).token_ids) == 6
    assert eng.num_compiles <= len(touched_prefill) + len(touched_decode)
    assert eng.num_compiles < 12
    assert len(eng.compile_log) == eng.num_compiles


def test_warmup_compiles_ahead_and_logs_shape_keys(ref_a, caplog):
    cfg = ref_a.cfg
    eng = Engine(ref_a.params, cfg, chunk_size=8)
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    with caplog.at_level(logging.INFO, logger="glm41v_jax.generate"):
        n = eng.warmup([{"batch": 1, "prompt_tokens": 60, "images": [(4 * unit, 3 * unit)], "max_new_tokens": 6},
                        {"batch": 1, "prompt_tokens": 20, "max_new_tokens": 6}])
    assert n == eng.num_compiles == 3  # two prefills (one with vision), one decode program (same cache length)
    assert any("prefill batch=1 prompt=64" in r.getMessage() and "patches=" in r.getMessage() for r in caplog.records)
    assert any("decode batch=1" in r.getMessage() for r in caplog.records)
    rng = np.random.default_rng(46)
    grid = (1, 6, 8)  # 48 patches: the same vision bucket as 4x3 merge units
    inputs = make_inputs(cfg, chat(image_span(grid) + text_ids(rng, 30)), pixels(rng, cfg, [grid]), [grid])
    eng.generate(inputs, max_new_tokens=6, eos_ids=())
    eng.generate(make_inputs(cfg, chat(text_ids(rng, 9))), max_new_tokens=6, eos_ids=())
    assert eng.num_compiles == 3
    with pytest.raises(GenerationError, match="multiples of"):
        eng.warmup([{"images": [(unit + 1, unit)]}])


# ---------------------------------------------------------------------------------------------------------------
# Limits: errors before any compute.


def test_limits(ref_a):
    cfg = ref_a.cfg
    rng = np.random.default_rng(47)
    inputs = make_inputs(cfg, chat(text_ids(rng, 40)))
    eng = Engine(ref_a.params, cfg, max_context=64)
    with pytest.raises(GenerationError, match="too long for the context of 64"):
        eng.generate(inputs, max_new_tokens=30)
    assert eng.num_compiles == 0
    with pytest.raises(GenerationError, match=r"max_context must be in \[1, 65536\]"):
        Engine(ref_a.params, cfg, max_context=70000)
    need = kv_cache_bytes(cfg, 1, cache_length(bucket_length(46), 8))
    assert need == 2 * 2 * 1 * 128 * 2 * 32 * 4  # K and V, 2 layers, 128 slots, 2 kv heads, head dim 32, fp32
    small = Engine(ref_a.params, cfg, memory_limit_bytes=need - 1)
    with pytest.raises(GenerationError, match="KV cache .* needs"):
        small.generate(inputs, max_new_tokens=8)
    assert small.num_compiles == 0
    assert len(Engine(ref_a.params, cfg, memory_limit_bytes=need).generate(inputs, max_new_tokens=8).token_ids) >= 1
    with pytest.raises(GenerationError, match="empty prompt"):
        eng.generate({"input_ids": np.zeros((1, 0), np.int64)}, max_new_tokens=4)
    with pytest.raises(GenerationError, match="one int or 2 ints"):
        eng.generate_batch(collate([inputs, inputs]), max_new_tokens=[3, 4, 5])
    with pytest.raises(GenerationError, match="image"):
        eng.generate(make_inputs(cfg, chat([IMG] * 4)), max_new_tokens=4)
