"""Weight-only int8 / int4 quantization: whole-model accuracy against the float model on a DECIDED (trained) tiny
model, for each weight variant and `quant_skip` variant, and the weight bytes (issue 13; the figures behind the
default quant_skip=("vision",)).

The model and its training are glm41v_jax/tiny_trained.py's, shared with tests/test_quant_accuracy.py: the tiny
config (text hidden 256, head_dim 128, MLP 512, 4 layers, vocab 256; vision hidden 128, depth 2), trained on CPU for
`--steps` Adam steps on a synthetic language (each token's preferred successor with p 0.85; each image's or video's
class named right after it) from a realistic init, one model per weight variant:
  realistic  N(0, 0.02) plus a fixed few outliers: 2 hidden dims with RMSNorm gain 10 in front of the decoder's
             projections (activation outliers), 2 input channels of every quantizable kernel x10 (weight outliers)
  none       N(0, 0.02), no outliers
  stress     N(0, 0.02) with x10 on 1.5% of every quantizable kernel's input channels (the old harsh case)
Three held-out teacher-forced prompts of `--tokens` ids (text; four images; three two-frame videos) through the float
model and each quantized variant; every position whose next token is text is scored:
  agreement  top-1 of the quantized model == top-1 of the float model, % of scored positions
  KL         mean over positions of KL(float || quant), nats
  media      the positions that name an image's or video's class (they read the vision tower's output)
  margin     (float model) median (top-1 - top-2 logit) / logit std: how decided the model is
Quantized Dense layers run as `--matmul` ("dequant": the TPU/GPU form, float activations; "int8_dot": the CPU
default, activations quantized per row too). int4 in groups of `--group` (128, the issue's).
Bytes: the params as stored on a TPU (float leaves bf16, int8 codes 1 B, int4 codes 0.5 B packed, fp32 scales), for
the tiny config and for GLM-4.1V-9B's shapes (abstract_params: no weights).

The "small" config (benchmarks/common.py: vocab 151552, hidden 1024, 8 layers) is not used: training it to a decided
state does not fit a CPU benchmark run.

    python benchmarks/quant_accuracy.py [--steps 100] [--tokens 512] [--group 128] [--matmul dequant]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
from common import print_table, setup

SKIPS: tuple[tuple[str, ...], ...] = ((), ("lm_head",), ("vision",), ("lm_head", "vision"))
STORED_BYTES = {"int8": 1.0, "int4": 0.5}  # per code; float leaves are counted at bf16 (2 B), scales at fp32
PROMPTS = ("text", "image", "video")


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from glm41v_jax import backend
    from glm41v_jax import model as M
    from glm41v_jax import quant as Q
    from glm41v_jax import tiny_trained as TT
    from glm41v_jax.config import GLM41V_9B

    backend.BACKEND_TUNING["cpu"].update(quant_matmul=args.matmul, quant_matmul_int4=args.matmul)
    cfg = TT.config()
    lang = TT.Language(cfg)
    inputs = lang.prompts(length=args.tokens)
    scored = {k: lang.labelled(a["input_ids"])[0] for k, a in inputs.items()}
    ends = [cfg.image_end_token_id, cfg.video_end_token_id]
    media = {}
    for k, a in inputs.items():
        i = a["input_ids"][0]
        media[k] = np.append(np.isin(i[:-1], ends) & np.isin(i[1:], lang.class_tokens), False)
    info: dict[str, Any] = {"scored": {k: int(v.sum()) for k, v in scored.items()},
                            "media": sum(int(v.sum()) for v in media.values()),
                            "float_small": _bytes(cfg), "float_9b": _bytes(GLM41V_9B)}
    variants = {"realistic": TT.Outliers(), "none": TT.Outliers.none(), "stress": TT.Outliers.stress()}
    rows = []
    for name, outliers in variants.items():
        t0 = time.perf_counter()
        p0 = TT.init_params(cfg, 0, outliers)
        before = TT.outlier_report(p0, cfg)
        params, losses = TT.train(p0, cfg, lang, steps=args.steps)
        ref = {k: np.asarray(M.forward(params, cfg, **a))[0] for k, a in inputs.items()}
        after = TT.outlier_report(params, cfg)
        named = np.concatenate([ref[k].argmax(-1)[:-1][media[k][:-1]] == a["input_ids"][0][1:][media[k][:-1]]
                                for k, a in inputs.items()])
        info[name] = {"loss": (losses[0], losses[-1]), "named": f"{named.sum()}/{named.size}",
                      "margin": {k: round(float(np.median(TT.margins(ref[k][scored[k]]))), 2) for k in PROMPTS},
                      "before": {k: round(v, 2) for k, v in before.items()},
                      "after": {k: round(v, 2) for k, v in after.items()}, "train_s": time.perf_counter() - t0}
        print(f"{name} ({outliers.describe()}): {info[name]}", flush=True)
        for scheme in ("int8", "int4"):
            for skip in SKIPS:
                qcfg = cfg.with_runtime(quantize=scheme, quant_group_size=args.group, quant_skip=skip)
                qp = Q.quantize_params(params, qcfg)
                row: dict[str, Any] = {"weights": name, "scheme": scheme,
                                       "skip": "(" + ", ".join(skip) + ")" if skip else "()"}
                agree, kls, mag, mkl = [], [], [], []
                for k, a in inputs.items():
                    ag, kl = Q.logit_agreement(ref[k], np.asarray(M.forward(qp, qcfg, **a))[0])
                    row[f"agree_{k}"], row[f"kl_{k}"] = 100 * ag[scored[k]].mean(), kl[scored[k]].mean()
                    agree.append(ag[scored[k]])
                    kls.append(kl[scored[k]])
                    mag.append(ag[media[k]])
                    mkl.append(kl[media[k]])
                row["agree"], row["kl"] = 100 * np.concatenate(agree).mean(), np.concatenate(kls).mean()
                row["agree_media"], row["kl_media"] = 100 * np.concatenate(mag).mean(), np.concatenate(mkl).mean()
                row["gb_small"] = _bytes(qcfg) / 1e9
                row["gb_9b"] = _bytes(GLM41V_9B.with_runtime(quantize=scheme, quant_skip=skip)) / 1e9
                rows.append(row)
                del qp
                print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows, info


def _bytes(cfg: Any) -> float:
    """Params bytes as a TPU stores them: bf16 float leaves except the fp32 scales, 1 B int8 and 0.5 B int4 codes."""
    from flax import traverse_util

    from glm41v_jax.model import abstract_params
    from glm41v_jax.sharding import unbox

    total = 0.0
    flat = traverse_util.flatten_dict(unbox(abstract_params(cfg)))
    quantized = {k[:-1] for k, v in flat.items() if k[-1] == "kernel" and str(v.dtype) in STORED_BYTES}
    for key, leaf in flat.items():
        n = int(np.prod(leaf.shape))
        if str(leaf.dtype) in STORED_BYTES:
            total += n * STORED_BYTES[str(leaf.dtype)]
        elif key[-1] == "scale" and key[:-1] in quantized:
            total += n * 4.0
        else:
            total += n * 2.0
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="training steps per weight variant")
    ap.add_argument("--group", type=int, default=128, help="int4 group size (the issue's 128)")
    ap.add_argument("--tokens", type=int, default=512, help="ids per held-out prompt")
    ap.add_argument("--matmul", choices=("dequant", "int8_dot"), default="dequant")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    setup(args.threads)
    import jax

    t0 = time.perf_counter()
    rows, info = measure(args)
    print(f"\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), fp32 activations, "
          f"matmul {args.matmul!r}, int4 group {args.group}, {args.steps} training steps per weight variant; scored "
          f"positions {info['scored']} (total {sum(info['scored'].values())}), {info['media']} of them name a "
          f"media's class; {time.perf_counter() - t0:.0f} s")
    for name in ("realistic", "none", "stress"):
        print(f"{name}: {info[name]}")
    print(f"float (bf16) bytes: tiny {info['float_small'] / 1e6:.2f} MB, 9B {info['float_9b'] / 1e9:.2f} GB")
    print_table([("weights", "{weights}"), ("scheme", "{scheme}"), ("quant_skip", "{skip}"),
                 ("agree text", "{agree_text:.2f}%"), ("image", "{agree_image:.2f}%"), ("video", "{agree_video:.2f}%"),
                 ("media", "{agree_media:.0f}%"), ("KL text", "{kl_text:.1e}"), ("image", "{kl_image:.1e}"),
                 ("video", "{kl_video:.1e}"), ("media", "{kl_media:.1e}"), ("tiny MB", "{gb_small:.3f}"),
                 ("9B GB", "{gb_9b:.2f}")], [{**r, "gb_small": r["gb_small"] * 1e3} for r in rows], left=3)


if __name__ == "__main__":
    main()
