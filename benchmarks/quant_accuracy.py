"""Weight-only int8 / int4 quantization: whole-model accuracy against the float model, and the weight bytes, for
each `quant_skip` variant (issue 13; the figures behind the default quant_skip=("vision",)).

The "small" config (benchmarks/common.py) with realistic random weights: every matrix N(0, 0.02) with a few outlier
input channels (`--outlier-frac` of each kernel's input channels scaled by `--outlier-scale`), embeddings and biases
N(0, 0.02), norm scales 1. Three teacher-forced prompts (text, one image, one two-frame video) are run through the
float model and through each quantized variant; every position's next-token distribution is compared:
  agreement  top-1 of the quantized model == top-1 of the float model, % of scored positions
  KL         mean over positions of KL(float || quant), nats
  margin     (float model) median top-1 minus top-2 logit, in units of the logit standard deviation: how decided
             the float model is; random weights give near-uniform, barely decided predictions
Quantized Dense layers run as `--matmul` ("dequant": the TPU/GPU form, float activations; "int8_dot": the CPU
default, activations quantized per row too).
Bytes: the params as stored on a TPU (float leaves bf16, int8 codes 1 B, int4 codes 0.5 B packed, fp32 scales), for
the small config and for GLM-4.1V-9B's shapes (abstract_params: no weights).

    python benchmarks/quant_accuracy.py [--group 64] [--outlier-scale 10] [--outlier-frac 0.015] [--matmul dequant]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
from common import print_table, setup, small_config

SKIPS: tuple[tuple[str, ...], ...] = ((), ("lm_head",), ("vision",), ("lm_head", "vision"))
STORED_BYTES = {"int8": 1.0, "int4": 0.5}  # per code; float leaves are counted at bf16 (2 B), scales at fp32


def realistic_params(cfg: Any, seed: int, outlier_scale: float, outlier_frac: float) -> Any:
    """A float params tree for `cfg` (kernel_layout "in_out"): N(0, 0.02) everywhere, norm scales 1, and in every
    quantizable kernel `outlier_frac` of its input channels (rows of the (inputs, outputs) view) times
    `outlier_scale`."""
    from flax import traverse_util

    from glm41v_jax.model import abstract_params
    from glm41v_jax.sharding import unbox

    assert cfg.runtime.kernel_layout == "in_out" and cfg.runtime.quantize == "none"
    flat = traverse_util.flatten_dict(unbox(abstract_params(cfg)))
    int8 = traverse_util.flatten_dict(unbox(abstract_params(cfg.with_runtime(quantize="int8", quant_skip=()))))
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf in flat.items():
        shape = tuple(leaf.shape)
        if key[-1] == "scale":  # RMSNorm / LayerNorm scales
            out[key] = np.ones(shape, np.float32)
            continue
        w = rng.normal(0.0, 0.02, shape).astype(np.float32)
        scale_key = (*key[:-1], "scale")
        if key[-1] == "kernel" and scale_key in int8:  # a kernel the quantizer may touch: (inputs..., outputs...)
            n_in = len(shape) - len(int8[scale_key].shape)
            rows = w.reshape(int(np.prod(shape[:n_in])), -1)
            k = max(1, round(outlier_frac * rows.shape[0]))
            rows[rng.choice(rows.shape[0], k, replace=False)] *= outlier_scale
        out[key] = w
    return traverse_util.unflatten_dict(out)


def prompts(cfg: Any, seed: int, n_text: int) -> dict[str, dict[str, np.ndarray]]:
    """Teacher-forced inputs (chat-less token streams of random text ids): "text" (n_text tokens), "image" (a
    16x16-patch image, 64 tokens, between text) and "video" (two temporal groups of 8x8 patches, 16 tokens each)."""
    from glm41v_jax.inputs import mm_token_types

    rng = np.random.default_rng(seed)
    patch_dim = cfg.vision.patch_dim
    m2 = cfg.vision.spatial_merge_size**2
    reserved = {cfg.image_token_id, cfg.video_token_id, cfg.image_start_token_id, cfg.image_end_token_id,
                cfg.video_start_token_id, cfg.video_end_token_id}
    hi = min(reserved)  # text ids below every media id

    def text(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, hi, n)]

    def image(t: int, h: int, w: int) -> list[int]:
        return [cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.image_end_token_id]

    out: dict[str, dict[str, Any]] = {"text": {"input_ids": text(n_text)}}
    g = (1, 16, 16)
    out["image"] = {"input_ids": text(16) + image(*g) + text(n_text - 16),
                    "pixel_values": rng.standard_normal((int(np.prod(g)), patch_dim)).astype(np.float32),
                    "image_grid_thw": np.asarray([g], np.int64)}
    g = (2, 8, 8)
    ids = text(8) + [cfg.video_start_token_id]
    for _ in range(g[0]):
        ids += image(1, g[1], g[2]) + text(2)
    out["video"] = {"input_ids": ids + [cfg.video_end_token_id] + text(n_text - 8),
                    "pixel_values_videos": rng.standard_normal((int(np.prod(g)), patch_dim)).astype(np.float32),
                    "video_grid_thw": np.asarray([g], np.int64)}
    for d in out.values():
        d["input_ids"] = np.asarray([d["input_ids"]], np.int64)
        d["attention_mask"] = np.ones_like(d["input_ids"])
        d["mm_token_type_ids"] = mm_token_types(d["input_ids"], cfg)
    return out


def margin(logits: np.ndarray) -> float:
    """Median (top-1 - top-2 logit) / logit std over positions."""
    top = np.sort(logits, -1)[:, -2:]
    return float(np.median((top[:, 1] - top[:, 0]) / logits.std(-1)))


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import jax

    from glm41v_jax import backend
    from glm41v_jax import model as M
    from glm41v_jax import quant as Q
    from glm41v_jax.config import GLM41V_9B, Glm4vConfig

    backend.BACKEND_TUNING["cpu"].update(quant_matmul=args.matmul, quant_matmul_int4=args.matmul)
    cfg = Glm4vConfig.from_hf(small_config(), kernel_layout="in_out")
    t0 = time.perf_counter()
    params = realistic_params(cfg, 0, args.outlier_scale, args.outlier_frac)
    inputs = prompts(cfg, 1, args.tokens)
    ref = {k: np.asarray(M.forward(params, cfg, **a))[0] for k, a in inputs.items()}
    info = {"scored": {k: v.shape[0] for k, v in ref.items()}, "margin": {k: margin(v) for k, v in ref.items()},
            "float_small": _bytes(cfg), "float_9b": _bytes(GLM41V_9B)}
    print(f"float model: {time.perf_counter() - t0:.0f} s; scored positions {info['scored']}; median margin "
          f"{ {k: round(v, 3) for k, v in info['margin'].items()} }", flush=True)
    rows = []
    for scheme in ("int8", "int4"):
        for skip in SKIPS:
            qcfg = cfg.with_runtime(quantize=scheme, quant_group_size=args.group, quant_skip=skip)
            qp = Q.quantize_params(params, qcfg)
            row: dict[str, Any] = {"scheme": scheme, "skip": "(" + ", ".join(skip) + ")" if skip else "()"}
            agree, kls = [], []
            for k, a in inputs.items():
                ag, kl = Q.logit_agreement(ref[k], np.asarray(M.forward(qp, qcfg, **a))[0])
                row[f"agree_{k}"], row[f"kl_{k}"] = 100 * ag.mean(), kl.mean()
                agree.append(ag)
                kls.append(kl)
            row["agree"] = 100 * np.concatenate(agree).mean()
            row["kl"] = np.concatenate(kls).mean()
            row["gb_small"] = _bytes(qcfg) / 1e9
            row["gb_9b"] = _bytes(GLM41V_9B.with_runtime(quantize=scheme, quant_skip=skip)) / 1e9  # groups of 128
            rows.append(row)
            del qp
            jax.clear_caches()
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
    ap.add_argument("--group", type=int, default=64,
                    help="int4 group size of the small config (its head_dim is 64; the 9B's bytes use 128)")
    ap.add_argument("--outlier-scale", type=float, default=10.0)
    ap.add_argument("--outlier-frac", type=float, default=0.015)
    ap.add_argument("--tokens", type=int, default=256, help="text tokens per prompt")
    ap.add_argument("--matmul", choices=("dequant", "int8_dot"), default="dequant")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    setup(args.threads)
    import jax

    rows, info = measure(args)
    print(f"\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), fp32 activations, "
          f"matmul {args.matmul!r}, int4 group {args.group}, outliers: {args.outlier_frac:.1%} of input channels "
          f"x{args.outlier_scale:g}; scored positions {info['scored']} (total {sum(info['scored'].values())}); "
          f"float model's median top-1 margin / logit std { {k: round(v, 3) for k, v in info['margin'].items()} }")
    print(f"float (bf16) bytes: small {info['float_small'] / 1e9:.3f} GB, 9B {info['float_9b'] / 1e9:.2f} GB")
    print_table([("scheme", "{scheme}"), ("quant_skip", "{skip}"), ("agree text", "{agree_text:.1f}%"),
                 ("image", "{agree_image:.1f}%"), ("video", "{agree_video:.1f}%"), ("agree all", "{agree:.1f}%"),
                 ("KL text", "{kl_text:.1e}"), ("image", "{kl_image:.1e}"), ("video", "{kl_video:.1e}"),
                 ("KL all", "{kl:.1e}"), ("small GB", "{gb_small:.3f}"), ("9B GB", "{gb_9b:.2f}")], rows, left=2)


if __name__ == "__main__":
    main()
