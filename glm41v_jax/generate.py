"""Autoregressive generation: one compiled prefill program, one compiled decode program, a KV cache on device.

Prefill: the whole prompt (vision tower + decoder) writes slots [0, T) of a zeroed KV cache of `max_len` slots and
samples the first token from the logits of the last prompt slot only. Prompts are left-padded to a length bucket
(`bucket_length`), vision patches are padded to a bucket too (`vision_bucket`), the cache length is rounded and a
batch can be padded to a fixed number of rows, so requests of similar size reuse one executable.

Decode: a compiled `lax.while_loop` that runs up to `chunk_size` steps on device (stopping early once every row is
done: it emitted an eos id or reached its own token limit) and hands the chunk's tokens back to the host for
streaming. The host dispatches the next chunk before reading the previous one, so the device never waits on the
host. The cache and the loop state are donated to each call (updated in place).

Thinking budget (`max_thinking_tokens`): inside the compiled loop each row counts the tokens it generates while its
`<think>` block is open; once the budget is spent, the next tokens are forced to `think_end_ids` (the ids of
`</think><answer>`), after which the model writes its answer. Rows whose prompt already closed the block (the
`--no-thinking` prefill `<think></think>`) are never forced.

Positions (docs/MODEL.md §4.5): generated token number i (0-based) of row b sits in cache slot T + i - 1 ... and
has M-RoPE position n_b + i + rope_delta_b on all three rows, where n_b counts the row's *real* prompt tokens
(left padding makes slots and real-token counts differ). Padding slots have kv segment 0 and are never attended.

Mesh: with `Engine(mesh=...)` the params live in their `NamedSharding`s (sharding.LOGICAL_RULES), the KV cache is
sharded by the same table (logical axes batch, length, kv_heads, head_dim; 2 KV heads on tensor > 2 are replicated
across the tensor shards, see sharding.py), per-row arrays are sharded over the batch axes when the batch divides
them, and both programs are compiled with these explicit in/out shardings.

Executables are compiled ahead of time (`jit(...).lower(...).compile()`) and cached by their static choices and
argument shapes, which gives exact compile counts (`Engine.num_compiles`), compile times separate from run times,
and one log line per compile (logger "glm41v_jax.generate", naming the shape key).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import KERNEL_LAYOUTS, Glm4vConfig, backend_default
from .errors import Glm41vError
from .model import Glm4v, abstract_params, init_cache, prepare_inputs, to_kernel_layout
from .sampling import SamplingParams, sample_tokens
from .sharding import under_mesh

log = logging.getLogger(__name__)

MAX_EOS = 8  # eos ids are passed as a fixed-size array (padded with -1) so that changing them never recompiles
MAX_FORCED = 8  # at most this many forced ids close a thinking block


class GenerationError(Glm41vError, ValueError):
    """A request that cannot be served (too long for the context, bad arguments, ...). The message says why."""


@dataclasses.dataclass
class GenerationResult:
    """One generated sequence. `token_ids` includes the stopping eos id, if one was produced (as HF does)."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    timings: dict[str, float]
    num_compiles: int


# ---------------------------------------------------------------------------------------------------------------
# Buckets.


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def bucket_length(n: int, minimum: int = 32) -> int:
    """Prompt-length bucket: powers of two from `minimum` to 256, then multiples of 64 to 2048, of 256 to 8192,
    then of 1024. Padding stays under 25% above 256 tokens (prefill cost is linear in the bucket), with at most
    ~56 buckets up to 8192 tokens."""
    n = max(int(n), 1)
    if n > 8192:
        return _round_up(n, 1024)
    if n > 2048:
        return _round_up(n, 256)
    if n > 256:
        return _round_up(n, 64)
    b = minimum
    while b < n:
        b *= 2
    return b


def vision_bucket(n: int, multiple: int = 4, minimum: int = 64) -> int:
    """Packed-patch bucket: powers of two from `minimum` to 4096, then multiples of 2048 (all multiples of 4)."""
    if n > 4096:
        return _round_up(n, max(2048, multiple))
    b = minimum
    while b < n:
        b *= 2
    return _round_up(b, multiple)


def cache_length(prompt_bucket: int, max_new_tokens: int, multiple: int = 128) -> int:
    """KV-cache slots: the prompt bucket plus room for the new tokens, rounded up."""
    return _round_up(prompt_bucket + max_new_tokens, multiple)


def kv_cache_bytes(cfg: Glm4vConfig, batch: int, max_len: int, dtype: Any = None) -> int:
    """Bytes of the KV cache for `batch` rows of `max_len` slots (keys and values, every layer)."""
    t = cfg.text
    itemsize = np.dtype(jnp.dtype(dtype or cfg.runtime.dtype)).itemsize
    return 2 * t.num_hidden_layers * batch * max_len * t.num_key_value_heads * t.head_dim * itemsize


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def read_eos_ids(checkpoint_dir: str | os.PathLike | None, cfg: Glm4vConfig) -> tuple[int, ...]:
    """generation_config.json's eos_token_id when present, else the model config's eos ids."""
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError):
                eos = None
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list) and eos and all(isinstance(e, int) for e in eos):
                return tuple(eos)
    return tuple(cfg.text.eos_token_ids)


# ---------------------------------------------------------------------------------------------------------------
# Host-side request preparation.

_HF_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(encoded: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Per-request processor outputs (one prompt each) -> one left-padded batch, media concatenated in row order.

    The result is what the processor returns for several prompts at once: the vision features of row 0's images come
    first, then row 1's, ...; videos likewise (after all images, as the model packs them).
    """
    if not encoded:
        raise GenerationError("no requests to collate")
    rows, types = [], []
    for i, enc in enumerate(encoded):
        ids = np.asarray(enc["input_ids"])
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise GenerationError(f"request {i}: expected one prompt, got input_ids of shape {ids.shape}")
        mask = np.asarray(enc.get("attention_mask", np.ones_like(ids))).reshape(ids.shape) > 0
        rows.append(ids[0][mask[0]])
        tt = enc.get("mm_token_type_ids")
        types.append(None if tt is None else np.asarray(tt).reshape(ids.shape)[0][mask[0]])
    n = max(len(r) for r in rows)
    out: dict[str, Any] = {
        "input_ids": np.full((len(rows), n), pad_token_id, np.int64),
        "attention_mask": np.zeros((len(rows), n), np.int64),
    }
    for b, r in enumerate(rows):
        out["input_ids"][b, n - len(r):] = r
        out["attention_mask"][b, n - len(r):] = 1
    if all(t is not None for t in types):
        out["mm_token_type_ids"] = np.zeros((len(rows), n), np.int64)
        for b, t in enumerate(types):
            out["mm_token_type_ids"][b, n - len(t):] = t
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [(np.asarray(e[pix]), np.asarray(e[grid])) for e in encoded if e.get(grid) is not None
                 and len(e[grid])]
        if parts:
            out[pix] = np.concatenate([p for p, _ in parts], axis=0)
            out[grid] = np.concatenate([g for _, g in parts], axis=0)
    return out


@dataclasses.dataclass
class PreparedBatch:
    """A left-padded, bucketed batch ready for the prefill program."""

    model_kwargs: dict[str, Any]  # input_ids, positions, segment_ids, vision, vision_index (NumPy)
    prompt_token_ids: list[list[int]]  # the real rows (batch padding rows excluded)
    next_positions: np.ndarray  # (B,) M-RoPE position of the first generated token
    limits: np.ndarray  # (B,) max new tokens per row (padding rows: 1)
    prompt_len: int  # T, the padded prompt length
    max_len: int  # S, cache slots


def _as_limits(max_new_tokens: int | Sequence[int], n: int) -> np.ndarray:
    if isinstance(max_new_tokens, (int, np.integer)):
        lim = np.full((n,), int(max_new_tokens), np.int64)
    else:
        lim = np.asarray(list(max_new_tokens), np.int64)
        if lim.shape != (n,):
            raise GenerationError(f"max_new_tokens: expected one int or {n} ints (one per row), got {lim.shape[0]}")
    if (lim < 1).any():
        raise GenerationError(f"max_new_tokens must be >= 1, got {int(lim.min())}")
    return lim


def prepare_batch(cfg: Glm4vConfig, inputs: Mapping[str, Any], max_new_tokens: int | Sequence[int],
                  prompt_bucket: Callable[[int], int] = bucket_length,
                  patch_bucket: Callable[[int], int] | None = vision_bucket,
                  max_context: int | None = None, pad_batch_to: int | None = None) -> PreparedBatch:
    """Processor output (input_ids, attention_mask, mm_token_type_ids, pixel_values, ...) -> PreparedBatch.

    Rows are re-laid-out left-padded (whatever padding side they came with) to `prompt_bucket(longest)`. With
    `pad_batch_to`, extra one-token rows (limit 1, no media) fill the batch to that many rows. Every limit is checked
    here, before any device work.
    """
    if "input_ids" not in inputs:
        raise GenerationError("inputs have no 'input_ids'")
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise GenerationError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask).reshape(ids.shape)
    types = inputs.get("mm_token_type_ids")
    types = None if types is None else np.asarray(types).reshape(ids.shape)
    rows = [ids[b][mask[b] > 0] for b in range(ids.shape[0])]
    if any(len(r) == 0 for r in rows):
        raise GenerationError("empty prompt (a row has no tokens)")
    limits = _as_limits(max_new_tokens, len(rows))
    limit = cfg.text.max_position_embeddings if max_context is None else int(max_context)
    for b, r in enumerate(rows):
        if len(r) + limits[b] > limit:
            raise GenerationError(f"{'prompt' if len(rows) == 1 else f'row {b}: prompt'} of {len(r)} tokens + "
                                  f"max_new_tokens {int(limits[b])} = {len(r) + int(limits[b])} is too long for the "
                                  f"context of {limit} tokens")
    n_real_rows = len(rows)
    if pad_batch_to is not None:
        if pad_batch_to < n_real_rows:
            raise GenerationError(f"batch of {n_real_rows} rows does not fit pad_batch_to={pad_batch_to}")
        filler = np.asarray([cfg.text.pad_token_id])
        rows += [filler] * (pad_batch_to - n_real_rows)
        limits = np.concatenate([limits, np.ones((pad_batch_to - n_real_rows,), np.int64)])
    longest = max(len(r) for r in rows)
    t = prompt_bucket(longest)
    bsz = len(rows)
    new_ids = np.full((bsz, t), cfg.text.pad_token_id, np.int32)
    new_mask = np.zeros((bsz, t), np.int32)
    new_types = None if types is None else np.zeros((bsz, t), np.int32)
    for b, r in enumerate(rows):
        new_ids[b, t - len(r):] = r
        new_mask[b, t - len(r):] = 1
        if types is not None and b < n_real_rows:
            new_types[b, t - len(r):] = types[b][mask[b] > 0]
    media = {k: (None if inputs.get(k) is None else np.asarray(inputs[k])) for k in _HF_KEYS}
    n_patches = sum(int(np.prod(g, axis=-1).sum()) for g in (media["image_grid_thw"], media["video_grid_thw"])
                    if g is not None)
    m2 = cfg.vision.spatial_merge_size**2
    pad_to = None
    if n_patches and patch_bucket is not None:
        pad_to = patch_bucket(n_patches)
    try:
        mi = prepare_inputs(cfg, new_ids, new_mask, new_types, media["pixel_values"], media["image_grid_thw"],
                            media["pixel_values_videos"], media["video_grid_thw"],
                            vision_pad_to=None if pad_to is None else _round_up(pad_to, m2))
    except ValueError as e:
        raise GenerationError(str(e)) from e
    n_real = new_mask.sum(-1).astype(np.int32)
    next_pos = (n_real + mi.rope_deltas).astype(np.int32)
    reach = next_pos.astype(np.int64) + limits
    if int(reach.max()) > cfg.text.max_position_embeddings:
        b = int(reach.argmax())
        raise GenerationError(f"prompt positions reach {int(next_pos[b])} + max_new_tokens {int(limits[b])} exceeds "
                              f"the model's {cfg.text.max_position_embeddings} positions")
    return PreparedBatch(mi.as_kwargs(), [r.astype(int).tolist() for r in rows[:n_real_rows]], next_pos,
                         limits.astype(np.int32), t, cache_length(t, int(limits.max())))


@dataclasses.dataclass(frozen=True)
class ThinkingBudget:
    """Close the `<think>` block after `max_tokens` thinking tokens by forcing `end_ids` (`</think><answer>`).

    `start_id` (`<think>`): a row is thinking from the `<think>` it generates (or from the start, when its prompt
    ends inside an open block). Without `start_id`, every row whose prompt did not close a block (`end_ids[0]` after
    the last `start_id`) counts as thinking from its first generated token — GLM-4.1V opens with `<think>`.
    """

    max_tokens: int
    end_ids: tuple[int, ...]
    start_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise GenerationError(f"max_thinking_tokens must be >= 0, got {self.max_tokens}")
        if not 1 <= len(self.end_ids) <= MAX_FORCED:
            raise GenerationError(f"think_end_ids: expected 1 to {MAX_FORCED} ids, got {len(self.end_ids)}")

    def initial_state(self, prompts: Sequence[Sequence[int]], pad_rows: int) -> dict[str, np.ndarray]:
        """Per-row thinking state at the first generated token (host side)."""
        thinking = []
        for p in prompts:
            p = list(p)
            last_end = max((i for i, x in enumerate(p) if x == self.end_ids[0]), default=-1)
            last_start = max((i for i, x in enumerate(p) if x == self.start_id), default=-1) \
                if self.start_id is not None else -1
            if self.start_id is None:
                thinking.append(last_end < 0)
            else:
                thinking.append(last_start > last_end)
        thinking += [False] * pad_rows
        th = np.asarray(thinking, bool)
        n = len(th)
        end = np.full((MAX_FORCED,), -1, np.int32)
        end[: len(self.end_ids)] = self.end_ids
        return {"thinking": th, "closed": ~th if self.start_id is None else np.zeros((n,), bool),
                "n_think": np.zeros((n,), np.int32),
                "force_i": np.where(th & (self.max_tokens == 0), 0, -1).astype(np.int32),
                "budget": np.int32(self.max_tokens), "end_ids": end, "n_end": np.int32(len(self.end_ids)),
                "start_id": np.int32(-1 if self.start_id is None else self.start_id)}


_THINK_ROWS = ("thinking", "closed", "n_think", "force_i")  # the per-row entries of the thinking state


def _thinking_step(tok: jax.Array, th: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Apply a forced close to the sampled tokens (B,) and advance the per-row thinking state."""
    forcing = th["force_i"] >= 0
    forced = th["end_ids"][jnp.clip(th["force_i"], 0, MAX_FORCED - 1)]
    tok = jnp.where(forcing, forced, tok)
    force_i = jnp.where(forcing, th["force_i"] + 1, -1)
    force_i = jnp.where(force_i >= th["n_end"], -1, force_i)
    ends = forcing | (tok == th["end_ids"][0])
    closed = th["closed"] | ends
    opens = (tok == th["start_id"]) & ~th["thinking"]
    n_think = th["n_think"] + (th["thinking"] & ~ends & ~opens).astype(jnp.int32)
    thinking = (th["thinking"] | opens) & ~closed
    force_i = jnp.where(thinking & (n_think >= th["budget"]) & (force_i < 0), 0, force_i)
    return tok, {**th, "thinking": thinking, "closed": closed, "n_think": n_think, "force_i": force_i}


# ---------------------------------------------------------------------------------------------------------------
# Device programs.


def _prefill_logits(params, kw, *, model: Glm4v, cfg: Glm4vConfig, max_len: int):
    """Prompt -> (last-slot logits (B, V) float32, cache, kv segment ids (B, S))."""
    ids = kw["input_ids"]
    b, t = ids.shape
    cache = init_cache(cfg, b, max_len)
    seg = kw["segment_ids"].astype(jnp.int32)
    kv_seg = jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(seg)
    logits, cache = model.apply({"params": params}, **kw, cache=cache, cache_index=jnp.int32(0),
                                logits_index=jnp.full((b,), t - 1, jnp.int32))  # fresh cache: no kv segment ids
    return logits[:, 0].astype(jnp.float32), cache, kv_seg


def _step_logits(params, cache, kv_seg, slot, pos, tok, *, model: Glm4v):
    """One decode step: token `tok` (B,) into cache slot `slot` at M-RoPE position `pos` (B,) on all 3 rows.
    Returns (logits (B, V) float32, cache, kv_seg)."""
    b = tok.shape[0]
    kv_seg = jax.lax.dynamic_update_slice(kv_seg, jnp.ones((b, 1), jnp.int32), (jnp.int32(0), slot))
    positions = jnp.broadcast_to(pos[None, :, None], (3, b, 1))
    logits, cache = model.apply({"params": params}, tok[:, None], positions, jnp.ones((b, 1), jnp.int32),
                                cache=cache, cache_index=slot, kv_segment_ids=kv_seg)
    return logits[:, 0].astype(jnp.float32), cache, kv_seg


def _prefill(params, kw, row, key, scalars, eos, *, model: Glm4v, cfg: Glm4vConfig, max_len: int,
             sampling: SamplingParams):
    """row: per-row host arrays {"pos", "limit", optionally "think"}. Returns (cache, loop state)."""
    logits, cache, kv_seg = _prefill_logits(params, kw, model=model, cfg=cfg, max_len=max_len)
    b = logits.shape[0]
    seen = None
    if sampling.use_repetition_penalty:  # the prompt's tokens (padding excluded), as HF's input_ids
        ids = kw["input_ids"]
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], ids].max(kw["segment_ids"] > 0)
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), sampling, scalars, seen)
    state = {"kv_seg": kv_seg, "slot": jnp.int32(kw["input_ids"].shape[1]), "pos": row["pos"].astype(jnp.int32),
             "limit": row["limit"], "key": key, "step": jnp.int32(1)}
    if "think" in row:
        tok, state["think"] = _thinking_step(tok, row["think"])
    state["tok"] = tok
    state["done"] = jnp.isin(tok, eos) | (row["limit"] <= 1)
    if seen is not None:
        state["seen"] = seen.at[jnp.arange(b), tok].set(True)
    return cache, state


def _decode(params, cache, state, scalars, eos, pad_id, *, model: Glm4v, chunk: int, sampling: SamplingParams):
    b = state["tok"].shape[0]
    buf = jnp.full((b, chunk), -1, jnp.int32)

    def cond(c):
        _, st, _, i = c
        return (i < chunk) & ~jnp.all(st["done"])

    def body(c):
        cache, st, buf, i = c
        logits, cache, kv_seg = _step_logits(params, cache, st["kv_seg"], st["slot"], st["pos"], st["tok"],
                                             model=model)
        tok = sample_tokens(logits, jax.random.fold_in(st["key"], st["step"]), sampling, scalars, st.get("seen"))
        new = {**st, "kv_seg": kv_seg, "slot": st["slot"] + 1, "pos": st["pos"] + 1, "step": st["step"] + 1}
        if "think" in st:
            tok, think = _thinking_step(tok, st["think"])
            new["think"] = {k: jnp.where(st["done"], st["think"][k], v) if k in _THINK_ROWS else v
                            for k, v in think.items()}
        tok = jnp.where(st["done"], pad_id, tok)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (jnp.int32(0), i))
        new["tok"] = tok
        new["done"] = st["done"] | jnp.isin(tok, eos) | (new["step"] >= st["limit"])
        if "seen" in st:
            new["seen"] = st["seen"].at[jnp.arange(b), tok].set(True)
        return cache, new, buf, i + 1

    cache, state, buf, n = jax.lax.while_loop(cond, body, (cache, state, buf, jnp.int32(0)))
    return cache, state, buf, n


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


def _shape_key(kind: str, statics: Mapping[str, Any], args: tuple) -> str:
    """A short human-readable description of a compiled program (for the compile log)."""
    parts = [kind]
    if kind == "prefill":
        kw = args[1]
        b, t = np.shape(kw["input_ids"])
        parts.append(f"batch={b} prompt={t} cache={statics['max_len']}")
        if kw.get("vision") is not None:
            parts.append(f"patches={np.shape(kw['vision']['pixel_values'])[0]}")
    else:
        b, s = np.shape(args[2]["kv_seg"])
        parts.append(f"batch={b} cache={s} chunk={statics['chunk']}")
    parts.append(f"sampling={statics['sampling'].static_key}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Engine.


class Engine:
    """Holds the params on device (optionally sharded over a mesh) and the compiled prefill / decode executables.

    `generate_batch` / `generate` serve requests; `warmup` compiles ahead of time; `num_compiles` counts the
    executables built so far. `max_context` caps prompt + new tokens (default and maximum: the model's
    max_position_embeddings, 65536 for GLM-4.1V); `memory_limit_bytes` caps the KV cache of one call (default: what
    the device reports as free, when it reports it).

    Kernel layout: `params` are in `cfg.runtime.kernel_layout` (checkpoints: "in_out"); the engine keeps them in
    `kernel_layout`, by default the measured best of the platform it runs on (`config.BACKEND_TUNING`: "out_in"
    on CPU, "in_out" on TPU/GPU), so `engine.params` and `engine.cfg` describe that layout.

    Ownership (`donate=True`, the default): the engine takes the params. Every device array it replaces (a kernel
    re-laid out, a leaf moved into its mesh sharding) is deleted from the caller's tree as soon as its replacement
    exists, so the device holds one copy of the weights (transiently one kernel more); use `engine.params`
    afterwards. Arrays it keeps as they are stay shared with the caller; host (NumPy) params are copied to the
    device once and stay valid. `donate=False` leaves the caller's arrays valid (two copies of whatever is
    replaced, while the caller keeps them).

    Ahead-of-time compilation without weights: `Engine(None, cfg, mesh=...)` holds ShapeDtypeStructs instead of
    arrays; `warmup(...)` then compiles the same prefill/decode programs for the mesh's devices (which this host
    need not have, e.g. a TPU topology), listed by `programs()`. Every program is traced under its mesh
    (`sharding.under_mesh`), so the attention kernels run under shard_map and "auto" follows the mesh's platform.
    """

    def __init__(self, params: Any, cfg: Glm4vConfig, *, mesh: jax.sharding.Mesh | None = None,
                 chunk_size: int = 16, prompt_bucket: Callable[[int], int] = bucket_length,
                 patch_bucket: Callable[[int], int] | None = vision_bucket, max_context: int | None = None,
                 memory_limit_bytes: int | None = None, kernel_layout: str | None = None, donate: bool = True) -> None:
        if chunk_size < 1:
            raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")
        limit = cfg.text.max_position_embeddings
        if max_context is not None and not 1 <= max_context <= limit:
            raise GenerationError(f"max_context must be in [1, {limit}] (the model's max_position_embeddings), "
                                  f"got {max_context}")
        self.platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        if kernel_layout is None:
            kernel_layout = backend_default(self.platform, "engine_kernel_layout")
        if kernel_layout not in KERNEL_LAYOUTS:
            raise GenerationError(f"kernel_layout must be 'in_out' or 'out_in', got {kernel_layout!r}")
        self.mesh = mesh
        self.max_context = int(max_context or limit)
        self.memory_limit_bytes = memory_limit_bytes
        self.chunk_size = int(chunk_size)
        self.prompt_bucket = prompt_bucket
        self.patch_bucket = patch_bucket
        self.param_shardings = None
        if mesh is not None:
            from .sharding import param_shardings

            self.param_shardings = param_shardings(abstract_params(cfg.with_runtime(kernel_layout=kernel_layout)), mesh)
        if params is None:  # abstract (no weights): programs can only be compiled, e.g. for a TPU topology (plan)
            if mesh is None:
                raise GenerationError("an Engine without params needs a mesh (the devices to compile for)")
            self.cfg = cfg.with_runtime(kernel_layout=kernel_layout)
            self.params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nn.meta.unbox(abstract_params(self.cfg)), self.param_shardings)
        else:
            # The decode layout (see layers.Dense): each kernel transposed once, here, straight into its sharding;
            # with `donate` each replaced array of the caller's tree is freed at once (one copy on the device).
            self.params, self.cfg = to_kernel_layout(params, cfg, kernel_layout, self.param_shardings, donate=donate)
            if mesh is None:
                self.params = jax.device_put(self.params)
        self.model = Glm4v(self.cfg)
        self._compiled: dict[tuple, Any] = {}
        self.compile_log: list[tuple[str, float]] = []  # (shape key, seconds) per compile
        self.compile_seconds = 0.0  # all compiles of this engine
        self._last_compile_s = 0.0  # compiles of the current request

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def programs(self) -> list[tuple[str, Any, float]]:
        """(kind "prefill" | "decode", compiled executable, compile seconds) of every program built, in order."""
        return [(key[0], exe, log_entry[1]) for (key, exe), log_entry in zip(self._compiled.items(),
                                                                           self.compile_log, strict=True)]

    # -------------------------------------------------------------------------------------------- shardings
    def _replicated(self) -> Any:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _rows(self, x: Any, axis: int = 0) -> Any:
        """Shard dimension `axis` (the batch) over the batch mesh axes when it divides them, else replicate."""
        from .sharding import logical_to_spec

        shape = np.shape(x)
        names = [None] * len(shape)
        if len(shape) > axis:
            names[axis] = "batch"
        return jax.sharding.NamedSharding(self.mesh, logical_to_spec(names, shape, self.mesh))

    def cache_shardings(self, cache: Any) -> Any:
        """KV-cache shardings: (B, K, S, H) per layer (L, B, K, S, H stacked) -> batch, kv_heads, length, head_dim."""
        from .sharding import logical_to_spec

        def one(x):
            names = ("batch", "kv_heads", "length", "head_dim")
            names = names if len(np.shape(x)) == 4 else ("layers", *names)
            return jax.sharding.NamedSharding(self.mesh, logical_to_spec(names, np.shape(x), self.mesh))

        return jax.tree.map(one, cache)

    def _state_shardings(self, state: Mapping[str, Any]) -> Any:
        out = {}
        for k, v in state.items():
            if k == "kv_seg":
                out[k] = self._rows(v)
            elif isinstance(v, Mapping):
                out[k] = {kk: self._rows(vv) if kk in _THINK_ROWS else self._replicated() for kk, vv in v.items()}
            elif np.ndim(v) >= 1 and k != "key":
                out[k] = self._rows(v)
            else:
                out[k] = self._replicated()
        return out

    def _in_out_shardings(self, kind: str, fn: Callable, args: tuple) -> tuple[Any, Any]:
        rep = self._replicated()
        if kind == "prefill":
            _, kw, row, key, scalars, eos = args
            kw_sh = {k: (None if v is None else jax.tree.map(lambda _: rep, v) if k == "vision"
                         else self._rows(v, 1) if k == "positions" else self._rows(v)) for k, v in kw.items()}
            ins = (self.param_shardings, kw_sh, self._state_shardings(row), rep,
                   jax.tree.map(lambda _: rep, scalars), rep)
            shapes = jax.eval_shape(fn, *args)  # (cache, state): laid out as the decode program takes them
            return ins, (self.cache_shardings(shapes[0]), self._state_shardings(shapes[1]))
        _, cache, state, scalars, eos, pad_id = args
        st_sh = self._state_shardings(state)
        ins = (self.param_shardings, self.cache_shardings(cache), st_sh, jax.tree.map(lambda _: rep, scalars), rep,
               rep)
        outs = (self.cache_shardings(cache), st_sh, self._rows(np.zeros((np.shape(state["tok"])[0], 1))), rep)
        return ins, outs

    def _executable(self, kind: str, statics: dict[str, Any], args: tuple, donate: tuple[int, ...] = ()) -> Any:
        key = (kind, tuple(sorted(statics.items(), key=lambda kv: kv[0])), _signature(args[1:]))
        exe = self._compiled.get(key)
        if exe is not None:
            return exe
        fn = under_mesh(functools.partial({"prefill": _prefill, "decode": _decode}[kind], model=self.model,
                                          **statics), self.mesh)
        t0 = time.perf_counter()
        if self.mesh is None:
            jitted = jax.jit(fn, donate_argnums=donate)
        else:
            ins, outs = self._in_out_shardings(kind, fn, args)
            jitted = jax.jit(fn, donate_argnums=donate, in_shardings=ins, out_shardings=outs)
        exe = jitted.lower(*args).compile()
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        self._last_compile_s += dt
        self._compiled[key] = exe
        desc = _shape_key(kind, statics, args)
        self.compile_log.append((desc, dt))
        log.info("compiled %s in %.2fs (%d programs)", desc, dt, len(self._compiled))
        return exe

    # -------------------------------------------------------------------------------------------- limits
    def _check_memory(self, batch: int, max_len: int) -> None:
        need = kv_cache_bytes(self.cfg, batch, max_len)
        budget = self.memory_limit_bytes
        if budget is None:
            budget = _free_device_bytes(self.mesh)
        if budget is not None and need > budget:
            raise GenerationError(f"the KV cache for {batch} rows x {max_len} slots needs {format_bytes(need)}, more "
                                  f"than the {format_bytes(budget)} available; lower the batch size, the prompt "
                                  f"length or max_new_tokens")

    # -------------------------------------------------------------------------------------------- serving
    def prepare(self, inputs: Mapping[str, Any], max_new_tokens: int | Sequence[int],
                pad_batch_to: int | None = None) -> PreparedBatch:
        """Bucket and check a batch (no device work): every limit error is raised here."""
        prep = prepare_batch(self.cfg, inputs, max_new_tokens, self.prompt_bucket, self.patch_bucket,
                             self.max_context, pad_batch_to)
        self._check_memory(len(prep.limits), prep.max_len)
        return prep

    def warmup(self, buckets: Sequence[Mapping[str, Any]], *, sampling: SamplingParams | None = None,
               thinking: bool = False) -> int:
        """Compile the prefill and decode programs for each bucket ahead of time; returns the number of new compiles.

        A bucket is {"batch": B, "prompt_tokens": T, "max_new_tokens": N, "images": [(height, width), ...] in
        pixels after resizing (multiples of patch*merge; optional), "videos": [(frames, height, width), ...]}.
        Any request whose sizes round to the same buckets then runs without compiling.
        """
        before = self.num_compiles
        sampling = sampling or SamplingParams()
        for spec in buckets:
            inputs = synthetic_inputs(self.cfg, **spec)
            budget = ThinkingBudget(1 << 30, (0,), None) if thinking else None
            self._run(inputs, max_new_tokens=int(spec.get("max_new_tokens", 16)), sampling=sampling, seed=0,
                      eos=(), thinking=budget, stream_callback=None, pad_batch_to=None, dry=True)
        return self.num_compiles - before

    def generate_batch(
        self,
        inputs: Mapping[str, Any],
        *,
        max_new_tokens: int | Sequence[int] = 256,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        stream_callback: Callable[[list[list[int]]], None] | None = None,
        max_thinking_tokens: int | None = None,
        think_end_ids: Sequence[int] | None = None,
        think_start_id: int | None = None,
        pad_batch_to: int | None = None,
    ) -> list[GenerationResult]:
        """Generate for every row of a (possibly padded) batch. `eos_ids=()` disables stopping on eos.

        max_new_tokens: one limit for all rows or one per row. `stream_callback(new_tokens_per_row)` is called with
        each chunk of new tokens (rows that already stopped get an empty list). `max_thinking_tokens` with
        `think_end_ids` (and preferably `think_start_id`) bounds the thinking (see `ThinkingBudget`).
        `pad_batch_to` pads the batch with dummy rows to a fixed size (one compiled program for every batch).
        """
        sampling = sampling or SamplingParams()
        eos = tuple(self.cfg.text.eos_token_ids if eos_ids is None else eos_ids)
        budget = None
        if max_thinking_tokens is not None:
            if not think_end_ids:
                raise GenerationError("max_thinking_tokens needs think_end_ids (the ids of '</think><answer>')")
            budget = ThinkingBudget(int(max_thinking_tokens), tuple(int(i) for i in think_end_ids), think_start_id)
        return self._run(inputs, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, eos=eos,
                         thinking=budget, stream_callback=stream_callback, pad_batch_to=pad_batch_to)

    def _run(self, inputs, *, max_new_tokens, sampling, seed, eos, thinking, stream_callback, pad_batch_to,
             dry: bool = False) -> list[GenerationResult]:
        if len(eos) > MAX_EOS:
            raise GenerationError(f"at most {MAX_EOS} eos ids are supported, got {len(eos)}")
        eos_arr = np.full((MAX_EOS,), -1, np.int32)
        eos_arr[: len(eos)] = eos
        eos_set = set(int(e) for e in eos)
        prep = self.prepare(inputs, max_new_tokens, pad_batch_to)
        n_rows = len(prep.prompt_token_ids)
        bsz = len(prep.limits)
        limits = [int(x) for x in prep.limits]
        self._last_compile_s = 0.0
        scalars = jax.tree.map(np.asarray, sampling.scalars())
        key = jax.random.PRNGKey(seed)
        kw = prep.model_kwargs
        row: dict[str, Any] = {"pos": prep.next_positions, "limit": prep.limits}
        if thinking is not None:
            row["think"] = thinking.initial_state(prep.prompt_token_ids, bsz - n_rows)

        pargs = (self.params, kw, row, key, scalars, eos_arr)
        pstatics = dict(cfg=self.cfg, max_len=prep.max_len, sampling=sampling.canonical())
        prefill = self._executable("prefill", pstatics, pargs)
        pad_id = np.int32(self.cfg.text.pad_token_id)
        statics = dict(chunk=self.chunk_size, sampling=sampling.canonical())
        if dry:
            shapes = jax.eval_shape(under_mesh(functools.partial(_prefill, model=self.model, **pstatics), self.mesh),
                                    *pargs)
            dargs = (self.params, *shapes, scalars, eos_arr, pad_id)
            self._executable("decode", statics, dargs, donate=(1, 2))
            return []
        t0 = time.perf_counter()
        cache, state = prefill(*pargs)
        first = np.asarray(state["tok"])
        prefill_s = time.perf_counter() - t0

        out: list[list[int]] = [[int(x)] for x in first[:n_rows]]
        done = [int(first[b]) in eos_set or limits[b] <= 1 for b in range(n_rows)]
        if stream_callback is not None:
            stream_callback([list(r) for r in out])

        steps = 1
        t_dec = time.perf_counter()
        decode_compile_s = 0.0
        pending = None
        n_generated = 0
        while True:
            # Dispatch the next chunk before reading the previous one: `done` lags one chunk behind, and a chunk
            # dispatched after the end returns at once with no tokens.
            nxt = None
            if not all(done):
                dargs = (self.params, cache, state, scalars, eos_arr, pad_id)
                c0 = self._last_compile_s
                exe = self._executable("decode", statics, dargs, donate=(1, 2))
                decode_compile_s += self._last_compile_s - c0
                cache, state, buf, n = exe(*dargs)
                nxt = (buf, n)
            if pending is not None:
                buf_np, n_np = np.asarray(pending[0]), int(pending[1])
                new: list[list[int]] = [[] for _ in range(n_rows)]
                for b in range(n_rows):
                    for tok in buf_np[b, :n_np]:
                        if done[b]:
                            break
                        new[b].append(int(tok))
                        done[b] = int(tok) in eos_set or len(out[b]) + len(new[b]) >= limits[b]
                    out[b].extend(new[b])
                    n_generated += len(new[b])
                steps += n_np
                if stream_callback is not None and n_np:
                    stream_callback(new)
            if nxt is None:
                break
            pending = nxt
        decode_s = time.perf_counter() - t_dec - decode_compile_s
        timings = {
            "compile_s": self._last_compile_s,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_steps": float(steps - 1),
            "decode_tokens": float(n_generated),
            "decode_tokens_per_s": (n_generated / decode_s) if decode_s > 0 and n_generated else 0.0,
            "prompt_tokens": float(max(len(p) for p in prep.prompt_token_ids)),
            "prompt_bucket": float(prep.prompt_len),
            "batch_rows": float(bsz),
            "kv_cache_bytes": float(kv_cache_bytes(self.cfg, bsz, prep.max_len)),
            "num_compiles": float(self.num_compiles),
        }
        results = []
        for b in range(n_rows):
            toks = out[b][: limits[b]]
            reason = "eos" if toks and toks[-1] in eos_set else "length"
            results.append(GenerationResult(toks, prep.prompt_token_ids[b], reason, dict(timings), self.num_compiles))
        return results

    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 seed: int = 0, eos_ids: Sequence[int] | None = None,
                 stream_callback: Callable[[list[int]], None] | None = None, max_thinking_tokens: int | None = None,
                 think_end_ids: Sequence[int] | None = None, think_start_id: int | None = None) -> GenerationResult:
        """One prompt (batch of 1). `stream_callback(new_token_ids)` is called per chunk."""
        cb = None if stream_callback is None else (lambda rows: stream_callback(rows[0]) if rows[0] else None)
        res = self.generate_batch(inputs, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                  eos_ids=eos_ids, stream_callback=cb, max_thinking_tokens=max_thinking_tokens,
                                  think_end_ids=think_end_ids, think_start_id=think_start_id)
        if len(res) != 1:
            raise GenerationError(f"generate() takes one prompt, got a batch of {len(res)}; use generate_batch()")
        return res[0]


def _free_device_bytes(mesh: Any) -> int | None:
    """Free bytes on the (first) device, as the runtime reports it (TPU/GPU); None when unknown (CPU)."""
    dev = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    n_dev = 1 if mesh is None else mesh.devices.size
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * n_dev)


def synthetic_inputs(cfg: Glm4vConfig, batch: int = 1, prompt_tokens: int = 32, images: Sequence[Sequence[int]] = (),
                     videos: Sequence[Sequence[int]] = (), **_: Any) -> dict[str, np.ndarray]:
    """Processor-like arrays of the given sizes (zero pixels, placeholder tokens in row 0) for `Engine.warmup`.

    images: (height, width) in pixels after resizing; videos: (frames, height, width)."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    m2 = v.spatial_merge_size**2

    def grid(t: int, h: int, w: int) -> list[int]:
        if h % unit or w % unit or h <= 0 or w <= 0:
            raise GenerationError(f"warmup: media sizes must be positive multiples of {unit} px, got {h}x{w}")
        return [max(t // v.temporal_patch_size, 1), h // v.patch_size, w // v.patch_size]

    img_grids = [grid(v.temporal_patch_size, int(h), int(w)) for h, w in images]
    vid_grids = [grid(int(f), int(h), int(w)) for f, h, w in videos]
    toks: list[int] = []
    for g in img_grids:
        toks += [cfg.image_start_token_id] + [cfg.image_token_id] * (int(np.prod(g)) // m2) + [cfg.image_end_token_id]
    for g in vid_grids:
        toks.append(cfg.video_start_token_id)
        for _ in range(g[0]):
            toks += [cfg.image_start_token_id] + [cfg.image_token_id] * (g[1] * g[2] // m2)
            toks.append(cfg.image_end_token_id)
        toks.append(cfg.video_end_token_id)
    n = max(int(prompt_tokens), len(toks) + 1)
    ids = np.zeros((batch, n), np.int64)
    ids[0, : len(toks)] = toks
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if img_grids:
        out["image_grid_thw"] = np.asarray(img_grids, np.int64)
        out["pixel_values"] = np.zeros((int(np.prod(out["image_grid_thw"], -1).sum()), v.patch_dim), np.float32)
    if vid_grids:
        out["video_grid_thw"] = np.asarray(vid_grids, np.int64)
        out["pixel_values_videos"] = np.zeros((int(np.prod(out["video_grid_thw"], -1).sum()), v.patch_dim),
                                              np.float32)
    return out


def teacher_forced_logits(params: Any, cfg: Glm4vConfig, inputs: Mapping[str, Any], continuation: Sequence[int],
                          max_len: int | None = None) -> np.ndarray:
    """Logits (N+1, V) from the engine's own programs: prefill of the prompt (one row), then one cached decode step
    per continuation token. Row i predicts the token after `continuation[:i]` (used to check the KV cache)."""
    prep = prepare_batch(cfg, inputs, max(len(continuation), 1))
    if prep.next_positions.shape[0] != 1:
        raise GenerationError("teacher_forced_logits takes one prompt")
    model = Glm4v(cfg)
    kw = jax.tree.map(jnp.asarray, prep.model_kwargs)
    prefill = jax.jit(functools.partial(_prefill_logits, model=model, cfg=cfg, max_len=max_len or prep.max_len))
    step = jax.jit(functools.partial(_step_logits, model=model), donate_argnums=(1,))
    logits, cache, kv_seg = prefill(params, kw)
    rows = [np.asarray(logits[0])]
    for i, tok in enumerate(continuation):
        logits, cache, kv_seg = step(params, cache, kv_seg, jnp.int32(prep.prompt_len + i),
                                     jnp.asarray(prep.next_positions + i), jnp.asarray([tok], jnp.int32))
        rows.append(np.asarray(logits[0]))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# Functional API (engines cached per params object).

_ENGINES: dict[tuple[int, Glm4vConfig], tuple[Any, Engine]] = {}


def get_engine(params: Any, cfg: Glm4vConfig, **engine_kw: Any) -> Engine:
    """The cached Engine for this params object and config (a few are kept).

    The functional API leaves the caller's params valid and never holds a second copy of them on the device:
    device params are served in their own layout and sharding (the engine shares the arrays), host (NumPy) params
    are copied to the device once, in the platform's layout (`config.BACKEND_TUNING`). For the platform's layout
    with device params, build an `Engine` (it takes ownership of them).
    """
    key = (id(params), cfg, tuple(sorted(engine_kw.items())))
    hit = _ENGINES.get(key)
    if hit is not None and hit[0] is params:
        return hit[1]
    if len(_ENGINES) >= 4:
        _ENGINES.pop(next(iter(_ENGINES)))
    kw = dict(engine_kw)
    kw.setdefault("donate", False)
    if "kernel_layout" not in kw and any(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
        kw["kernel_layout"] = cfg.runtime.kernel_layout  # no re-layout: no second copy of device params
    eng = Engine(params, cfg, **kw)
    _ENGINES[key] = (params, eng)
    return eng


def _sampling(greedy: bool, temperature: float, top_k: int | None, top_p: float | None,
              repetition_penalty: float = 1.0) -> SamplingParams:
    try:
        return SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
    except ValueError as e:
        raise GenerationError(str(e)) from e


def generate(
    params: Any,
    cfg: Glm4vConfig,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int = 256,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    stream_callback: Callable[[list[int]], None] | None = None,
    chunk_size: int = 16,
) -> GenerationResult:
    """Generate for one prompt (`inputs` = the processor's dict for one sequence)."""
    eng = get_engine(params, cfg, chunk_size=chunk_size)
    sampling = _sampling(greedy, temperature, top_k, top_p, repetition_penalty)
    return eng.generate(inputs, max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=seed, eos_ids=eos_ids, stream_callback=stream_callback)


def generate_batch(
    params: Any,
    cfg: Glm4vConfig,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int | Sequence[int] = 256,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    stream_callback: Callable[[list[list[int]]], None] | None = None,
    chunk_size: int = 16,
) -> list[GenerationResult]:
    """Generate for every row of a padded batch (left or right padded; re-laid-out left-padded)."""
    eng = get_engine(params, cfg, chunk_size=chunk_size)
    sampling = _sampling(greedy, temperature, top_k, top_p, repetition_penalty)
    return eng.generate_batch(inputs, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, eos_ids=eos_ids,
                              stream_callback=stream_callback)
