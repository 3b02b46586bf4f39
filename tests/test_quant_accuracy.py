"""Weight-only int8/int4 quantization, whole model against the float model (issue 13, "Correctness" 3): teacher-forced
top-1 agreement and mean per-token KL(float || quant) on text, image and video prompts.

The checkpoint is a tiny model wide enough for int4 groups (text hidden 256, head_dim 64, MLP 512, 4 layers, vocab
2048; vision hidden 128, out 256) with realistic random weights, built here as a params tree: every matrix, embedding
and bias N(0, 0.02), norm scales 1; the "outliers" weights also scale 1.5% of each quantizable kernel's input
channels (rows of its (inputs, outputs) view) by 10, the "plain" weights do not. Every Dense the quantizer may touch
is quantized (quant_skip=()), int4 in groups of 64, and runs in the TPU/GPU form ("dequant": float activations).
All 816 positions of the three prompts are scored. The figures are printed (pytest -s) and are in the assertion
messages.

The control: the float model over the float weights plus each quantized kernel's own quantization error with random
signs (same magnitudes per weight, random directions). The quantized model matching its control means the loss is
what the step sizes imply (no systematic error from the quantizer); whether that loss meets the issue's bars is then a
property of the weights (outliers set the int8 channel scales and the int4 group scales) and of how decided the model
is (these random weights: median top-1 margin 0.22 logit std, so small logit noise flips the top-1).

Issue 13's bars (int8: agreement >= 99% and KL <= 1e-3; int4: agreement >= 95%) are NOT met on these weights
(measured 2026-12-01: int8 84.9% / 1.24e-3 with outliers, 96.7% / 3.7e-5 plain; int4 8.3% and 52.5%). They are not
asserted here (a test that is expected to fail proves nothing); the figures and the analysis are in BENCHMARKS.md,
"Weight-only quantization: accuracy", and the issue stays open for them.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util

from glm41v_jax import backend, tiny
from glm41v_jax import model as M
from glm41v_jax import quant as Q
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.inputs import mm_token_types
from glm41v_jax.sharding import unbox

V = 2048
GROUP = 64
MEDIA = dict(image_start_token_id=V - 9, image_end_token_id=V - 8, video_start_token_id=V - 7,
             video_end_token_id=V - 6, image_token_id=V - 5, video_token_id=V - 4)


def _config() -> Glm4vConfig:
    d = tiny.tiny_hf_config(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=V - 1, eos_token_id=[V - 1],
                            rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6]})
    d.update(MEDIA)
    d["vision_config"].update(depth=2, hidden_size=128, num_heads=2, out_hidden_size=256, intermediate_size=512,
                              image_size=112)
    return Glm4vConfig.from_hf(d, kernel_layout="in_out")


def realistic_params(cfg: Glm4vConfig, seed: int, outlier_scale: float, outlier_frac: float = 0.015) -> dict:
    """N(0, 0.02) leaves, norm scales 1; `outlier_frac` of each quantizable kernel's input channels x outlier_scale."""
    flat = traverse_util.flatten_dict(unbox(M.abstract_params(cfg)))
    n_ins = _n_in(cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf in flat.items():
        shape = tuple(leaf.shape)
        if key[-1] == "scale":
            out[key] = np.ones(shape, np.float32)
            continue
        w = rng.normal(0.0, 0.02, shape).astype(np.float32)
        if key in n_ins:  # a quantizable kernel; in_out: its input axes lead
            rows = w.reshape(int(np.prod(shape[:n_ins[key]])), -1)
            rows[rng.choice(rows.shape[0], max(1, round(outlier_frac * rows.shape[0])), replace=False)] *= outlier_scale
        out[key] = w
    return traverse_util.unflatten_dict(out)


def _prompts(cfg: Glm4vConfig) -> dict[str, dict[str, np.ndarray]]:
    """text: 320 random text ids; image: a 8x12-patch image (24 tokens) inside 220 text ids; video: two temporal
    groups of 8x8 patches (16 tokens each, a timestamp-like id after each) inside 210 text ids."""
    rng = np.random.default_rng(1)
    m = cfg.vision.patch_dim

    def text(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, V - 16, n)]

    def frame(h: int, w: int) -> list[int]:
        return [cfg.image_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.image_end_token_id]

    out = {"text": {"input_ids": text(320)},
           "image": {"input_ids": text(20) + frame(8, 12) + text(200),
                     "pixel_values": rng.standard_normal((96, m)).astype(np.float32),
                     "image_grid_thw": np.asarray([(1, 8, 12)], np.int64)},
           "video": {"input_ids": text(10) + [cfg.video_start_token_id] + frame(8, 8) + text(1) + frame(8, 8)
                     + text(1) + [cfg.video_end_token_id] + text(200),
                     "pixel_values_videos": rng.standard_normal((128, m)).astype(np.float32),
                     "video_grid_thw": np.asarray([(2, 8, 8)], np.int64)}}
    for d in out.values():
        d["input_ids"] = np.asarray([d["input_ids"]], np.int64)
        d["attention_mask"] = np.ones_like(d["input_ids"])
        d["mm_token_type_ids"] = mm_token_types(d["input_ids"], cfg)
    return out


def test_compare_on_hand_computed_logits():
    """The metric itself: two positions over 3 tokens, KL worked out by hand."""
    lf = np.log(np.asarray([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    lq = np.log(np.asarray([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]))
    agree, kl = Q.logit_agreement(lf, lq)
    np.testing.assert_array_equal(agree, [False, True])
    np.testing.assert_allclose(kl, [0.5 * np.log(2) + 0.25 * np.log(0.5), 0.0], atol=1e-12)


def _n_in(cfg: Glm4vConfig) -> dict[tuple[str, ...], int]:
    """Quantizable kernel path -> its number of input (contracted) axes (the int8 scale drops them)."""
    flat = traverse_util.flatten_dict(unbox(M.abstract_params(cfg.with_runtime(quantize="int8", quant_skip=()))))
    return {(*k[:-1], "kernel"): len(flat[(*k[:-1], "kernel")].shape) - len(v.shape) for k, v in flat.items()
            if k[-1] == "scale" and (*k[:-1], "kernel") in flat and str(flat[(*k[:-1], "kernel")].dtype) == "int8"}


def _sign_control(params: dict, qp: dict, scheme: str, n_ins: dict, seed: int) -> dict:
    """The float params plus each quantized kernel's own quantization error with random signs: the same error
    magnitudes (per weight, so per group and channel too) in random directions, run by the float model."""
    rng = np.random.default_rng(seed)
    fp, fq = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qp)
    out = dict(fp)
    for key, w in fp.items():
        if key[-1] != "kernel" or fq[key].dtype == w.dtype:
            continue
        err = Q.dequantize_array(np.asarray(fq[key]), np.asarray(fq[(*key[:-1], "scale")]), scheme, n_ins[key],
                                 "in_out") - w
        out[key] = w + err * rng.choice(np.float32([-1, 1]), size=w.shape)
    return traverse_util.unflatten_dict(out)


def _score(ref: dict, logits: dict) -> dict:
    row, agree, kls = {}, [], []
    for k in ref:
        ag, kl = Q.logit_agreement(ref[k], logits[k])
        row[k] = (100 * ag.mean(), kl.mean())
        agree.append(ag)
        kls.append(kl)
    row["all"] = (100 * np.concatenate(agree).mean(), np.concatenate(kls).mean())
    row["n"] = sum(len(a) for a in agree)
    return row


def _fmt(row: dict) -> str:
    return "; ".join(f"{k} {row[k][0]:.2f}% KL {row[k][1]:.2e}" for k in ("text", "image", "video", "all")) + \
        f" ({row['n']} positions)"


@pytest.fixture(scope="module")
def measured() -> dict:
    """{(weights, scheme, run): scores} for weights "outliers" (x10 on 1.5% of the input channels) and "plain" (no
    outliers), run "quant" (the quantized model, "dequant" form) and "control" (the float model over the weights
    plus the sign-randomized quantization error); scores: {prompt or "all": (agreement %, mean KL), "n": positions}.
    One compile per scheme: the params change, not the shapes."""
    cfg = _config()
    inputs = _prompts(cfg)
    weights = {"outliers": realistic_params(cfg, 0, 10.0), "plain": realistic_params(cfg, 0, 1.0)}

    def run(p: dict, c: Glm4vConfig) -> dict:
        return {k: np.asarray(M.forward(p, c, **a))[0] for k, a in inputs.items()}

    ref = {w: run(p, cfg) for w, p in weights.items()}
    for w, logits in ref.items():
        lg = np.concatenate(list(logits.values()))
        top = np.sort(lg, -1)[:, -2:]
        m = np.median((top[:, 1] - top[:, 0]) / lg.std(-1))
        print(f"\n{w}: float model's median top-1 margin {m:.3f} logit std", end="")
    n_ins = _n_in(cfg)
    default = {k: backend.BACKEND_TUNING["cpu"][k] for k in ("quant_matmul", "quant_matmul_int4")}
    figures = {}
    try:
        backend.BACKEND_TUNING["cpu"].update(quant_matmul="dequant", quant_matmul_int4="dequant")  # read at trace
        M._forward_fn.cache_clear()  # the form is a trace-time choice, not part of the config
        for scheme in ("int8", "int4"):
            qcfg = cfg.with_runtime(quantize=scheme, quant_group_size=GROUP, quant_skip=())
            for w, p in weights.items():
                qp = Q.quantize_params(p, qcfg)
                scales = [np.asarray(v) for k, v in traverse_util.flatten_dict(qp).items() if k[-1] == "scale"
                          and (*k[:-1], "kernel") in n_ins]
                print(f"\n{w} {scheme}: mean scale {np.mean([x.mean() for x in scales]):.2e}", end="")
                figures[(w, scheme, "quant")] = _score(ref[w], run(qp, qcfg))
                figures[(w, scheme, "control")] = _score(ref[w], run(_sign_control(p, qp, scheme, n_ins, 2), cfg))
        for key, row in figures.items():
            print(f"\n{' '.join(key):27s} {_fmt(row)}", end="")
        print()
    finally:
        backend.BACKEND_TUNING["cpu"].update(default)
        M._forward_fn.cache_clear()
    return figures



@pytest.mark.slow
def test_quantized_model_loses_what_its_step_sizes_imply(measured):
    """KL(quant) within 1.5x of the sign-randomized control's for int8 and int4, plain and outlier weights: the
    quantization error is no worse than random errors of the same magnitudes (a biased rounding or a scale on the
    wrong axis would correlate the errors along a channel and add up)."""
    for w in ("outliers", "plain"):
        for scheme in ("int8", "int4"):
            q, c = measured[(w, scheme, "quant")], measured[(w, scheme, "control")]
            assert q["all"][1] <= 1.5 * c["all"][1], f"{w} {scheme}: quant {_fmt(q)}; control {_fmt(c)}"


@pytest.mark.slow
def test_int8_kl_without_outliers(measured):
    """The issue's int8 KL bar (<= 1e-3) on N(0, 0.02) weights without outlier channels, every prompt."""
    row = measured[("plain", "int8", "quant")]
    assert max(row[k][1] for k in ("text", "image", "video")) <= 1e-3, _fmt(row)
