"""Attention kernels on a mesh (8 CPU devices): the custom-call kernels run per device under `jax.shard_map`
(`attention.shard_heads`) and give the XLA reference's result for every batch/head split, GQA with tensor > K
included. The splash kernel runs in the Pallas interpreter; the cuDNN call runs through JAX's XLA implementation
(no GPU here), so the sharding wrapper and its argument construction are checked, not the cuDNN kernel itself.
One test compiles the sharded splash call with the real TPU compiler (libtpu, for a v5e-8 topology, no TPU needed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R

from glm41v_jax import attention as A
from glm41v_jax.backend import BACKEND_TUNING, backend_default
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.generate import Engine, generate, synthetic_inputs
from glm41v_jax.sharding import make_mesh, under_mesh

MESHES = ["tensor=8", "fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2", "data=2,fsdp=4", "fsdp=4,tensor=2"]


def _seg(rows):
    return jnp.asarray(np.stack([np.concatenate([np.full(n, s) for s, n in r]) for r in rows]), jnp.int32)


def _case(name, n=8, kh=2):
    """'cache': causal text, left-padded rows, 40 new tokens written at slot 50 of a 300-slot KV cache (B=4).
    'vision': block-diagonal non-causal segments (3 images + padding), MHA, B=2 groups."""
    rng = np.random.default_rng(len(name) + n + kh)
    if name == "cache":
        b, t, s, off = 4, 40, 300, 50
        kv_seg = _seg([[(0, 10 * i), (1, off + t - 10 * i), (0, s - off - t)] for i in range(b)])
        kw = dict(q_segment_ids=jnp.ones((b, t), jnp.int32), kv_segment_ids=kv_seg, causal=True,
                  q_positions=off + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                  kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    else:
        b, kh = 2, n
        seg = _seg([[(1, 100), (2, 64), (3, 70), (0, 22)], [(1, 30), (2, 200), (0, 26)]])
        t = s = seg.shape[1]
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=False)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, n, 32), (b, s, kh, 32), (b, s, kh, 32)))
    return q, k, v, kw


def _visible(kw):
    return np.asarray(A.segment_mask(kw["q_segment_ids"], kw["kv_segment_ids"], kw["causal"], kw.get("q_positions"),
                                     kw.get("kv_positions")).any(-1))


def _sharded(fn, mesh, q, k, v):
    """fn(q, k, v) jitted under the mesh, inputs placed as the model places them (batch over data/fsdp)."""
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        return jax.jit(fn)(q, k, v), jaxpr


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("name", ["cache", "vision"])
def test_pallas_under_shard_map_equals_xla(name, spec):
    q, k, v, kw = _case(name)
    ref = A.attention(q, k, v, **kw, impl="xla")
    mesh = make_mesh(spec)
    out, jaxpr = _sharded(lambda q, k, v: A.attention(q, k, v, **kw, impl="pallas", interpret=True), mesh, q, k, v)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    rows = _visible(kw)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=1e-5, rtol=0)
    t = mesh.shape["tensor"]
    spec = tuple(out.sharding.spec) + (None,) * 4
    assert spec[2] == ("tensor" if t > 1 and q.shape[2] % t == 0 else None)  # heads stay split


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_one_packed_vision_row_splits_its_queries(spec):
    """The packed vision tower is one row of P patches, which the batch axes cannot split: the kernel then runs
    with the queries split along P over those axes (each shard: P/n queries against all P keys), equal to the
    reference, instead of every shard repeating the whole (P x P) attention."""
    rng = np.random.default_rng(7)
    seg = _seg([[(1, 100), (2, 130), (3, 200), (4, 50), (0, 32)]])
    p = seg.shape[1]
    q, k, v = (jnp.asarray(rng.standard_normal((1, p, 4, 32)), jnp.float32) for _ in range(3))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=False)
    ref = A.attention(q, k, v, **kw, impl="xla")
    mesh = make_mesh(spec)
    out, jaxpr = _sharded(lambda q, k, v: A.attention(q, k, v, **kw, impl="pallas", interpret=True), mesh, q, k, v)
    assert "pallas_call" in jaxpr
    rows = _visible(kw)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=1e-5, rtol=0)
    split = tuple(out.sharding.spec) + (None,) * 4
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    got = split[1] if isinstance(split[1], tuple) else (split[1],)
    assert got == batch_axes, split  # the queries are split along P over the batch axes


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("name", ["cache", "vision"])
def test_cudnn_call_under_shard_map_equals_xla(name, spec):
    """The cuDNN path's sharding wrapper around its exact `dot_product_attention` call (run by the XLA impl)."""
    q, k, v, kw = _case(name, n=8, kh=2)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = A.attention(q, k, v, **kw, impl="xla")
    inner = functools.partial(A.cudnn_attention, implementation="xla")
    out, jaxpr = _sharded(lambda q, k, v: A.shard_heads(inner, q, k, v, **kw), make_mesh(spec), q, k, v)
    assert "shard_map" in jaxpr
    rows = _visible(kw)
    np.testing.assert_allclose(np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows], atol=3e-2)


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=8"])
def test_xla_decode_runs_per_shard(spec, monkeypatch):
    """Decode (T = 1) on a mesh runs the XLA math per shard (SHARD_XLA_DECODE): the reference's numbers; turned
    off, GSPMD partitions it (no shard_map)."""
    q, k, v, kw = _case("cache")
    q, kw = q[:, -1:], {**kw, "q_segment_ids": kw["q_segment_ids"][:, -1:], "q_positions": kw["q_positions"][:, -1:]}
    ref = A.attention(q, k, v, **kw, impl="auto")
    out, jaxpr = _sharded(lambda q, k, v: A.attention(q, k, v, **kw, impl="auto"), make_mesh(spec), q, k, v)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    monkeypatch.setattr(A, "SHARD_XLA_DECODE", False)
    _, jaxpr = _sharded(lambda q, k, v: A.attention(q, k, v, **kw, impl="auto"), make_mesh(spec), q, k, v)
    assert "shard_map" not in jaxpr


@pytest.mark.parametrize("n,kh,spec", [(6, 3, "fsdp=4,tensor=2"), (8, 2, "tensor=8"), (8, 4, "fsdp=2,tensor=4"),
                                       (12, 2, "data=2,tensor=4")])
def test_kv_head_selection_for_every_group_split(n, kh, spec):
    """Query-head shards that hold whole groups, part of one group, or straddle groups (6 q / 3 kv heads on
    tensor=2: shard 0 reads KV heads 0, 0, 1) each read the right KV heads."""
    q, k, v, kw = _case("cache", n=n, kh=kh)
    ref = A.attention(q, k, v, **kw, impl="xla")
    inner = functools.partial(A.dense_attention)
    out, _ = _sharded(lambda q, k, v: A.shard_heads(inner, q, k, v, **kw), make_mesh(spec), q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_gradients_through_sharded_pallas():
    q, k, v, kw = _case("cache")
    w = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32) * _visible(kw)[..., None, None]

    def grads(impl):
        f = lambda q, k, v: jnp.sum(A.attention(q, k, v, **kw, impl=impl, interpret=True) * w)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref = grads("xla")
    with jax.set_mesh(make_mesh("fsdp=2,tensor=4")):
        out = grads("pallas")
    for g, r in zip(out, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0)


def test_auto_follows_the_mesh_platform():
    """"auto" and the CPU-only blocked path read the platform of the context mesh's devices, not the default
    backend: a CPU mesh keeps "xla"; an abstract TPU mesh picks the kernel for prefill, "xla" for decode."""
    q, k, v, _ = _case("cache")
    q128 = jnp.zeros((1, 256, 8, 128), jnp.bfloat16)
    k128 = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    with jax.set_mesh(make_mesh("tensor=8")):
        assert A.target_platform() == "cpu"
        assert A.resolve_impl("auto", q128, k128, k128) == "xla"
    assert A.resolve_impl("auto", q128, k128, k128, "tpu") == "pallas"
    assert A.resolve_impl("auto", q128[:, :1], k128, k128, "tpu") == "xla"  # decode: measured, XLA
    assert A.resolve_impl("auto", q128, k128, k128, "gpu") == "cudnn"


def test_backend_table_and_engine_default_layout():
    assert backend_default("cpu", "engine_kernel_layout") == "out_in"
    assert backend_default("cuda", "engine_kernel_layout") == BACKEND_TUNING["gpu"]["engine_kernel_layout"]
    cfg = Glm4vConfig.from_hf(_gqa_dict())
    eng = Engine(None, cfg, mesh=make_mesh("fsdp=8"))  # abstract: the layout follows the mesh's devices (CPU)
    assert eng.cfg.runtime.kernel_layout == "out_in"
    assert isinstance(eng.params["lm_head"]["kernel"], jax.ShapeDtypeStruct)


def _gqa_dict():
    from test_engine import gqa_config

    return gqa_config()


def _device_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def test_engine_replaces_device_params_without_a_second_copy():
    """An Engine built from device params re-lays them out in place: live device bytes do not grow, the caller's
    replaced kernels are freed, and the engine generates. The functional API keeps the caller's params valid, adds
    no device copy of them while it runs, and a second call with the same shapes compiles nothing."""
    d = _gqa_dict()
    cfg = Glm4vConfig.from_hf(d)
    params = jax.device_put(R.numpy_params(d, cfg, 1))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    q_kernel = params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    before = _device_bytes()
    eng = Engine(params, cfg, kernel_layout="out_in")
    assert _device_bytes() - before < 0.05 * total  # one copy (plus the engine's tiny extras)
    assert q_kernel.is_deleted()  # the in_out kernel was replaced by the engine's out_in one
    inputs = synthetic_inputs(cfg, batch=1, prompt_tokens=12)
    assert len(eng.generate(inputs, max_new_tokens=3, eos_ids=()).token_ids) == 3

    fresh = jax.device_put(R.numpy_params(d, cfg, 2))
    before = _device_bytes()
    during: list[int] = []  # live device bytes while the call runs (after its prefill)
    first = generate(fresh, cfg, inputs, max_new_tokens=3, eos_ids=(), stream_callback=lambda _: during.append(
        _device_bytes()))
    again = generate(fresh, cfg, inputs, max_new_tokens=3, eos_ids=())
    assert during and max(during) - before < 0.05 * total  # served as they are: no re-laid-out second copy
    assert _device_bytes() - before < 0.05 * total
    assert not any(x.is_deleted() for x in jax.tree.leaves(fresh))  # still the caller's, still valid
    assert again.token_ids == first.token_ids
    assert again.num_compiles == first.num_compiles and again.timings["compile_s"] == 0.0  # same shapes: no compile
    # Host params: put on the device once, in the platform's layout; the caller's NumPy arrays are untouched.
    host = jax.tree.map(np.asarray, fresh)
    he = Engine(host, cfg, kernel_layout="out_in")
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    assert he.cfg.runtime.kernel_layout == "out_in"


def test_engine_on_a_mesh_with_the_kernel_gives_the_same_tokens(monkeypatch):
    """Prefill and vision through the splash kernel (interpreter) under shard_map on fsdp=2 x tensor=4 (8 query
    heads, 2 KV heads: one KV head per tensor shard) = the one-device XLA engine's tokens."""
    monkeypatch.setattr(A, "PALLAS_INTERPRET", True)
    d = _gqa_dict()
    cfg = Glm4vConfig.from_hf(d)
    params = R.numpy_params(d, cfg, 3)  # O(1) weights: argmax is sensitive
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    inputs = synthetic_inputs(cfg, batch=2, prompt_tokens=20, images=[(unit * 2, unit * 2)])
    inputs["pixel_values"] = np.random.default_rng(0).normal(size=inputs["pixel_values"].shape).astype(np.float32)
    inputs["input_ids"][:, -8:] = np.arange(16).reshape(2, 8) + 7
    ref = Engine(params, cfg).generate_batch(inputs, max_new_tokens=6, eos_ids=())
    eng = Engine(params, cfg.with_runtime(attention_impl="pallas"), mesh=make_mesh("fsdp=2,tensor=4"))
    out = eng.generate_batch(inputs, max_new_tokens=6, eos_ids=())
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


def test_sharded_splash_compiles_for_a_tpu_v5e_8():
    """The real TPU compiler (libtpu, a v5e:2x4 topology: no TPU needed) compiles the splash kernel with the
    activations sharded over the mesh. Under plain jit this failed: "Mosaic kernels cannot be automatically
    partitioned"."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with jax[tpu] (the test extra)")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    topo = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu", chips_per_host_bounds=(2, 4, 1))
    mesh = jax.sharding.Mesh(np.asarray(topo.devices).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    b, t, n, kh, h = 4, 256, 32, 2, 128
    bat = ("data", "fsdp")

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    q = sds((b, t, n, h), jnp.bfloat16, P(bat, None, "tensor"))
    kv = sds((b, t, kh, h), jnp.bfloat16, P(bat))
    seg = sds((b, t), jnp.int32, P(bat))

    def f(q, k, v, seg, pos):
        return A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, q_positions=pos,
                           kv_positions=pos, impl="auto")

    with jax.set_mesh(mesh):
        assert A.target_platform() == "tpu"
        compiled = jax.jit(f).lower(q, kv, kv, seg, seg).compile()
    assert "tpu_custom_call" in compiled.as_text()
    # The same without a context mesh, through sharding.under_mesh (how the Engine and the train step trace).
    compiled = jax.jit(under_mesh(f, mesh)).lower(q, kv, kv, seg, seg).compile()
    assert "tpu_custom_call" in compiled.as_text()
    # Gradients through the kernel, both masks (the static causal mask of self-attention and the dynamic one), with
    # the global "highest" matmul precision these tests run under (conftest): the backward kernels are traced at
    # transpose time, and Mosaic refuses fp32 contract precision on bf16 operands ("Bad lhs type").
    assert jax.config.jax_default_matmul_precision == "highest"
    for kv_is_q in (True, False):
        def loss(q, k, v, seg, pos, kv_is_q=kv_is_q):
            out = A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, q_positions=pos,
                              kv_positions=pos, impl="auto", kv_is_q=kv_is_q)
            return jnp.sum(out.astype(jnp.float32))

        compiled = jax.jit(under_mesh(jax.grad(loss, argnums=(0, 1, 2)), mesh)).lower(q, kv, kv, seg, seg).compile()
        assert compiled.as_text().count("tpu_custom_call") >= 2  # forward and backward kernels
    # An abstract Engine for this mesh takes the TPU entry of the backend table.
    eng = Engine(None, Glm4vConfig.from_hf(_gqa_dict()), mesh=mesh)
    assert eng.platform == "tpu" and eng.cfg.runtime.kernel_layout == BACKEND_TUNING["tpu"]["engine_kernel_layout"]


def test_train_step_takes_attention_impl():
    """`step.attention_impl` is validated where the config is read (one error naming the field), reaches the
    model config of the step, and the TPU example configs use the splash kernel."""
    import os

    from glm41v_train.config import TrainConfigError, load_config
    from glm41v_train.step import StepConfig, train_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    smoke = os.path.join(repo, "train", "configs", "cpu_smoke.yaml")
    assert load_config(smoke, ["step.attention_impl=xla"]).step.attention_impl == "xla"
    with pytest.raises(TrainConfigError, match=r"step.*attention_impl.*'flash'"):
        load_config(smoke, ["step.attention_impl=flash"])
    for name in ("kaggle_v5e8.yaml", "v5p_pod.yaml"):
        assert load_config(os.path.join(repo, "train", "configs", name)).step.attention_impl == "pallas"
    cfg = Glm4vConfig.from_hf(_gqa_dict())
    assert StepConfig().attention_impl == "auto"
    assert train_config(cfg, StepConfig(attention_impl="pallas")).runtime.attention_impl == "pallas"


@pytest.mark.slow
def test_sharded_train_step_with_the_kernel_equals_xla(monkeypatch):
    """The train step on fsdp=4 x tensor=2 with attention_impl="pallas" (splash forward and backward kernels in the
    interpreter, under shard_map through the step's trace-time mesh) gives the "xla" step's loss and gradients."""
    from test_train_step import FP32, OC, _batch_rows
    from test_train_step import small as small_fixture

    from glm41v_train.step import TrainStep

    monkeypatch.setattr(A, "PALLAS_INTERPRET", True)
    cfg, params = small_fixture.__wrapped__()
    batch, _ = _batch_rows(cfg, 13, 4, 40, 64)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    out = {}
    for impl in ("xla", "pallas"):
        ts = TrainStep(cfg, OC, mesh, dataclasses.replace(FP32, attention_impl=impl))
        out[impl] = ts.grads(ts.place_params(params), ts.shard_batch(batch))
    (loss_x, n_x, g_x), (loss_p, n_p, g_p) = out["xla"], out["pallas"]
    assert float(n_x) == float(n_p) > 0
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * (1 + float(jnp.abs(b).max())))
