"""Chunked prefill (`Engine(prefill_chunk=...)`, `decode.prefill_logits`): the prompt runs through the decoder in
chunks inside one compiled program. Against the one-shot prefill on the tiny config: last logits, the KV cache and
greedy tokens, on a batch of a text, an image and a video row of different lengths (left padding) whose media spans
straddle chunk boundaries; on one device and on a fsdp x tensor mesh of 8 CPU devices. Then the tokens of the
chunked prefill + decode against one forward over prompt + generated tokens (teacher forced), and the compile
count: one prefill program per bucket.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from prompts import chat, image_span, make_inputs, pixels, text_ids, video_span

from glm41v_jax import decode as D
from glm41v_jax import tiny, weights
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.engine import Engine, check_prefill_chunk
from glm41v_jax.model import forward
from glm41v_jax.programs import ProgramCache
from glm41v_jax.requests import GenerationError, collate
from glm41v_jax.sharding import make_mesh

CHUNK = 48  # the setting: a 128-token bucket runs as chunks of 48 tokens at slots 0, 48 and 80 (the last overlaps)
N_NEW = 12


@pytest.fixture(scope="module")
def model() -> tuple[Glm4vConfig, dict]:
    d = tiny.tiny_hf_config()
    cfg = Glm4vConfig.from_hf(d)
    return cfg, weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=5), cfg)


def prompts(cfg: Glm4vConfig) -> list[dict]:
    """Three rows of different lengths (96, 95, 66 tokens): text, text + an 8x8-patch image (16 tokens) across
    slot 48 once left-padded to 128, text + a 4-frame video (2 temporal patches of 4x4: 2 x 4 tokens) whose first
    frame crosses slot 80 (where the last, overlapping chunk starts)."""
    rng = np.random.default_rng(11)
    gi, gv = (1, 8, 8), (2, 4, 4)
    return [
        make_inputs(cfg, chat(text_ids(rng, 90))),
        make_inputs(cfg, chat(text_ids(rng, 6) + image_span(gi) + text_ids(rng, 65)), pixels(rng, cfg, [gi]), [gi]),
        make_inputs(cfg, chat(text_ids(rng, 10) + video_span(gv, [0, 2]) + text_ids(rng, 34)),
                    videos=pixels(rng, cfg, [gv]), video_grids=[gv]),
    ]


def chunk_starts(t: int, c: int) -> list[int]:
    return [min(i * c, t - c) for i in range(-(-t // c))]


def test_chunk_length():
    assert D.prefill_chunk_length(128, 0) is None and D.prefill_chunk_length(128, None) is None
    assert D.prefill_chunk_length(128, 128) is None  # fits one chunk
    assert D.prefill_chunk_length(128, CHUNK) == 48  # 3 chunks of 43 -> 48 (multiples of 8)
    assert D.prefill_chunk_length(31744, 4096) == 3968  # the 9B's 32k bucket: 8 chunks, no overlap
    assert D.prefill_chunk_length(5000, 4096) == 2560  # 2 chunks of 2500 -> multiples of 128
    cfg = Glm4vConfig.from_hf(tiny.tiny_hf_config())
    for bad in (-1, True, 1.5, "8", [8]):
        with pytest.raises(GenerationError, match="prefill_chunk must be an integer >= 0"):
            Engine(None, cfg, prefill_chunk=bad)
    assert check_prefill_chunk(np.int64(64)) == 64 and type(check_prefill_chunk(np.int64(64))) is int


def _prefill(eng: Engine, prep, chunk: int | None):
    fn = jax.jit(functools.partial(D.prefill_logits, model=eng.model, cfg=eng.cfg, max_len=prep.max_len,
                                   prefill_chunk=chunk))
    return fn(eng.params, prep.model_kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [None, "fsdp=2,tensor=4"])
def test_chunked_prefill_matches_one_shot(model, mesh):
    cfg, params = model
    m = None if mesh is None else make_mesh(mesh)
    programs = ProgramCache()  # the two engines share the decode program (the same shapes)
    one = Engine(params, cfg, prefill_chunk=0, mesh=m, donate=False, programs=programs)
    chunked = Engine(params, cfg, prefill_chunk=CHUNK, mesh=m, donate=False, programs=programs)
    batch = collate(prompts(cfg), cfg.text.pad_token_id)
    prep = chunked.prepare(batch, N_NEW)
    t = prep.prompt_len
    assert t == 128
    c = D.prefill_chunk_length(t, CHUNK)
    # The setup tests what it claims: a media span crosses a chunk boundary, and the rows are padded differently.
    vi = np.asarray(prep.model_kwargs["vision_index"])
    starts = chunk_starts(t, c)
    assert starts == [0, 48, 80]
    for row, boundary, n_span in ((1, 48, 16), (2, 80, 4)):  # inside the image / the video's first frame
        media = np.flatnonzero(vi[row] >= 0)
        assert media[0] < boundary <= media[n_span - 1] == media[0] + n_span - 1, (row, media)
    seg = np.asarray(prep.model_kwargs["segment_ids"])
    assert len({int(r.sum()) for r in seg}) == 3

    with jax.set_mesh(m) if m is not None else _nullcontext():
        l1, cache1, kv1 = _prefill(one, prep, None)
        l2, cache2, kv2 = _prefill(chunked, prep, c)
    np.testing.assert_array_equal(np.asarray(kv1), np.asarray(kv2))
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=2e-4, atol=2e-4)
    assert (np.argmax(np.asarray(l2), -1) == np.argmax(np.asarray(l1), -1)).all()
    written = np.asarray(kv1) > 0  # real prompt slots; padding and free slots hold no result
    for name in ("k", "v"):
        for a, b in zip(jax.tree.leaves(cache1[name]), jax.tree.leaves(cache2[name]), strict=True):
            a, b = np.asarray(a), np.asarray(b)  # (B, K, S, H)
            np.testing.assert_allclose(b.transpose(0, 2, 1, 3)[written], a.transpose(0, 2, 1, 3)[written],
                                       rtol=2e-4, atol=2e-4)

    # Prefill + decode: the same greedy tokens; one prefill program per engine, the decode program shared.
    r1 = one.generate_batch(batch, max_new_tokens=N_NEW, eos_ids=())
    r2 = chunked.generate_batch(batch, max_new_tokens=N_NEW, eos_ids=())
    assert [r.token_ids for r in r2] == [r.token_ids for r in r1]
    log = [d for d, _ in chunked.compile_log]
    assert len(log) == 3 and log[0].startswith("prefill") and "prefill_chunk" not in log[0], log
    assert log[1].startswith("decode") and log[2].startswith("prefill batch=3 prompt=128 cache=") \
        and f"prefill_chunk={c}" in log[2], log


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_chunked_generation_matches_one_forward(model):
    """The three levels: chunked prefill, then decode steps, against one forward over the prompt and the generated
    tokens (no cache): each generated token is the argmax of the forward's logits at the slot before it. Rows one at
    a time (the forward takes no left padding); a second request of the same bucket compiles nothing."""
    cfg, params = model
    eng = Engine(params, cfg, prefill_chunk=CHUNK, donate=False)
    rows = prompts(cfg)
    for i, p in enumerate(rows[1:]):
        out = eng.generate(p, max_new_tokens=N_NEW, eos_ids=()).token_ids
        n = p["input_ids"].shape[1]
        ids = np.concatenate([p["input_ids"], np.asarray([out[:-1]], np.int64)], axis=1)
        types = np.concatenate([p["mm_token_type_ids"], np.zeros((1, len(out) - 1), p["mm_token_type_ids"].dtype)],
                               axis=1)
        hf = {k: v for k, v in p.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        logits = np.asarray(forward(params, cfg, ids, attention_mask=np.ones_like(ids), mm_token_type_ids=types,
                                    **hf))
        assert np.argmax(logits[0, n - 1:], -1).tolist() == out, f"row {i + 1}"
        if i == 0:
            compiles = eng.num_compiles
    assert eng.num_compiles == compiles == 2  # both rows bucket to 128 prompt slots: one prefill, one decode


def test_plan_names_the_prefill_chunk(tmp_path, capsys):
    """`glm41v plan` on the tiny config (TPU compiler, v5e-4, tensor=4) with an image and --prefill-chunk: the report
    names the chunks, and the bucket compiles one prefill program."""
    import json

    from glm41v_jax.cli import main

    (tmp_path / "config.json").write_text(json.dumps(tiny.tiny_hf_config()))
    argv = ["plan", "--tpu", "v5e-4", "--model", str(tmp_path), "generate", "--batch", "2", "--max-context", "512",
            "--max-new-tokens", "32", "--prefill-chunk", "128", "--image", "448x448"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prompt 448 tokens (1024 vision patches)" in out, out
    assert "prefill: chunked, 4 chunks of 112 tokens in one program (setting 128; the vision tower runs once" in out
    assert [line.split()[0] for line in out.split("programs (per chip")[1].splitlines()[1:3]] == ["prefill", "decode"]


def test_cli_prefill_chunk_flag(run_cli):
    """`glm41v generate --prefill-chunk N` reaches the Engine: the compile log names the chunk, and the tokens equal
    the one-piece prefill's (--prefill-chunk 0); a negative or non-integer value is one error line and exit 2, and
    `Pipeline.load(prefill_chunk=...)` refuses a bad value before any weights are read."""
    from glm41v_jax.pipeline import Pipeline

    argv = ("generate", "--json", "--prompt", "Describe the weather in three short sentences, please.",
            "--max-new-tokens", "6")
    rc, out, err = run_cli(*argv, "--prefill-chunk", "16")
    assert rc == 0, err
    assert "prefill_chunk=16" in err, err
    chunked = json.loads(out.strip().splitlines()[-1])["token_ids"]
    rc, out, err = run_cli(*argv, "--prefill-chunk", "0")
    assert rc == 0 and "prefill_chunk=" not in err, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == chunked
    for bad in ("-1", "x"):
        rc, out, err = run_cli(*argv, "--prefill-chunk", bad)
        assert rc == 2 and "--prefill-chunk" in err and "Traceback" not in err, err
    with pytest.raises(GenerationError, match="prefill_chunk must be an integer >= 0"):
        Pipeline.load(None, prefill_chunk=-3)
