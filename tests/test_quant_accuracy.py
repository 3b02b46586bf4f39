"""Weight-only int8/int4 quantization, whole model against the float model (issue 13, "Correctness" 3): teacher-forced
top-1 agreement and mean per-token KL(float || quant) on text, image and video prompts, on a DECIDED tiny model.

The model (glm41v_jax/tiny_trained.py): text hidden 256, 2 heads of head_dim 128 over 1 KV head, MLP 512, 4 layers,
vocab 256; vision hidden 128, depth 2. Realistic init (every matrix, embedding and bias N(0, 0.02), norm scales 1)
with a FIXED few outlier channels: 2 hidden dims whose RMSNorm gains in front of the projections are 10 (activation
outliers at every q/k/v/gate_up input) and 2 input channels of every quantizable kernel x10 (weight outliers that
set int8 channel scales and int4 group scales). Then trained here, 100 Adam steps on CPU, on a synthetic language
(each token's preferred successor with p 0.85, else uniform; an image's or video's class named right after it, so
the vision tower matters), from which the held-out prompts come, 512 tokens each: text (511 scored positions),
four images (439), three two-frame videos (397). Scored: every position whose next token is text (the trained
ones); "media" are the 7 of them that name a media's class.

The issue's bars are asserted on that model, int4 in groups of 128 (the issue's) and the "dequant" form (float
activations, as on TPU/GPU), with every quantizable Dense quantized (quant_skip=()) and with the default skip (vision
float): int8 agreement >= 99% and mean KL <= 1e-3 on each of text/image/video; int4 agreement >= 95%. The harness
itself is asserted too: the float model is decided after training (and was not before), names every held-out
media's class, and still carries its outliers. The control: the float model over the float weights plus each
quantized kernel's own quantization error with random signs; the quantized model losing no more than it means no
systematic error (a biased rounding or a scale on the wrong axis would add up along a channel).

The figures are printed (pytest -s) and are in the assertion messages; BENCHMARKS.md, "Weight-only quantization:
accuracy", has them with the stress case (x10 on 1.5% of every kernel's input channels; benchmarks/quant_accuracy.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util

from glm41v_jax import backend
from glm41v_jax import model as M
from glm41v_jax import quant as Q
from glm41v_jax import tiny_trained as TT
from glm41v_jax.config import Glm4vConfig

GROUP = 128
PROMPTS = ("text", "image", "video")


def test_compare_on_hand_computed_logits():
    """The metric itself: two positions over 3 tokens, KL worked out by hand."""
    lf = np.log(np.asarray([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    lq = np.log(np.asarray([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]))
    agree, kl = Q.logit_agreement(lf, lq)
    np.testing.assert_array_equal(agree, [False, True])
    np.testing.assert_allclose(kl, [0.5 * np.log(2) + 0.25 * np.log(0.5), 0.0], atol=1e-12)


def test_margins_on_hand_computed_logits():
    """(top-1 - top-2) / std of each row."""
    lg = np.asarray([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 2.0]])
    np.testing.assert_allclose(TT.margins(lg), [2.0 / np.std([3, 1, 0, 0]), 1.0 / np.std([1, 1, 0, 2])])


def test_language_labels_and_media_layout():
    """A row holds its media where the config's ids say, the token after each media's end marker is a class name,
    and only positions followed by a text id are labelled."""
    cfg = TT.config()
    lang = TT.Language(cfg)
    a = lang.batch(np.random.default_rng(0), [(2, 0), (0, 1)], 128)
    ids = a["input_ids"]
    assert ids.shape == (2, 128) and a["image_grid_thw"].shape == (2, 3) and a["video_grid_thw"].shape == (1, 3)
    assert (ids == cfg.image_token_id).sum() == 2 * 16 + 2 * 16  # two images + a two-frame video, 16 tokens each
    ends = np.isin(ids[:, :-1], [cfg.image_end_token_id, cfg.video_end_token_id])
    after = ids[:, 1:][ends & ~np.isin(ids[:, 1:], lang.frame_tokens)]
    assert len(after) == 3 and np.isin(after, lang.class_tokens).all()
    lab = lang.labelled(ids)
    assert not lab[:, -1].any()
    np.testing.assert_array_equal(lab[:, :-1], ids[:, 1:] < cfg.text.vocab_size - TT.N_RESERVED)


def _sign_control(params: dict, qp: dict, scheme: str, n_ins: dict, seed: int) -> dict:
    """The float params plus each quantized kernel's own quantization error with random signs: the same error
    magnitudes (per weight, so per group and channel too) in random directions, run by the float model."""
    rng = np.random.default_rng(seed)
    fp, fq = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qp)
    out = dict(fp)
    for key, w in fp.items():
        if key not in n_ins:
            continue
        err = Q.dequantize_array(np.asarray(fq[key]), np.asarray(fq[(*key[:-1], "scale")]), scheme, n_ins[key],
                                 "in_out") - w
        out[key] = w + err * rng.choice(np.float32([-1, 1]), size=w.shape)
    return traverse_util.unflatten_dict(out)


def _score(ref: dict, logits: dict, scored: dict, media: dict) -> dict:
    """{prompt, "media", "all": (agreement %, mean KL)} over the scored positions."""
    row, agree, kls, mag, mkl = {}, [], [], [], []
    for k in ref:
        ag, kl = Q.logit_agreement(ref[k], logits[k])
        row[k] = (100 * ag[scored[k]].mean(), kl[scored[k]].mean())
        agree.append(ag[scored[k]])
        kls.append(kl[scored[k]])
        mag.append(ag[media[k]])
        mkl.append(kl[media[k]])
    row["media"] = (100 * np.concatenate(mag).mean(), np.concatenate(mkl).mean())
    row["all"] = (100 * np.concatenate(agree).mean(), np.concatenate(kls).mean())
    return row


def _fmt(row: dict) -> str:
    return "; ".join(f"{k} {row[k][0]:.2f}% KL {row[k][1]:.2e}" for k in (*PROMPTS, "media", "all"))


@pytest.fixture(scope="module")
def measured() -> dict:
    """The trained model's figures: "margin_before"/"margin_after" ({prompt: median top-1 margin / logit std over
    the scored positions}), "outliers_before"/"outliers_after" (tiny_trained.outlier_report), "named" (the float
    model's top-1 at the media positions == the class), "n" (scored positions per prompt), and
    {(scheme, quant_skip, run): scores} for run "quant" (the quantized model, "dequant" form) and "control"."""
    cfg = TT.config()
    lang = TT.Language(cfg)
    inputs = lang.prompts()
    ids = {k: a["input_ids"][0] for k, a in inputs.items()}
    scored = {k: lang.labelled(a["input_ids"])[0] for k, a in inputs.items()}
    ends = [cfg.image_end_token_id, cfg.video_end_token_id]
    media = {k: np.append(np.isin(i[:-1], ends) & np.isin(i[1:], lang.class_tokens), False) for k, i in ids.items()}

    def run(p: dict, c: Glm4vConfig) -> dict:
        return {k: np.asarray(M.forward(p, c, **a))[0] for k, a in inputs.items()}

    def margin(logits: dict) -> dict:
        return {k: round(float(np.median(TT.margins(v[scored[k]]))), 3) for k, v in logits.items()}

    p0 = TT.init_params(cfg, 0, TT.Outliers())
    out: dict = {"outliers_before": TT.outlier_report(p0, cfg), "margin_before": margin(run(p0, cfg))}
    params, losses = TT.train(p0, cfg, lang)
    out["outliers_after"] = TT.outlier_report(params, cfg)
    for o in ("outliers_before", "outliers_after"):
        out[o] = {k: round(v, 3) for k, v in out[o].items()}
    ref = run(params, cfg)
    out["margin_after"] = margin(ref)
    out["named"] = np.concatenate([ref[k].argmax(-1)[:-1][media[k][:-1]] == ids[k][1:][media[k][:-1]]
                                   for k in PROMPTS])
    out["n"] = {k: int(v.sum()) for k, v in scored.items()}
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps; median top-1 margin / logit std "
          f"before {out['margin_before']}, after {out['margin_after']}; media named {out['named'].sum()}/"
          f"{out['named'].size}; scored {out['n']}\noutliers before {out['outliers_before']}\n"
          f"outliers after  {out['outliers_after']}", end="")
    n_ins = Q.quantizable_kernels(cfg)
    default = {k: backend.BACKEND_TUNING["cpu"][k] for k in ("quant_matmul", "quant_matmul_int4")}
    try:
        backend.BACKEND_TUNING["cpu"].update(quant_matmul="dequant", quant_matmul_int4="dequant")  # read at trace
        M._forward_fn.cache_clear()  # the form is a trace-time choice, not part of the config
        for scheme in ("int8", "int4"):
            for skip in ((), ("vision",)):
                qcfg = cfg.with_runtime(quantize=scheme, quant_group_size=GROUP, quant_skip=skip)
                qp = Q.quantize_params(params, qcfg)
                out[(scheme, skip, "quant")] = _score(ref, run(qp, qcfg), scored, media)
                if not skip:
                    ctl = _sign_control(params, qp, scheme, n_ins, 2)
                    out[(scheme, skip, "control")] = _score(ref, run(ctl, cfg), scored, media)
        for key, row in out.items():
            if isinstance(key, tuple):
                print(f"\n{key[0]} skip={key[1]!s:11s} {key[2]:7s} {_fmt(row)}", end="")
        print()
    finally:
        backend.BACKEND_TUNING["cpu"].update(default)
        M._forward_fn.cache_clear()
    return out


@pytest.mark.slow
def test_the_float_model_is_decided_and_keeps_its_outliers(measured):
    """The harness: training made the model decided (median top-1 margin > 1 logit std on every prompt, from < 0.5
    at init), it names the class of every held-out image and video (the vision tower is in use), and its outliers
    are still there (weights: largest input-channel RMS > 4x the median one; RMSNorm gains: max > 8x the median)."""
    assert max(measured["margin_before"].values()) < 0.5, measured["margin_before"]
    assert min(measured["margin_after"].values()) > 1.0, measured["margin_after"]
    assert measured["named"].size == 7 and measured["named"].all(), measured["named"]
    o = measured["outliers_after"]
    assert o["row rms max/median"] > 4 and o["norm gain max/median"] > 8, o


@pytest.mark.slow
@pytest.mark.parametrize("skip", [(), ("vision",)], ids=["all", "vision-float"])
def test_int8_meets_the_issue_bars(measured, skip):
    """int8: top-1 agreement >= 99% and mean KL(float || int8) <= 1e-3 on each of text, image and video."""
    row = measured[("int8", skip, "quant")]
    for k in PROMPTS:
        assert row[k][0] >= 99.0 and row[k][1] <= 1e-3, f"{k}: {_fmt(row)}"


@pytest.mark.slow
@pytest.mark.parametrize("skip", [(), ("vision",)], ids=["all", "vision-float"])
def test_int4_meets_the_issue_bar(measured, skip):
    """int4 in groups of 128 along the input axis: top-1 agreement >= 95% on each of text, image and video."""
    row = measured[("int4", skip, "quant")]
    for k in PROMPTS:
        assert row[k][0] >= 95.0, f"{k}: {_fmt(row)}"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_loses_what_its_step_sizes_imply(measured, scheme):
    """KL(quant) within 1.5x of the sign-randomized control's (every Dense quantized): the quantization error is no
    worse than random errors of the same magnitudes."""
    q, c = measured[(scheme, (), "quant")], measured[(scheme, (), "control")]
    assert q["all"][1] <= 1.5 * c["all"][1], f"quant {_fmt(q)}; control {_fmt(c)}"
