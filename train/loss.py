"""The SFT loss: token-weighted cross-entropy over packed rows, without materialising (B, T, V) logits.

Label convention (HF): `labels` (B, T) are aligned with `input_ids`; the logits at position t predict `labels[t+1]`;
-100 is ignored. The shift happens here, and never crosses a segment boundary: the target of position t is
`labels[t+1]` only when `segment_ids[t+1] == segment_ids[t] != 0` (so the last token of one packed sample never
predicts the first token of the next). On an unpacked row this is exactly HF's `ForCausalLMLoss`.

`loss_and_count(params, batch, cfg)` returns (sum of per-token losses, number of label tokens), both fp32 scalars,
so that any mean is token-weighted: training divides the gradient of the sum by the count of the whole accumulated
global batch; evaluation (`glm41v loss`) adds sums and counts over a file.

Memory and work: the output head runs over the label rows only. The B * T positions are flattened, the rows that
carry a label are moved to the front (a stable argsort), and the head runs over chunks of `chunk_size` rows in a
while loop that stops after the last chunk holding a label row. So at most (chunk, V) fp32 logits exist at a time,
and an SFT batch whose labels are a fraction of its tokens (answers after long prompts and images) pays the head's
three vocab-sized matmuls for that fraction only. With vocab 151552 the full (B, T, V) fp32 logits would be
0.6 MB per token (2.4 GB for B*T = 4096). Under differentiation the head is a fused "linear cross-entropy"
(`head_cross_entropy`, a custom VJP): the forward pass computes each chunk's logits once and, when the head is
being differentiated, already forms d(loss)/dh and accumulates d(loss)/dW from that chunk's softmax; the backward
pass only scales them by the incoming cotangent. Cost: the same three head matmuls as plain autodiff (logits, dh,
dW) with no logits recompute, and residuals of one (B, T, D) hidden-size array plus one head-size fp32 array (the
head's gradient, which autodiff produces anyway). When the head is frozen (not perturbed) dW is skipped.

Axis legend: B batch rows, T tokens, C chunk of label rows, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from glm41v_jax.config import Glm4vConfig
from glm41v_jax.model import Glm4v

IGNORE_INDEX = -100  # a label that carries no loss (HF's ignore_index); the one definition in the package
# Label rows per head chunk. TPU configs set 512-1024 (bigger matmuls, a little more waste). Not 64 or less on
# XLA:CPU: there the (C, V) x (V, D) product of d(hidden) falls onto a slow path that costs as much for any C <= 64
# as for 128 rows (figures: BENCHMARKS.md, "Training").
DEFAULT_CHUNK = 128


def shift_targets(labels: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T) labels, segment ids -> targets (B, T) int32 (the label position t predicts) and fp32 weights (1 = a
    label token, 0 = none: ignored label, segment boundary, padding, or the last position)."""
    nxt = labels[:, 1:]
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    valid = same & (nxt != IGNORE_INDEX)
    pad = jnp.zeros_like(valid[:, :1])
    valid = jnp.concatenate([valid, pad], axis=1)
    targets = jnp.concatenate([jnp.where(valid[:, :-1], nxt, 0), jnp.zeros_like(labels[:, :1])], axis=1)
    return targets.astype(jnp.int32), valid.astype(jnp.float32)


def label_count(labels: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Number of label tokens (fp32 scalar) under the shift rule; works on any leading axes (..., T)."""
    t = labels.shape[-1]
    _, w = shift_targets(labels.reshape(-1, t), segment_ids.reshape(-1, t))
    return w.sum()


def head_kernel(params: Mapping[str, Any], cfg: Glm4vConfig) -> tuple[jax.Array, bool]:
    """The output projection and its layout: lm_head (D, V), or the tied embedding (V, D) (`vocab_major`). A
    quantized lm_head (a QLoRA base) is dequantized to the compute dtype (codes * scale, as layers.Dense does)."""
    if cfg.tie_word_embeddings:
        return params["language_model"]["embed_tokens"]["embedding"], True
    head = params["lm_head"]
    if "scale" not in head:
        return head["kernel"], False
    codes, scale = head["kernel"], head["scale"]
    w = codes.astype(jnp.float32) * (scale if codes.ndim == 2 else scale[:, None, :])  # int8 (D, V) / int4 (D/g, g, V)
    return w.reshape(-1, w.shape[-1]).astype(cfg.runtime.compute_dtype), False


# ---------------------------------------------------------------------------------------------------------------
# Chunked (fused) linear cross-entropy.


def _compact(h: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int):
    """Flatten (B, T) to rows, put the label rows first (stable), pad to whole chunks: -> h (n, C, D), targets and
    weights (n, C), `order` (B*T,) for putting per-row results back, and the number of chunks holding a label row
    (the loops below run over those only)."""
    b, t, d = h.shape
    rows = b * t
    c = min(chunk, rows)
    n = -(-rows // c)
    labelled = weights.reshape(rows) > 0
    order = jnp.argsort(~labelled, stable=True)

    def take(x: jax.Array) -> jax.Array:
        x = jnp.take(x.reshape(rows, *x.shape[2:]), order, axis=0)
        x = jnp.pad(x, [(0, n * c - rows)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n, c, *x.shape[1:])

    live = (jnp.sum(labelled, dtype=jnp.int32) + c - 1) // c
    return take(h), take(targets), take(weights), order, live


def _restore(x: jax.Array, order: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(n, C, ...) per compacted row -> (B, T, ...) in the original positions."""
    rows = shape[0] * shape[1]
    x = x.reshape(-1, *x.shape[2:])[:rows]
    inverse = jnp.argsort(order)
    return jnp.take(x, inverse, axis=0).reshape(*shape, *x.shape[1:])


def _logits(h: jax.Array, w: jax.Array, vocab_major: bool, dtype: Any) -> jax.Array:
    spec = "cd,vd->cv" if vocab_major else "cd,dv->cv"
    return jnp.einsum(spec, h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _chunk_loss(logits: jax.Array, tgt: jax.Array, wt: jax.Array) -> tuple[jax.Array, jax.Array]:
    lse = jax.nn.logsumexp(logits, axis=-1)
    tl = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tl) * wt), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def head_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int,
                       vocab_major: bool, dtype: Any) -> jax.Array:
    """sum_t weights[b,t] * CE(h[b,t] @ W, targets[b,t]), fp32, over the chunks of label rows (a while loop: no
    work for label-free chunks). h (B, T, D); W (D, V) or (V, D)."""
    hs, ts, ws, _, live = _compact(h, targets, weights, chunk)

    def body(i, total):
        return total + _chunk_loss(_logits(hs[i], w, vocab_major, dtype), ts[i], ws[i])[0]

    return jax.lax.fori_loop(0, live, body, jnp.zeros((), jnp.float32))


def _fwd(h, w, targets, weights, chunk, vocab_major, dtype):
    # symbolic_zeros=True: the differentiable arguments arrive as CustomVJPPrimal(value, perturbed).
    need_dw = w.perturbed
    h, w, targets, weights = h.value, w.value, targets.value, weights.value
    cd = jnp.dtype(dtype)
    hs, ts, ws, order, live = _compact(h, targets, weights, chunk)

    def body(i, carry):
        total, dh, dw = carry
        hc, tc, wc = hs[i], ts[i], ws[i]
        logits = _logits(hc, w, vocab_major, cd)  # (C, V) fp32
        s, lse = _chunk_loss(logits, tc, wc)
        # d(sum)/d(logits) = (softmax - onehot(target)) * weight, without materialising the one-hot.
        p = jnp.exp(logits - lse[..., None])
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tc[..., None]
        g = (jnp.where(hit, p - 1.0, p) * wc[..., None]).astype(cd)
        dhc = jnp.einsum("cv,vd->cd" if vocab_major else "cv,dv->cd", g, w.astype(cd),
                         preferred_element_type=jnp.float32).astype(h.dtype)
        dh = jax.lax.dynamic_update_index_in_dim(dh, dhc, i, 0)
        if need_dw:
            spec = "cv,cd->vd" if vocab_major else "cd,cv->dv"
            args = (g, hc.astype(cd)) if vocab_major else (hc.astype(cd), g)
            dwc = jnp.einsum(spec, *args, preferred_element_type=jnp.float32)
            dw = dwc if dw is None else dw + dwc
        return total + s, dh, dw

    # Chunk 0 runs unconditionally (all-zero weights when no row has a label, so it adds nothing) and its dW is the
    # accumulator's first value: no zero-filled head-size buffer and one head-size add fewer than starting at 0.
    total, dh, dw = body(0, (jnp.zeros((), jnp.float32), jnp.zeros_like(hs), None))
    total, dh, dw = jax.lax.fori_loop(1, live, body, (total, dh, dw))
    return total, (_restore(dh, order, h.shape[:2]), None if dw is None else dw.astype(w.dtype))


def _bwd(chunk, vocab_major, dtype, res, g):
    dh, dw = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    dh = dh * g.astype(dh.dtype)
    dw = None if dw is None else (dw * g).astype(dw.dtype)
    return dh, dw, None, None


head_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------------------------
# The model loss.


def loss_and_count(params: Any, batch: Mapping[str, Any], cfg: Glm4vConfig, *, chunk_size: int = DEFAULT_CHUNK,
                   lora: Any = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of label tokens) for one batch, fp32 scalars.

    `batch`: the kwargs of `Glm4v.apply` (input_ids, positions, segment_ids, vision, vision_index) plus `labels`
    (B, T) int32 aligned with input_ids. `params` must match `cfg.runtime.scan_layers` (stacked or unrolled).
    `lora`: the adapter tree when `cfg.runtime.lora` is set (glm41v_jax/lora.py), with `dropout_rng` for the
    adapters' dropout (training; None: no dropout).
    """
    model = Glm4v(cfg)
    vision = batch.get("vision")
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    with jax.named_scope("model"):
        h = model.apply(variables, rngs=rngs, input_ids=batch["input_ids"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], vision=vision,
                        vision_index=batch.get("vision_index") if vision is not None else None, return_hidden=True)
    targets, weights = shift_targets(batch["labels"], batch["segment_ids"])
    kernel, vocab_major = head_kernel(params, cfg)
    with jax.named_scope("head_cross_entropy"):
        total = head_cross_entropy(h, kernel, targets, weights, int(chunk_size), vocab_major,
                                   jnp.dtype(cfg.runtime.compute_dtype).name)
    return total, weights.sum()
