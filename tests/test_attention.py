"""Attention backends against the XLA reference (`glm41v_jax.attention`).

The Pallas path runs JAX's TPU splash-attention kernel in Pallas interpret mode on CPU. The cuDNN path cannot run
here (no GPU): its tests build exactly the `jax.nn.dot_product_attention` arguments the GPU path uses and run them
with `implementation="xla"`, so the mask/GQA/scale construction is checked but the cuDNN kernel itself is not.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R

from glm41v_jax import attention as A
from glm41v_jax import model as M
from glm41v_jax import tiny, weights
from glm41v_jax.config import ConfigError, Glm4vConfig, RuntimeConfig

F32_TOL = 1e-5
BF16_TOL = 3e-2


def _qkv(rng, b, t, s, n, kh, h, dtype):
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, s, kh, h))
    v = rng.standard_normal((b, s, kh, h))
    return (jnp.asarray(x, dtype) for x in (q, k, v))


def _segments(*rows):
    """rows of [(segment id, length), ...] -> (B, L) int32."""
    return jnp.asarray(np.stack([np.concatenate([np.full(n, sid) for sid, n in row]) for row in rows]), jnp.int32)


def _case(name, dtype=jnp.float32):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name == "prefill":  # causal GQA; row 0 left-padded, row 1 packed segments 1, 2, 3; T not a tile multiple
        t = 200
        q, k, v = _qkv(rng, 2, t, t, 4, 2, 32, dtype)
        seg = _segments([(0, 37), (1, t - 37)], [(1, 60), (2, 90), (3, t - 150)])
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
        return q, k, v, dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True, q_positions=pos, kv_positions=pos)
    if name == "prefill_restart":  # packed segments whose positions restart at 0 (non-slot positions)
        t = 150
        q, k, v = _qkv(rng, 1, t, t, 6, 2, 16, dtype)
        seg = _segments([(1, 50), (2, 70), (0, 30)])
        pos = jnp.asarray(np.concatenate([np.arange(50), np.arange(70), np.zeros(30)])[None], jnp.int32)
        return q, k, v, dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True, q_positions=pos, kv_positions=pos)
    if name == "cache":  # T < S: 40 new tokens written at slot 50 of a 300-slot cache, left padding in the prompt
        t, s, off = 40, 300, 50
        q, k, v = _qkv(rng, 2, t, s, 4, 1, 32, dtype)
        kv_seg = _segments([(0, 10), (1, off + t - 10), (0, s - off - t)], [(1, off + t), (0, s - off - t)])
        q_seg = jnp.ones((2, t), jnp.int32)
        q_pos = off + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
        kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
        return q, k, v, dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True, q_positions=q_pos,
                             kv_positions=kv_pos)
    if name == "decode":  # T = 1 at slot 120 of a 256-slot cache
        s, slot = 256, 120
        q, k, v = _qkv(rng, 2, 1, s, 4, 2, 32, dtype)
        kv_seg = _segments([(0, 5), (1, slot - 4), (0, s - slot - 1)], [(1, slot + 1), (0, s - slot - 1)])
        q_pos = jnp.full((2, 1), slot, jnp.int32)
        kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
        return q, k, v, dict(q_segment_ids=jnp.ones((2, 1), jnp.int32), kv_segment_ids=kv_seg, causal=True,
                             q_positions=q_pos, kv_positions=kv_pos)
    if name == "vision":  # block-diagonal, non-causal, MHA; three images of different sizes + padding
        seg = _segments([(1, 100), (2, 64), (3, 120), (0, 16)])
        t = seg.shape[1]
        q, k, v = _qkv(rng, 1, t, t, 3, 3, 16, dtype)
        return q, k, v, dict(q_segment_ids=seg, kv_segment_ids=seg, causal=False)
    raise KeyError(name)


def _visible(kw):
    """(B, T) rows that see at least one key: where every backend must agree."""
    return np.asarray(A.segment_mask(kw["q_segment_ids"], kw["kv_segment_ids"], kw["causal"], kw.get("q_positions"),
                                     kw.get("kv_positions")).any(-1))


def _check(out, ref, kw, tol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    rows = _visible(kw)
    np.testing.assert_allclose(out[rows], ref[rows], atol=tol, rtol=0)


CASES = ["prefill", "prefill_restart", "cache", "decode", "vision"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_bytes", [1, 64 << 10, None])
def test_blocked_matches_dense(name, block_bytes):
    """The CPU path (query chunks of 16 rows up to backend.ATTENTION_BLOCK_BYTES; T not a chunk multiple) = the
    one-block math, fully masked padding rows included (both give the mean of v there), in float32 and bfloat16."""
    for dtype, tol in ((jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)):
        q, k, v, kw = _case(name, dtype)
        ref = jax.jit(functools.partial(A.dense_attention, **kw))(q, k, v)
        out = jax.jit(functools.partial(A.blocked_attention, **kw, block_bytes=block_bytes))(q, k, v)
        assert out.dtype == ref.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("name", ["prefill", "vision", "cache"])
def test_blocked_gradients_match_dense(name):
    """Gradients through the rematerialised blocks (padding rows, segments, a KV cache) = the one block's."""
    q, k, v, kw = _case(name)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * w), argnums=(0, 1, 2)))(q, k, v)

    blocked = grads(lambda *a, **kw: A.blocked_attention(*a, **kw, block_bytes=64 << 10))
    for g, r in zip(blocked, grads(A.dense_attention), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0)


def test_xla_dispatch_on_cpu(monkeypatch):
    """On the CPU backend prefill-sized calls run blocked, decode-sized calls the one block (same numbers)."""
    assert jax.default_backend() == "cpu"
    calls = []
    blocked = A.blocked_attention
    monkeypatch.setattr(A, "blocked_attention", lambda *a, **kw: calls.append(a[0].shape) or blocked(*a, **kw))
    for name, n_blocked in (("prefill", 1), ("decode", 1)):
        q, k, v, kw = _case(name)
        out = A.xla_attention(q, k, v, **kw)
        np.testing.assert_allclose(np.asarray(out), np.asarray(A.dense_attention(q, k, v, **kw)), atol=F32_TOL)
        assert len(calls) == n_blocked, (name, calls)


@pytest.mark.parametrize("name", CASES)
def test_pallas_matches_xla_f32(name):
    q, k, v, kw = _case(name)
    ref = A.attention(q, k, v, **kw, impl="xla")
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, **kw, impl="pallas", interpret=True))(q, k, v)
    _check(out, ref, kw, F32_TOL)
    if name == "decode":
        assert A.resolve_impl("pallas", q, k, v) == "xla"  # documented: decode is not a kernel call
    else:
        assert A.resolve_impl("pallas", q, k, v) == "pallas"
        dead = ~_visible(kw)
        if dead.any():  # padding queries: finite, and 0 from the kernel path
            assert np.all(np.asarray(out)[dead] == 0)


@pytest.mark.parametrize("name", ["prefill", "vision"])
def test_pallas_matches_xla_bf16(name):
    q, k, v, kw = _case(name, jnp.bfloat16)
    ref = A.attention(q, k, v, **kw, impl="xla")
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, **kw, impl="pallas", interpret=True))(q, k, v)
    assert out.dtype == jnp.bfloat16
    _check(out, ref, kw, BF16_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_static_mask_matches_xla(dtype):
    """Causal self-attention with `kv_is_q` (what the decoder passes for training and prefill) takes the kernel's
    static CausalMask + SegmentIds: the same outputs as the reference, padding rows 0, and no (T, S) array in the
    program outside the kernel (the dynamic mask path builds a (B, Tp, Sp) bool and tile table)."""
    q, k, v, kw = _case("prefill", dtype)
    ref = A.attention(q, k, v, **kw, impl="xla")

    def f(q, k, v, kv_is_q=True):
        return A.attention(q, k, v, **kw, impl="pallas", interpret=True, kv_is_q=kv_is_q)

    out = jax.jit(f)(q, k, v)
    _check(out, ref, kw, F32_TOL if dtype == jnp.float32 else BF16_TOL)
    assert np.all(np.asarray(out)[~_visible(kw)] == 0)
    tp = 256  # T = 200 padded to the 128 lanes

    def square_arrays(kv_is_q):
        jaxpr = jax.make_jaxpr(functools.partial(f, kv_is_q=kv_is_q))(q, k, v)
        return [v.aval.shape for e in jaxpr.eqns if e.primitive.name != "pallas_call" for v in e.outvars
                if tuple(v.aval.shape[-2:]) == (tp, tp)]

    assert square_arrays(True) == []
    assert square_arrays(False)  # the check can fail: the dynamic path has them


def _grad_case():
    q, k, v, kw = _case("prefill")
    q, k, v = q[:, :150], k[:, :150], v[:, :150]
    kw = {n: (x[:, :150] if hasattr(x, "shape") else x) for n, x in kw.items()}
    w = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
    return q, k, v, kw, w * _visible(kw)[:, :, None, None]


@pytest.mark.parametrize("kv_is_q", [False, True])
def test_pallas_gradients_match_xla(kv_is_q):
    """The splash backward kernels (dq, dkv) with the dynamic mask and with the static causal mask + segment ids;
    padding rows get no gradient."""
    q, k, v, kw, w = _grad_case()

    def loss(impl):
        def f(q, k, v):
            return jnp.sum(A.attention(q, k, v, **kw, impl=impl, interpret=True, kv_is_q=kv_is_q) * w)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for g, r in zip(loss("pallas"), loss("xla"), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cudnn_arguments_match_xla(name, dtype):
    """The exact `jax.nn.dot_product_attention` call of the cuDNN path, run by JAX's XLA implementation (CPU).
    Not exercised: the cuDNN kernel itself (needs a GPU)."""
    q, k, v, kw = _case(name, dtype)
    ref = A.attention(q, k, v, **kw, impl="xla")
    args = A.cudnn_args(q, k, v, **kw)
    assert args["mask"].shape == (q.shape[0], 1, q.shape[1], k.shape[1]) and args["mask"].dtype == jnp.bool_
    assert args["key"].shape[2] == k.shape[2]  # GQA passed through: K kv heads, no repeat
    out = jax.jit(lambda q, k, v: A.cudnn_attention(q, k, v, **kw, implementation="xla"))(q, k, v)
    assert out.dtype == q.dtype
    _check(out, ref, kw, F32_TOL if dtype == jnp.float32 else BF16_TOL)


def test_auto_on_cpu_is_xla():
    for name in CASES:
        q, k, v, kw = _case(name)
        assert A.resolve_impl("auto", q, k, v) == "xla"
        np.testing.assert_array_equal(np.asarray(A.attention(q, k, v, **kw, impl="auto")),
                                      np.asarray(A.attention(q, k, v, **kw, impl="xla")))


def test_invalid_impl_and_unavailable_backends():
    q, k, v, kw = _case("vision")
    with pytest.raises(ValueError, match="'xla', 'pallas', 'cudnn', 'auto'.*'flash'"):
        A.attention(q, k, v, **kw, impl="flash")
    with pytest.raises(ConfigError, match="attention_impl must be one of 'xla', 'pallas', 'cudnn', 'auto'"):
        RuntimeConfig(attention_impl="splash")
    with pytest.raises(ConfigError, match="attention_impl"):
        Glm4vConfig().with_runtime(attention_impl="XLA")
    with pytest.raises(ValueError, match="needs a GPU"):
        A.attention(q, k, v, **kw, impl="cudnn")
    with pytest.raises(ValueError, match="PALLAS_INTERPRET"):
        A.attention(q, k, v, **kw, impl="pallas", interpret=False)
    with pytest.raises(ValueError, match="q_positions"):
        A.attention(q, k, v, q_segment_ids=kw["q_segment_ids"], kv_segment_ids=kw["kv_segment_ids"], causal=True)


def test_layers_reexport():
    from glm41v_jax import layers

    assert layers.attention is A.attention


def test_model_logits_pallas_equals_xla(monkeypatch):
    """Tiny model, text-only prompts (a left-padded batch of two): attention_impl='pallas' (interpret) gives the
    same logits as 'xla' on every real token, and finite ones on the padding."""
    monkeypatch.setattr(A, "PALLAS_INTERPRET", True)
    d = R.hf_config_dict("a")
    cfg = Glm4vConfig.from_hf(d)
    params = weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=7), cfg)
    rng = np.random.default_rng(0)
    case = R.left_pad_batch([R.build_prompt(rng, n_text=2), R.build_prompt(rng, n_text=11)])
    ref = np.asarray(M.forward(params, cfg.with_runtime(attention_impl="xla"), **case))
    out = np.asarray(M.forward(params, cfg.with_runtime(attention_impl="pallas"), **case))
    mask = case["attention_mask"].astype(bool)
    assert not mask.all() and np.isfinite(out).all()
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-4, rtol=0)
