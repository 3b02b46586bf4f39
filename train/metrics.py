"""Training metrics: model FLOPs, device peaks and MFU; the metrics.jsonl / TensorBoard / progress-bar writer.

Model FLOPs of one step (what the model needs, not what the hardware ran: no remat recompute, no padding, no
masked-out attention), from the batch actually trained on:

    forward, per group, summed over the real (non-padding) tokens and patches
      decoder    2 * N_dec * tokens  +  2 * L * H * dh * sum over segments of s*(s+1)   (causal: half of s x s)
      vision     2 * N_vis * patches +  4 * L_v * H_v * dh_v * sum over frames of n^2   (bidirectional n x n)
      projector  2 * N_proj * patches / merge^2                                        (per merged token)
    training = forward * (1 + activation grads + weight grads): 3x for a trained group, 2x for a frozen group that
    still passes gradients back to a trained one upstream (vision -> projector -> decoder), 1x otherwise.
    LoRA (`LoraTrainStep.flop_counter`, weight_grads=False): the base's weights get no gradient, so a group with
    adapters counts 2x (forward + activation grads: 4 N per token for the decoder), as does a frozen group after it,
    and a group before the first adapters 1x; the adapters' own matmuls (r (in + out) weights against in x out: 0.3%
    of the 9B decoder's at r = 8) are left out. `glm41v plan` reports the same figure.

N counts the matmul weights (`kernel` leaves, and the embedding when it is the tied output head); lookups (token
embedding, vision position table), norms and biases are left out. For a dense decoder this is the usual
6 * N * tokens + attention.

MFU = model FLOP/s per device / the device's peak dense bf16 FLOP/s (`PEAK_BF16_TFLOPS`, by `device_kind`). A device
that is not in the table (CPU, unknown GPUs) has no peak: MFU is null (TFLOP/s are still reported).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from glm41v_jax.weights import key_names

from .optim import group_of

logger = logging.getLogger("glm41v_train.metrics")

# Dense bf16 peak TFLOP/s per jax device (one TPU chip; one GPU). Matched against the lower-cased device_kind in
# order, first hit wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("v6 lite", "TPU v6e (Trillium)", 918.0),
    ("v6e", "TPU v6e (Trillium)", 918.0),
    ("v5 lite", "TPU v5e", 197.0),
    ("v5e", "TPU v5e", 197.0),
    ("v5p", "TPU v5p", 459.0),
    ("tpu v5", "TPU v5p", 459.0),
    ("tpu v4", "TPU v4", 275.0),
    ("h200", "NVIDIA H200", 989.0),
    ("h100 pcie", "NVIDIA H100 PCIe", 756.0),
    ("h100", "NVIDIA H100 SXM", 989.0),
    ("a100", "NVIDIA A100", 312.0),
)


def device_peak_tflops(device_kind: str) -> tuple[str, float] | None:
    """(name, peak dense bf16 TFLOP/s) for a jax `device_kind`, or None when unknown (CPU, other GPUs)."""
    kind = device_kind.lower()
    for key, name, peak in PEAK_BF16_TFLOPS:
        if key in kind:
            return name, peak
    return None


# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs.


class FlopCounter:
    """Model FLOPs of a training step from host-side batch statistics (module docstring)."""

    def __init__(self, cfg: Any, abstract_params: Any, freeze: Sequence[str] = (), weight_grads: bool = True
                 ) -> None:
        """`freeze`: the groups with nothing to train; `weight_grads=False` (LoRA: the base's weights get no
        gradient, the adapters' matmuls are negligible) counts a trained group's backward as the input gradients
        only (forward + 1x instead of + 2x)."""
        n = {"vision": 0, "projector": 0, "decoder": 0}
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
            names = key_names(path)
            tied_head = cfg.tie_word_embeddings and names[-2:] == ("embed_tokens", "embedding")
            if names[-1] == "kernel" or tied_head:
                n[group_of(names)] += int(np.prod(leaf.shape))
        self.n_params = n
        t, v = cfg.text, cfg.vision
        self.m2 = v.spatial_merge_size ** 2
        self.dec_attn = 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim  # x sum s(s+1)
        self.vis_attn = 4 * v.depth * v.hidden_size  # x sum n^2 (H_v * dh_v = hidden)
        train = {g: g not in freeze for g in n}
        upstream = False
        self.mult = {}
        for g in ("vision", "projector", "decoder"):
            self.mult[g] = 1 + (train[g] or upstream) + (train[g] and weight_grads)
            upstream = upstream or train[g]

    @staticmethod
    def batch_stats(batch: Mapping[str, Any]) -> dict[str, float]:
        """Token / segment / patch statistics of a host batch (NumPy; any leading micro-batch axis)."""
        seg = np.asarray(batch["segment_ids"])
        seg = seg.reshape(-1, seg.shape[-1])
        tokens, s2 = 0, 0
        for row in seg:
            lengths = np.bincount(row)[1:].astype(np.float64)
            tokens += lengths.sum()
            s2 += (lengths * (lengths + 1)).sum()
        vis = batch.get("vision")
        patches, n2 = 0.0, 0.0
        if vis is not None:
            vseg = np.asarray(vis.segment_ids)
            vseg = vseg.reshape(-1, vseg.shape[-1])
            for row in vseg:
                frames = np.bincount(row)[1:].astype(np.float64)
                patches += frames.sum()
                n2 += (frames ** 2).sum()
        return {"tokens": float(tokens), "attn_s2": float(s2), "patches": float(patches), "frame_n2": float(n2),
                "slots": float(seg.size)}

    def step_flops(self, stats: Mapping[str, float]) -> float:
        n, mult = self.n_params, self.mult
        dec = 2.0 * n["decoder"] * stats["tokens"] + self.dec_attn * stats["attn_s2"]
        vis = 2.0 * n["vision"] * stats["patches"] + self.vis_attn * stats["frame_n2"]
        proj = 2.0 * n["projector"] * stats["patches"] / self.m2
        return mult["decoder"] * dec + mult["vision"] * vis + mult["projector"] * proj


# ---------------------------------------------------------------------------------------------------------------
# The writer (process 0 only).


def _clean(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop the lines of a per-step JSONL log past `last_step` (written before a crash, after the checkpoint now
    restored), and lines that are not whole JSON objects (one cut by a kill). Replaced atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
                keep.append(ln if ln.endswith("\n") else ln + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class MetricsWriter:
    """Appends one JSON line per step to metrics.jsonl, scalars to TensorBoard event files, and shows a tqdm bar.

    `start_step`: lines of a previous run past this step (logged before a crash, after the checkpoint now
    restored) are dropped, so the file holds the trajectory of the run as it continues."""

    def __init__(self, output_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional (the train extra): without it, no event files
            except ImportError:
                logger.warning("tensorboardX is not installed: no TensorBoard event files "
                               "(pip install 'glm41v-jax[train]')")
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        for rec in records:
            rec = {k: _clean(v) for k, v in rec.items()}
            self._file.write(json.dumps(rec) + "\n")
            if self._tb is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"{'eval' if k.startswith('eval_') else 'train'}/{k}", v, rec["step"])
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._bar is not None:
            last = records[-1]
            self._bar.update(last["step"] - self._bar.n)
            post = {"loss": f"{last['loss']:.4f}"} if last.get("loss") is not None else {}
            if last.get("lr") is not None:
                post["lr"] = f"{last['lr']:.2e}"
            if last.get("tokens_per_s") is not None:
                post["tok/s"] = f"{last['tokens_per_s']:.0f}"
            if last.get("mfu") is not None:
                post["mfu"] = f"{100 * last['mfu']:.1f}%"
            self._bar.set_postfix(post, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
