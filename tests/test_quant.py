"""Weight-only int8/int4 quantization (quant.py, layers.Dense(quant=...)) against references written here.

The reference quantizer below is a per-channel loop in NumPy: scale = max|w| / qmax, codes = rint(w * (qmax /
max|w|)) (0 for an all-zero channel), clipped to [-qmax, qmax]; int4 per group of g along the last input axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
from flax import traverse_util

from glm41v_jax import backend, layers
from glm41v_jax import model as M
from glm41v_jax import quant as Q
from glm41v_jax.config import ConfigError, Glm4vConfig, RuntimeConfig
from glm41v_jax.requests import synthetic_inputs
from glm41v_jax.sharding import make_mesh, param_shardings, unbox

QMAX = {"int8": 127, "int4": 7}


def ref_quantize(w, scheme, n_in, layout, g=None):
    """(codes as int64, scale fp32), in the storage shapes of quant.py, one output channel (and group) at a time."""
    w = np.asarray(w, np.float32)
    nd = w.ndim
    in_ax = list(range(n_in)) if layout == "in_out" else list(range(nd - n_in, nd))
    out_ax = [i for i in range(nd) if i not in in_ax]
    moved = np.transpose(w, out_ax + in_ax)  # (*out, *in)
    out_shape, in_shape = moved.shape[:len(out_ax)], moved.shape[len(out_ax):]
    i_last = in_shape[-1]
    if scheme == "int8":  # (channels, 1, 1, inputs)
        mat = moved.reshape(int(np.prod(out_shape)), 1, 1, int(np.prod(in_shape)))
    else:  # (channels, leading inputs, groups, g)
        mat = moved.reshape(int(np.prod(out_shape)), int(np.prod(in_shape[:-1])), i_last // g, g)
    q = np.float32(QMAX[scheme])
    codes = np.zeros(mat.shape, np.int64)
    scale = np.zeros(mat.shape[:3], np.float32)
    for o in range(mat.shape[0]):
        for a in range(mat.shape[1]):
            for b in range(mat.shape[2]):
                blk = mat[o, a, b]
                amax = np.float32(np.max(np.abs(blk)))
                scale[o, a, b] = amax / q
                if amax > 0:
                    codes[o, a, b] = np.clip(np.rint(blk * (q / amax)), -q, q)
    if scheme == "int8":
        codes = np.transpose(codes.reshape(moved.shape), np.argsort(out_ax + in_ax))
        return codes, scale.reshape(out_shape)
    # int4: (*out, *in[:-1], I/g, g) -> the storage order
    codes = codes.reshape(*out_shape, *in_shape[:-1], i_last // g, g)
    scale = scale.reshape(*out_shape, *in_shape[:-1], i_last // g)
    if layout == "out_in":
        return codes, scale
    no, ni = len(out_shape), len(in_shape)
    perm = [*range(no, no + ni + 1), *range(no)]  # in axes (with I/g, g) first
    return np.transpose(codes, perm), np.transpose(scale, [*range(no, no + ni), *range(no)])


def ref_dequantize(codes, scale, scheme, n_in, layout):
    c = np.asarray(codes).astype(np.float32)
    s = np.asarray(scale, np.float32)
    if scheme == "int8":
        s = s.reshape((1,) * n_in + s.shape) if layout == "in_out" else s.reshape(s.shape + (1,) * n_in)
        return c * s
    if layout == "out_in":  # (*out, *in[:-1], I/g, g)
        w = c * s[..., None]
        return w.reshape(*w.shape[:-2], -1)
    gax = n_in  # (*in[:-1], I/g, g, *out): the group axis
    w = c * np.expand_dims(s, gax)
    return w.reshape(*w.shape[:gax - 1], -1, *w.shape[gax + 1:])


def awkward_kernel(shape, n_in, layout, scheme, g, seed=0):
    """std 0.02 weights with the edge cases, on the (channels, inputs) view (int4 groups are g consecutive inputs):
    an all-zero channel, a channel holding +max and -max, exact .5 ties (each group's max is qmax, so
    w * qmax / max = w), and (int4) a group whose one outlier rounds its other codes to 0."""
    nd = len(shape)
    in_ax = list(range(n_in)) if layout == "in_out" else list(range(nd - n_in, nd))
    out_ax = [i for i in range(nd) if i not in in_ax]
    moved_shape = [shape[i] for i in out_ax + in_ax]
    n_ch, n_inputs = int(np.prod(moved_shape[:len(out_ax)])), int(np.prod(moved_shape[len(out_ax):]))
    flat = np.random.default_rng(seed).normal(0, 0.02, size=(n_ch, n_inputs)).astype(np.float32)
    q = QMAX[scheme]
    group = n_inputs if scheme == "int8" else g
    flat[0] = 0.0
    flat[1, :2] = [0.5, -0.5]
    ties = np.array([q, 2.5, -3.5, 0.5, -1.5, 1.5, 126.5 if q == 127 else -6.5], np.float32)[:group]
    flat[2] = np.tile(np.pad(ties, (0, group - len(ties))), n_inputs // group)
    if scheme == "int4":
        flat[3, 1] = 5.0
    return np.ascontiguousarray(np.transpose(flat.reshape(moved_shape), np.argsort(out_ax + in_ax)))


def test_hand_computed_codes():
    """A case small enough to check by hand: in_out (4 inputs, 2 outputs)."""
    w = np.array([[127.0, 0.0], [2.5, 0.0], [-3.5, 0.0], [0.5, 0.0]], np.float32)
    codes, scale = Q.quantize_array(w, "int8", 1, "in_out")
    np.testing.assert_array_equal(codes, [[127, 0], [2, 0], [-4, 0], [0, 0]])
    np.testing.assert_array_equal(scale, [1.0, 0.0])
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    w4 = np.array([[7.0, 2.5, -0.5, 1.5, 0.02, 0.01, 0.0, -0.03]], np.float32).T  # (8, 1), groups of 4
    c4, s4 = Q.quantize_array(w4, "int4", 1, "in_out", group_size=4)
    assert c4.shape == (2, 4, 1) and s4.shape == (2, 1) and c4.dtype == jnp.int4
    np.testing.assert_array_equal(c4.astype(np.int8)[..., 0], [[7, 2, 0, 2], [5, 2, 0, -7]])  # 0.02*7/0.03 = 4.7
    np.testing.assert_allclose(s4[:, 0], [1.0, np.float32(0.03) / np.float32(7)], rtol=0)


CASES = [  # (kernel shape in in_out order, n_in)
    ((24, 3, 8), 1),  # q/k/v: D -> (N, H)
    ((4, 16, 12), 2),  # o_proj: (N, H) -> D
    ((32, 2, 6), 1),  # gate_up
]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape,n_in", CASES)
def test_quantizer_matches_reference(scheme, layout, shape, n_in):
    g = 8
    if layout == "out_in":
        shape = (*shape[n_in:], *shape[:n_in])
    w = awkward_kernel(shape, n_in, layout, scheme, g)
    codes, scale = Q.quantize_array(w, scheme, n_in, layout, group_size=g)
    rc, rs = ref_quantize(w, scheme, n_in, layout, g)
    assert codes.dtype == layers.QUANT_DTYPES[scheme] and scale.dtype == np.float32
    assert codes.shape == rc.shape and scale.shape == rs.shape
    np.testing.assert_array_equal(codes.astype(np.int64), rc)
    np.testing.assert_array_equal(scale.view(np.int32), rs.view(np.int32))  # bit for bit
    assert np.all(np.isfinite(scale)) and (scale == 0).any()  # the all-zero channel: scale 0, no NaN
    assert np.abs(codes.astype(np.int64)).max() == QMAX[scheme]
    # The device quantizer (quantize_params' path for device arrays) gives the same bits.
    dc, ds = Q._device_quantizer(scheme, n_in, layout, g, 0, None)(jnp.asarray(w), np.float32(QMAX[scheme]))
    np.testing.assert_array_equal(np.asarray(dc).astype(np.int64), rc)
    np.testing.assert_array_equal(np.asarray(ds).view(np.int32), rs.view(np.int32))
    np.testing.assert_array_equal(Q.dequantize_array(codes, scale, scheme, n_in, layout),
                                  ref_dequantize(rc, rs, scheme, n_in, layout))
    err = np.abs(Q.dequantize_array(codes, scale, scheme, n_in, layout) - w)
    assert err.max() <= np.abs(w).max() / QMAX[scheme] / 2 * 1.0001


def _dense(features, axes, n_in, layout, quant, g=8):
    return layers.Dense(features, axes, n_in=n_in, use_bias=True, kernel_layout=layout, quant=quant,
                        quant_group_size=g)


@pytest.fixture
def dequant_matmul(monkeypatch):
    """Run the quantized Dense as "dequant" on CPU (the TPU/GPU form) for this test. The form is read when a
    program is traced and is not part of `model.forward`'s cache key: the cache is cleared before and after."""
    monkeypatch.setitem(backend.BACKEND_TUNING["cpu"], "quant_matmul", "dequant")
    monkeypatch.setitem(backend.BACKEND_TUNING["cpu"], "quant_matmul_int4", "dequant")
    M._forward_fn.cache_clear()
    yield
    M._forward_fn.cache_clear()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape,n_in", CASES[:2])
@pytest.mark.parametrize("rows", [1, 5])
def test_dense_equals_float_dense_over_dequantized(dequant_matmul, scheme, layout, shape, n_in, rows):
    features, in_shape = shape[n_in:], shape[:n_in]
    axes = ("a", "b", "c")[: len(shape)]
    kshape = shape if layout == "in_out" else (*features, *in_shape)
    w = awkward_kernel(kshape, n_in, layout, scheme, 8, seed=rows)
    bias = np.random.default_rng(1).normal(size=features).astype(np.float32)
    codes, scale = ref_quantize(w, scheme, n_in, layout, 8)
    x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, 2, *in_shape)).astype(np.float32))
    qd = _dense(features, axes, n_in, layout, scheme)
    qp = unbox(qd.init(jax.random.PRNGKey(0), x)["params"])
    assert qp["kernel"].shape == codes.shape and qp["scale"].shape == scale.shape
    qp = {"kernel": codes.astype(layers.QUANT_DTYPES[scheme]), "scale": scale, "bias": bias}
    fp = {"kernel": ref_dequantize(codes, scale, scheme, n_in, layout), "bias": bias}
    y_q = qd.apply({"params": qp}, x)
    y_f = _dense(features, axes, n_in, layout, "none").apply({"params": fp}, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape,n_in", CASES[:2])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_int8_dot_matmul(layout, shape, n_in, rows):
    """The CPU form ("int8_dot"): activation rows quantized per row to int8, an int32 dot, both scales; checked
    against that math in NumPy (float64 accumulation of the integer products) and, loosely, against float."""
    assert backend.backend_default("cpu", "quant_matmul") == "int8_dot"
    features, in_shape = shape[n_in:], shape[:n_in]
    axes = ("a", "b", "c")[: len(shape)]
    kshape = shape if layout == "in_out" else (*features, *in_shape)
    w = np.random.default_rng(rows).normal(0, 0.02, size=kshape).astype(np.float32)
    codes, scale = ref_quantize(w, "int8", n_in, layout)
    x = np.random.default_rng(rows + 1).normal(size=(rows, *in_shape)).astype(np.float32)
    x[0] = 0.0  # an all-zero row: scale 0, output = bias
    qp = {"kernel": codes.astype(np.int8), "scale": scale, "bias": np.zeros(features, np.float32)}
    y = np.asarray(jax.jit(lambda p, x: _dense(features, axes, n_in, layout, "int8").apply({"params": p}, x))(qp, x))
    xf = x.reshape(rows, -1).astype(np.float64)
    xs = np.abs(xf).max(1, keepdims=True) / 127
    xq = np.clip(np.rint(xf / np.where(xs == 0, 1, xs)), -127, 127)
    w2 = codes.reshape(-1, int(np.prod(features))) if layout == "in_out" else \
        codes.reshape(int(np.prod(features)), -1).T
    ref = (xq @ w2) * xs * scale.reshape(1, -1)
    np.testing.assert_allclose(y.reshape(rows, -1), ref, rtol=1e-5, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(y[0], 0.0)
    w_io = w if layout == "in_out" else np.transpose(w, (*range(len(features), w.ndim), *range(len(features))))
    y_float = xf @ w_io.reshape(-1, int(np.prod(features)))
    assert np.abs(y.reshape(rows, -1) - y_float).max() <= 0.03 * np.abs(y_float).max()


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape,n_in", CASES)
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_int8_dot_matmul(layout, shape, n_in, rows):
    """The CPU form of int4 ("int8_dot", batched over groups): activation rows quantized per row to int8, each
    group's integer partial sums times its scale, summed, times the row scale; checked against that math in NumPy
    (float64 sums of the integer products, on the reference codes) and, loosely, against the float matmul."""
    assert backend.backend_default("cpu", "quant_matmul_int4") == "int8_dot"
    g = 4
    features, in_shape = shape[n_in:], shape[:n_in]
    axes = ("a", "b", "c")[: len(shape)]
    w_io = np.random.default_rng(rows).normal(0, 0.02, size=shape).astype(np.float32)
    w_io[..., 0] *= 10  # an outlier output channel
    w_oi = np.transpose(w_io, (*range(n_in, len(shape)), *range(n_in)))
    codes, scale = ref_quantize(w_io if layout == "in_out" else w_oi, "int4", n_in, layout, g)
    c_can, s_can = ref_quantize(w_oi, "int4", n_in, "out_in", g)  # (*out, *in[:-1], G, g), (*out, *in[:-1], G)
    n_o, n_a, n_g = int(np.prod(features)), int(np.prod(in_shape[:-1])), in_shape[-1] // g
    x = np.random.default_rng(rows + 1).normal(size=(rows, *in_shape)).astype(np.float32)
    x[0] = 0.0  # an all-zero row: scale 0, output = bias
    qp = {"kernel": codes.astype(np.int8), "scale": scale, "bias": np.zeros(features, np.float32)}
    y = np.asarray(jax.jit(lambda p, x: _dense(features, axes, n_in, layout, "int4", g).apply({"params": p}, x))(
        qp, x)).reshape(rows, n_o)
    xf = x.reshape(rows, -1).astype(np.float64)
    xs = np.abs(xf).max(1, keepdims=True) / 127
    xq = np.clip(np.rint(xf / np.where(xs == 0, 1, xs)), -127, 127).reshape(rows, n_a, n_g, g)
    partial = np.einsum("ragi,oagi->roag", xq, c_can.reshape(n_o, n_a, n_g, g).astype(np.float64))
    ref = (partial * s_can.reshape(1, n_o, n_a, n_g)).sum(axis=(2, 3)) * xs
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(y[0], 0.0)
    y_float = xf @ w_io.reshape(-1, n_o)
    assert np.abs(y - y_float).max() <= 0.15 * np.abs(y_float).max()


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_int4_many_rows_run_dequant(layout):
    """Above INT4_GROUPED_MAX_ROWS["int8_dot"] rows (prefill) the CPU's int4 Dense is the float Dense over the
    dequantized kernel (float activations: fp32 tolerance), not the grouped int8 dot."""
    features, in_shape = (2, 6), (32,)
    rows = layers.INT4_GROUPED_MAX_ROWS["int8_dot"] + 1
    kshape = (*in_shape, *features) if layout == "in_out" else (*features, *in_shape)
    w = np.random.default_rng(0).normal(0, 0.02, size=kshape).astype(np.float32)
    codes, scale = ref_quantize(w, "int4", 1, layout, 8)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(rows, *in_shape)).astype(np.float32))
    bias = np.zeros(features, np.float32)
    y_q = _dense(features, ("a", "b", "c"), 1, layout, "int4").apply(
        {"params": {"kernel": codes.astype(np.int8), "scale": scale, "bias": bias}}, x)
    y_f = _dense(features, ("a", "b", "c"), 1, layout, "none").apply(
        {"params": {"kernel": ref_dequantize(codes, scale, "int4", 1, layout), "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("shape,n_in", [((32, 6), 1), ((2, 16, 6), 2)])
def test_int4_grouped_form_equals_dequantized_dense(monkeypatch, layout, shape, n_in):
    """The TPU form of int4 ("grouped": float activations, one dot batched over the groups, the partial sums times
    the group scales, summed) is the float Dense over the dequantized kernel within fp32 tolerance, up to
    INT4_GROUPED_MAX_ROWS["grouped"] rows (decode batches); more rows run "dequant" (the same numbers). Run here on
    CPU with the TPU's choice patched into the CPU row of the table (the form is plain XLA; the TPU compiler's bytes
    are checked in tests/test_tpu_generate_plans.py)."""
    assert backend.backend_default("tpu", "quant_matmul_int4") == "grouped"
    monkeypatch.setitem(backend.BACKEND_TUNING["cpu"], "quant_matmul_int4", "grouped")
    features, in_shape = shape[n_in:], shape[:n_in]
    axes = ("a", "b", "c")[: len(shape)]
    w_io = np.random.default_rng(0).normal(0, 0.02, size=shape).astype(np.float32)
    w_io[..., 0] *= 10  # an outlier output channel
    w = w_io if layout == "in_out" else np.transpose(w_io, (*range(n_in, len(shape)), *range(n_in)))
    codes, scale = ref_quantize(w, "int4", n_in, layout, 8)
    bias = np.random.default_rng(2).normal(size=features).astype(np.float32)
    for rows in (1, 3, layers.INT4_GROUPED_MAX_ROWS["grouped"] + 1):
        x = np.random.default_rng(rows).normal(size=(rows, *in_shape)).astype(np.float32)
        y_q = _dense(features, axes, n_in, layout, "int4", 8).apply(
            {"params": {"kernel": codes.astype(np.int8), "scale": scale, "bias": bias}}, jnp.asarray(x))
        y_f = _dense(features, axes, n_in, layout, "none").apply(
            {"params": {"kernel": ref_dequantize(codes, scale, "int4", n_in, layout), "bias": bias}}, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5, err_msg=f"rows={rows}")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_kernel_layout_per_scheme(scheme):
    """The Engine keeps int4 params in `engine_kernel_layout_int4` (CPU: "in_out", where the grouped int8 dot reads
    the codes without a copy) and int8 ones in `engine_kernel_layout` ("out_in"), as BACKEND_TUNING says."""
    from glm41v_jax.engine import Engine

    cfg = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize=scheme, quant_group_size=16)
    params = Q.quantize_params(_float_params(cfg, 0), cfg)
    eng = Engine(params, cfg)
    key = "engine_kernel_layout_int4" if scheme == "int4" else "engine_kernel_layout"
    assert eng.cfg.runtime.kernel_layout == backend.backend_default("cpu", key)
    assert backend.backend_default("cpu", "engine_kernel_layout_int4") == "in_out"
    assert backend.backend_default("cpu", "engine_kernel_layout") == "out_in"
    q = traverse_util.flatten_dict(eng.params)
    down = next(v for k, v in q.items() if k[-2:] == ("down_proj", "kernel") or k[-2:] == ("down", "kernel"))
    assert down.dtype == jnp.int8  # int4 codes are held as int8 on CPU


def _float_params(cfg: Glm4vConfig, seed: int) -> dict:
    """Host float params of `cfg`'s float twin (`cfg` is a config of R.small_vocab_dict("a"))."""
    return R.numpy_params(R.small_vocab_dict("a"), cfg, seed)

def _flat(tree):
    return traverse_util.flatten_dict(tree)


def _ref_tree(float_params, cfg, g):
    """The reference quantization of a whole (unscanned) float tree: per-path n_in and layout, as the model builds
    them (o projections contract (N, H); the vision tower is in_out)."""
    codes, deq = {}, {}
    q = _flat(M.abstract_params(cfg))
    for key, w in _flat(float_params).items():
        w = np.asarray(w)
        if key[-1] != "kernel" or q[key].value.dtype == w.dtype:
            codes[key] = deq[key] = w
            continue
        n_in = 2 if key[-2] in ("o_proj", "proj") and key[-3] in ("self_attn", "attn") else 1
        layout = "in_out" if key[0] == "visual" else cfg.runtime.kernel_layout
        c, s = ref_quantize(w, cfg.runtime.quantize, n_in, layout, g)
        codes[key], codes[(*key[:-1], "scale")] = c, s
        deq[key] = ref_dequantize(c, s, cfg.runtime.quantize, n_in, layout)
    return traverse_util.unflatten_dict(codes), traverse_util.unflatten_dict(deq)


def _inputs(cfg):
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    arrs = synthetic_inputs(cfg, batch=1, prompt_tokens=12, images=[(unit, unit * 2)])
    arrs["pixel_values"] = np.random.default_rng(0).normal(size=arrs["pixel_values"].shape).astype(np.float32)
    arrs["input_ids"][0, -5:] = np.arange(5) + 11
    return arrs


@pytest.mark.slow
@pytest.mark.parametrize("scheme,layout", [("int8", "out_in"), ("int4", "in_out")])
def test_whole_model_equals_float_model_on_dequantized_params(dequant_matmul, scheme, layout):
    """quantize_params matches the reference on every leaf (the device path: test_sharded_quantized_model), its
    tree is abstract_params' exactly, and the quantized model's logits (text + image) are the float model's over
    the dequantized weights."""
    cfg = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize=scheme, quant_group_size=16, quant_skip=(),
                              kernel_layout=layout)
    fcfg = cfg.with_runtime(quantize="none")
    params = _float_params(cfg, 3)
    qp = Q.quantize_params(params, cfg)
    abstract = jax.tree.map(lambda a: (a.shape, a.dtype), unbox(M.abstract_params(cfg)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), qp) == abstract
    assert Q.scheme_of(qp) == scheme and Q.is_quantized(qp) and not Q.is_quantized(params)
    ref_codes, deq = _ref_tree(params, cfg, 16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).astype(np.float64), b), qp, ref_codes)
    assert _flat(qp)[("visual", "patch_embed", "kernel")].dtype == np.float32  # always float
    arrs = _inputs(cfg)
    logits_q = M.forward(qp, cfg, **arrs)
    logits_f = M.forward(deq, fcfg, **arrs)
    np.testing.assert_allclose(np.asarray(logits_q), np.asarray(logits_f), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_layout_change_commutes_with_quantization():
    """to_kernel_layout moves int8 and int4 codes and scales like float kernels: quantize then re-layout equals
    re-layout then quantize, bit for bit (scanned layers included)."""
    for scheme in ("int8", "int4"):
        cfg = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize=scheme, quant_group_size=16, scan_layers=True)
        fcfg = cfg.with_runtime(quantize="none")
        params = _float_params(cfg, 4)  # host: views, no compiles
        a, cfg_oi = M.to_kernel_layout(Q.quantize_params(params, cfg), cfg, "out_in")
        b = Q.quantize_params(M.to_kernel_layout(params, fcfg, "out_in")[0], cfg_oi)
        assert cfg_oi.runtime.quantize == scheme
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x).astype(np.float32),
                                                                np.asarray(y).astype(np.float32)), a, b)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_sharded_quantized_model(scheme):
    """8 CPU devices, mesh fsdp=2,tensor=4: float params sharded, quantized leaf by leaf straight into the quantized
    tree's shardings (param_shardings of abstract_params), and the model's logits equal the unsharded run's."""
    assert jax.device_count() == 8
    cfg = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize=scheme, quant_group_size=16, quant_skip=())
    fcfg = cfg.with_runtime(quantize="none")
    mesh = make_mesh("fsdp=2,tensor=4")
    params = _float_params(cfg, 5)
    arrs = _inputs(cfg)
    logits = np.asarray(M.forward(Q.quantize_params(params, cfg), cfg, **arrs))  # the host quantizer, one device
    f_sh = param_shardings(M.abstract_params(fcfg), mesh)
    sharded_float = jax.device_put(params, f_sh)
    q_sh = param_shardings(M.abstract_params(cfg), mesh)
    qp = Q.quantize_params(sharded_float, cfg, q_sh, donate=True)
    assert all(sh.is_equivalent_to(x.sharding, x.ndim) for x, sh in zip(jax.tree.leaves(qp), jax.tree.leaves(q_sh),
                                                                         strict=True))
    gu = _flat(qp)[("language_model", "layers_0", "mlp", "gate_up", "kernel")]
    assert gu.sharding.spec[-1] == "tensor"  # the codes are split like the float kernel
    flat_q = _flat(qp)
    for key, x in _flat(sharded_float).items():  # donate=True: each float kernel that was quantized is gone
        assert x.is_deleted() == jnp.issubdtype(flat_q[key].dtype, jnp.integer), key
    with jax.set_mesh(mesh):
        logits_sharded = M.forward(qp, cfg, **arrs)
    np.testing.assert_allclose(np.asarray(logits_sharded), logits, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ConfigError, match="quantize must be one of 'none', 'int8', 'int4'; got 'int3'"):
        RuntimeConfig(quantize="int3")
    for bad in (0, -128, 1.5, "128", True):
        with pytest.raises(ConfigError, match="quant_group_size must be a positive integer"):
            RuntimeConfig(quant_group_size=bad)
    with pytest.raises(ConfigError, match="quant_skip must name parts among 'lm_head', 'vision'; got .*embed"):
        RuntimeConfig(quant_skip=("embed",))
    assert RuntimeConfig(quant_skip="lm_head").quant_skip == ("lm_head",)
    with pytest.raises(layers.QuantError, match="scheme must be one of 'int8', 'int4'; got 'fp8'"):
        Q.quantize_array(np.ones((4, 4), np.float32), "fp8")
    with pytest.raises(layers.QuantError, match="kernel: int4 groups of 128 along an input axis of 96"):
        Q.quantize_array(np.ones((96, 4), np.float32), "int4")
    # I % g != 0 in a model: hidden 128, groups of 48; the error names the layer.
    cfg = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize="int4", quant_group_size=48)
    with pytest.raises(layers.QuantError, match=r"q_proj: int4 groups of 48 along an input axis of 128"):
        M.abstract_params(cfg)
    cfg8 = Glm4vConfig.from_hf(R.small_vocab_dict("a"), quantize="int8")
    params = _float_params(cfg8, 0)
    qp = Q.quantize_params(params, cfg8)
    with pytest.raises(layers.QuantError, match=r"already quantized \(int8\)"):
        Q.quantize_params(qp, cfg8)
    with pytest.raises(layers.QuantError, match="runtime.quantize is 'none'"):
        Q.quantize_params(params, cfg8.with_runtime(quantize="none"))
    bad = traverse_util.unflatten_dict({**_flat(params), ("lm_head", "kernel"): np.zeros((3, 3), np.float32)})
    with pytest.raises(layers.QuantError, match=r"lm_head/kernel: shape \(3, 3\)"):
        Q.quantize_params(bad, cfg8)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tpu_compiler_reads_packed_codes_without_a_float_copy(scheme):
    """The 9B's MLP down projection (13696 -> 4096, bf16 activations, one decode row) compiled by the TPU compiler
    (libtpu) for a v5e-1: the arguments are the codes at 1 byte (int8) or half a byte (int4: jnp.int4 is packed) per
    weight plus the scales, and no temporary holds a dequantized kernel (the convert is fused into the dot)."""
    from flax import linen as nn

    from glm41v_jax.sharding import under_mesh
    from glm41v_jax.tpu_slices import parse_tpu, topology_devices

    mesh = make_mesh("tensor=1", topology_devices(parse_tpu("v5e-1")))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    d_in, d_out = 13696, 4096
    dense = layers.Dense((d_out,), ("mlp", "embed"), quant=scheme, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, d_in), jnp.bfloat16, sharding=rep)
    abstract = nn.meta.unbox(jax.eval_shape(dense.init, jax.random.PRNGKey(0), jnp.zeros((1, d_in), jnp.bfloat16)))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract["params"])
    fn = under_mesh(lambda p, x: dense.apply({"params": p}, x), mesh)
    mem = jax.jit(fn).lower(params, x).compile().memory_analysis()
    weights = d_in * d_out
    code_bytes = weights if scheme == "int8" else weights // 2
    scale_bytes = 4 * int(np.prod(params["scale"].shape))
    # + the bf16 row and the TPU's tile padding (under 1%)
    assert code_bytes + scale_bytes <= mem.argument_size_in_bytes <= 1.01 * (code_bytes + scale_bytes)
    assert mem.temp_size_in_bytes < weights // 8, mem.temp_size_in_bytes  # no (d_in, d_out) float kernel
