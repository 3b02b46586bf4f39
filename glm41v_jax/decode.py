"""The pure device programs of generation over a typed `DecodeState`: prefill, insert, decode (and the thinking step).

The three programs follow JetStream's engine API (prefill / insert / generate), so that slot-based continuous
batching can be built on them:

- `prefill(params, inputs, ...) -> DecodeState`: the whole prompt (vision tower + decoder) writes slots [0, T) of a
  zeroed KV cache of S slots and samples the first token of every row from the logits of its last prompt slot.
  The result is a prefix: a decode state holding just these rows.
- `insert(prefix, state, slot) -> DecodeState`: copies the prefix's rows into rows [slot, slot + b) of a running
  decode state. All rows share one cache write slot (`index`); the prefix's cache rows are shifted along the
  slots so that its prompt ends where the state writes next. Positions travel per row (`pos`, M-RoPE) and padding
  slots have kv segment 0, so a shift of the slots changes no result.
- `decode(params, state, ...) -> (state, tokens, n)`: JetStream's `generate`, run for a chunk: a `lax.while_loop`
  of up to `chunk` steps for every row (stopping early once every row is done: it emitted an eos id or reached its
  own token limit); the chunk's tokens go back to the host for streaming.

A batch of requests that start together is `prefill` then `decode` chunks; the state (KV cache included) is donated
to each call. The KV cache is one array per layer (B, K, S, H) (stacked (L, B, K, S, H) when scan_layers).

Positions: generated token number i (0-based) of row b has M-RoPE position n_b + i + rope_delta_b on all three rows,
where n_b counts the row's real prompt tokens (left padding makes cache slots and real-token counts differ).

Thinking budget (`ThinkingBudget`): inside the loop each row counts the tokens it generates while its `<think>` block
is open; once the budget is spent, the next tokens are forced to `end_ids` (`</think><answer>`). Rows whose prompt
already closed the block (the `--no-thinking` prefill `<think></think>`) are never forced.

Every field of the state names its logical axes (`axes`), so `state_shardings` lays it out from the one rules table
(`sharding.LOGICAL_RULES`) without knowing the fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import Glm4vConfig
from .model import Glm4v, init_cache
from .requests import GenerationError
from .sampling import SamplingParams, sample_tokens
from .sharding import logical_to_spec

MAX_EOS = 8  # eos ids are passed as a fixed-size array (padded with -1) so that changing them never recompiles
MAX_FORCED = 8  # at most this many forced ids close a thinking block
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # one layer of the KV cache; "layers" in front if stacked


def axes(*names: str | None) -> Any:
    """A state field with the logical axes of its trailing dimensions (leading extra ones are "layers"); no names:
    replicated (scalars, small shared tables)."""
    return struct.field(pytree_node=True, metadata={"axes": tuple(names)})


@struct.dataclass
class ThinkState:
    """Per-row thinking state, and the budget shared by all rows."""

    thinking: jax.Array = axes("batch")  # (B,) bool: inside an open <think> block
    closed: jax.Array = axes("batch")  # (B,) bool: the block was closed (never forced again)
    n_think: jax.Array = axes("batch")  # (B,) thinking tokens so far
    force_i: jax.Array = axes("batch")  # (B,) index into end_ids of the next forced token, -1: not forcing
    budget: jax.Array = axes()  # () thinking tokens allowed
    end_ids: jax.Array = axes()  # (MAX_FORCED,) the forced ids, padded with -1
    n_end: jax.Array = axes()  # () how many of end_ids are real
    start_id: jax.Array = axes()  # () the <think> id, -1: none


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries for a batch of rows (a prefill's result is one: a prefix)."""

    cache: Any = axes(*CACHE_AXES)  # {"k", "v"}: per layer (B, K, S, H), or stacked (L, B, K, S, H)
    kv_seg: jax.Array = axes("batch", "length")  # (B, S) 1 for written slots, 0 for padding and free slots
    index: jax.Array = axes()  # () the cache slot every row writes next
    pos: jax.Array = axes("batch")  # (B,) M-RoPE position of the token in `tok`
    limit: jax.Array = axes("batch")  # (B,) max new tokens of the row
    count: jax.Array = axes("batch")  # (B,) tokens the row has generated (the one in `tok` included)
    step: jax.Array = axes()  # () decode steps of the batch (folds the sampling key)
    key: jax.Array = axes()  # the sampling key
    tok: jax.Array = axes("batch")  # (B,) the latest token of each row
    done: jax.Array = axes("batch")  # (B,) the row stopped (eos or limit)
    seen: jax.Array | None = axes("batch", None)  # (B, V) bool, tokens seen (repetition penalty only)
    think: ThinkState | None = None  # thinking budget (only with one); its fields carry their own axes


def _fields(x: Any) -> list[tuple[dataclasses.Field, Any]]:
    return [(f, getattr(x, f.name)) for f in dataclasses.fields(x)]


def map_rows(fn: Any, *states: Any) -> Any:
    """Apply `fn(axes, *leaves)` to every array of one or more states of the same structure (recursing into nested
    states and the cache dict); `axes` are the field's logical names, "layers" in front of stacked leaves."""
    first = states[0]
    if first is None:
        return None
    out = {}
    for f, _ in _fields(first):
        vals = [getattr(s, f.name) for s in states]
        if dataclasses.is_dataclass(vals[0]):
            out[f.name] = map_rows(fn, *vals)
        elif vals[0] is None:
            out[f.name] = None
        else:
            names = f.metadata.get("axes", ())

            def leaf(*xs, names=names):
                full = names if not names else ("layers",) * (np.ndim(xs[0]) - len(names)) + names
                return fn(full, *xs)

            out[f.name] = jax.tree.map(leaf, *vals)
    return type(first)(**out)


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings of a DecodeState (or ThinkState) on `mesh`, from each field's logical axes."""
    def one(names, x):
        names = names or (None,) * np.ndim(x)
        return jax.sharding.NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh))

    return map_rows(one, state)


# ---------------------------------------------------------------------------------------------------------------
# Thinking budget.


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

    def initial_state(self, prompts: Sequence[Sequence[int]], pad_rows: int) -> ThinkState:
        """Per-row thinking state at the first generated token (host side, NumPy)."""
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
        return ThinkState(thinking=th, closed=~th if self.start_id is None else np.zeros((n,), bool),
                          n_think=np.zeros((n,), np.int32),
                          force_i=np.where(th & (self.max_tokens == 0), 0, -1).astype(np.int32),
                          budget=np.int32(self.max_tokens), end_ids=end, n_end=np.int32(len(self.end_ids)),
                          start_id=np.int32(-1 if self.start_id is None else self.start_id))


def thinking_step(tok: jax.Array, th: ThinkState) -> tuple[jax.Array, ThinkState]:
    """Apply a forced close to the sampled tokens (B,) and advance the per-row thinking state."""
    forcing = th.force_i >= 0
    forced = th.end_ids[jnp.clip(th.force_i, 0, MAX_FORCED - 1)]
    tok = jnp.where(forcing, forced, tok)
    force_i = jnp.where(forcing, th.force_i + 1, -1)
    force_i = jnp.where(force_i >= th.n_end, -1, force_i)
    ends = forcing | (tok == th.end_ids[0])
    closed = th.closed | ends
    opens = (tok == th.start_id) & ~th.thinking
    n_think = th.n_think + (th.thinking & ~ends & ~opens).astype(jnp.int32)
    thinking = (th.thinking | opens) & ~closed
    force_i = jnp.where(thinking & (n_think >= th.budget) & (force_i < 0), 0, force_i)
    return tok, th.replace(thinking=thinking, closed=closed, n_think=n_think, force_i=force_i)


def _keep_done_rows(done: jax.Array, old: Any, new: Any) -> Any:
    """`new`, except that rows already done keep `old`'s per-row values."""
    return map_rows(lambda names, o, n: jnp.where(done, o, n) if names[:1] == ("batch",) else n, old, new)


# ---------------------------------------------------------------------------------------------------------------
# Programs.


def variables(params: Any) -> dict[str, Any]:
    """The Flax variables of the engine's params: the weights, or {"params": weights, "lora": adapters} for LoRA
    adapters run unmerged (`Engine(adapters=...)`, e.g. on a quantized base)."""
    return params if set(params) == {"params", "lora"} else {"params": params}


def prefill_chunk_length(prompt_len: int, chunk: int | None) -> int | None:
    """The chunk length the prefill of a `prompt_len`-token bucket runs in, for a chunk setting of at most `chunk`
    tokens (None or 0: one shot). None when the prompt fits one chunk; else the balanced length: the fewest chunks
    of at most `chunk` tokens, each rounded up to a multiple of 128 (of 8 below 1024 tokens) but never above
    `chunk`. The last chunk starts at `prompt_len - length` (it may overlap the one before; see `prefill_logits`)."""
    if not chunk or prompt_len <= chunk:
        return None
    n = -(-prompt_len // chunk)
    even = -(-prompt_len // n)
    m = 128 if even >= 1024 else 8
    return min(-(-even // m) * m, int(chunk))


def _slice_tokens(kw: dict[str, Any], start: jax.Array, length: int) -> dict[str, Any]:
    """The per-token arrays of the prompt's kwargs at tokens [start, start + length) (the token axis of each:
    positions (3, B, T), the others (B, T))."""
    out = {}
    for k in ("input_ids", "positions", "segment_ids", "vision_index"):
        if kw.get(k) is not None:
            out[k] = jax.lax.dynamic_slice_in_dim(kw[k], start, length, axis=kw[k].ndim - 1)
    return out


def prefill_logits(params: Any, kw: dict[str, Any], *, model: Glm4v, cfg: Glm4vConfig, max_len: int,
                   prefill_chunk: int | None = None) -> tuple[jax.Array, Any, jax.Array]:
    """Prompt -> (last-slot logits (B, V) float32, cache of `max_len` slots, kv segment ids (B, S)).

    `prefill_chunk` (a length from `prefill_chunk_length`, or None: one shot): the decoder runs the prompt in
    chunks of that many tokens, a `lax.scan` over the chunks carrying the KV cache, so the temporaries are one
    chunk's. Vision is encoded once, before the loop; each chunk takes its tokens' vision rows by `vision_index` (a
    media span may straddle chunks). Chunk i writes slots [s_i, s_i + C) with s_i = min(i * C, T - C) and attends
    to the whole cache (kv segment ids of the prompt, causal by slot), so a chunk sees the slots the chunks before it
    wrote and its own; the last chunk may overlap the one before, rewriting those slots with the same values. Only
    the last chunk's last slot (every row's last prompt token: rows are left-padded) reaches the lm_head."""
    ids = kw["input_ids"]
    b, t = ids.shape
    cache = init_cache(cfg, b, max_len)
    seg = kw["segment_ids"].astype(jnp.int32)
    kv_seg = jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(seg)
    if prefill_chunk is None or prefill_chunk >= t:
        logits, cache = model.apply(variables(params), **kw, cache=cache, cache_index=jnp.int32(0),
                                    logits_index=jnp.full((b,), t - 1, jnp.int32))  # fresh cache: no kv segment ids
        return logits[:, 0].astype(jnp.float32), cache, kv_seg
    c = int(prefill_chunk)
    n = -(-t // c)
    variables_ = variables(params)
    vt = None
    if kw.get("vision") is not None:
        with jax.named_scope("vision"):
            vt = model.apply(variables_, kw["vision"], method=Glm4v.encode_vision)
    starts = jnp.minimum(jnp.arange(n, dtype=jnp.int32) * c, t - c)
    last = jnp.full((b,), c - 1, jnp.int32)

    def chunk(carry: tuple[Any, jax.Array], start: jax.Array) -> tuple[tuple[Any, jax.Array], None]:
        cache, _ = carry
        part = _slice_tokens(kw, start, c)
        h, cache = model.apply(variables_, **part, vision_tokens=vt, cache=cache, cache_index=start,
                               kv_segment_ids=kv_seg, logits_index=last, return_hidden=True)
        return (cache, h), None

    h0 = jnp.zeros((b, 1, cfg.text.hidden_size), jnp.dtype(cfg.runtime.compute_dtype))
    (cache, h), _ = jax.lax.scan(chunk, (cache, h0), starts)
    logits = model.apply(variables_, h, method=Glm4v.logits)
    return logits[:, 0].astype(jnp.float32), cache, kv_seg


def step_logits(params: Any, cache: Any, kv_seg: jax.Array, slot: jax.Array, pos: jax.Array, tok: jax.Array, *,
                model: Glm4v) -> tuple[jax.Array, Any, jax.Array]:
    """One decode step: token `tok` (B,) into cache slot `slot` at M-RoPE position `pos` (B,) on all 3 rows.
    Returns (logits (B, V) float32, cache, kv_seg)."""
    b = tok.shape[0]
    kv_seg = jax.lax.dynamic_update_slice(kv_seg, jnp.ones((b, 1), jnp.int32), (jnp.int32(0), slot))
    positions = jnp.broadcast_to(pos[None, :, None], (3, b, 1))
    logits, cache = model.apply(variables(params), tok[:, None], positions, jnp.ones((b, 1), jnp.int32),
                                cache=cache, cache_index=slot, kv_segment_ids=kv_seg)
    return logits[:, 0].astype(jnp.float32), cache, kv_seg


def prefill(params: Any, kw: dict[str, Any], pos: jax.Array, limit: jax.Array, think: ThinkState | None,
            key: jax.Array, scalars: dict[str, jax.Array], eos: jax.Array, *, model: Glm4v, cfg: Glm4vConfig,
            max_len: int, sampling: SamplingParams, prefill_chunk: int | None = None) -> DecodeState:
    """Prompt arrays (`requests.PreparedBatch.model_kwargs`) -> the decode state of these rows, first token sampled.

    pos: (B,) M-RoPE position of the first generated token; limit: (B,) max new tokens; think: the rows' initial
    thinking state (`ThinkingBudget.initial_state`) or None; eos: (MAX_EOS,) ids padded with -1; prefill_chunk: the
    decoder's chunk length (`prefill_logits`), None: the prompt in one piece."""
    logits, cache, kv_seg = prefill_logits(params, kw, model=model, cfg=cfg, max_len=max_len,
                                           prefill_chunk=prefill_chunk)
    b = logits.shape[0]
    seen = None
    if sampling.use_repetition_penalty:  # the prompt's tokens (padding excluded), as HF's input_ids
        ids = kw["input_ids"]
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], ids].max(kw["segment_ids"] > 0)
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), sampling, scalars, seen)
    if think is not None:
        tok, think = thinking_step(tok, think)
    if seen is not None:
        seen = seen.at[jnp.arange(b), tok].set(True)
    limit = limit.astype(jnp.int32)
    return DecodeState(cache=cache, kv_seg=kv_seg, index=jnp.int32(kw["input_ids"].shape[1]),
                       pos=pos.astype(jnp.int32), limit=limit, count=jnp.ones((b,), jnp.int32), step=jnp.int32(1),
                       key=key, tok=tok, done=jnp.isin(tok, eos) | (limit <= 1), seen=seen, think=think)


def insert(prefix: DecodeState, state: DecodeState, slot: jax.Array) -> DecodeState:
    """The rows of `prefix` (a `prefill` result of b rows) into rows [slot, slot + b) of a running `state`.

    The prefix's cache rows move along the slots by `state.index - prefix.index` (>= 0: the caller checks it, and
    that the state has room for the row's new tokens), so its prompt ends at the state's next write slot. Shared
    fields (index, step, key, the thinking budget) stay the state's; the prefix and the state must have the same
    cache length and the same optional parts (repetition penalty, thinking)."""
    shift = state.index - prefix.index

    def put(names: tuple, p: jax.Array, s: jax.Array) -> jax.Array:
        if "batch" not in names:
            return s
        if "length" in names:
            p = jnp.roll(p, shift, axis=names.index("length"))
        start = [jnp.int32(0)] * s.ndim
        start[names.index("batch")] = jnp.asarray(slot, jnp.int32)
        return jax.lax.dynamic_update_slice(s, p.astype(s.dtype), start)

    return map_rows(put, prefix, state)


def decode(params: Any, state: DecodeState, scalars: dict[str, jax.Array], eos: jax.Array, pad_id: jax.Array, *,
           model: Glm4v, chunk: int, sampling: SamplingParams) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Up to `chunk` decode steps of every row -> (state, tokens (B, chunk) (-1 past n), n steps run). Rows already
    done emit `pad_id` and keep their state."""
    b = state.tok.shape[0]
    buf = jnp.full((b, chunk), -1, jnp.int32)

    def cond(c):
        st, _, i = c
        return (i < chunk) & ~jnp.all(st.done)

    def body(c):
        st, buf, i = c
        logits, cache, kv_seg = step_logits(params, st.cache, st.kv_seg, st.index, st.pos, st.tok, model=model)
        tok = sample_tokens(logits, jax.random.fold_in(st.key, st.step), sampling, scalars, st.seen)
        think = st.think
        if think is not None:
            tok, think = thinking_step(tok, think)
            think = _keep_done_rows(st.done, st.think, think)
        tok = jnp.where(st.done, pad_id, tok)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (jnp.int32(0), i))
        count = st.count + 1
        seen = None if st.seen is None else st.seen.at[jnp.arange(b), tok].set(True)
        new = st.replace(cache=cache, kv_seg=kv_seg, index=st.index + 1, pos=st.pos + 1, count=count,
                         step=st.step + 1, tok=tok, done=st.done | jnp.isin(tok, eos) | (count >= st.limit),
                         seen=seen, think=think)
        return new, buf, i + 1

    state, buf, n = jax.lax.while_loop(cond, body, (state, buf, jnp.int32(0)))
    return state, buf, n
