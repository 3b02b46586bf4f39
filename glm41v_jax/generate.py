"""Autoregressive generation: one compiled prefill program, one compiled decode program, a KV cache on device.

Prefill: the whole prompt (vision tower + decoder) writes slots [0, T) of a zeroed KV cache of `max_len` slots and
samples the first token from the logits of the last prompt slot only. Prompts are left-padded to a length bucket
(`bucket_length`), vision patches are padded to a bucket too (`vision_bucket`), and the cache length is rounded,
so requests of similar size reuse one executable.

Decode: a compiled `lax.while_loop` that runs up to `chunk_size` steps on device (stopping early once every row has
emitted an eos id or `max_new_tokens` is reached) and hands the chunk's tokens back to the host for streaming. The
host dispatches the next chunk before reading the previous one, so the device never waits on the host. The cache
and the loop state are donated to each call (updated in place).

Positions (GLM41V_SPEC §4.5): generated token number i (0-based) of row b sits in cache slot T + i - 1 ... and
has M-RoPE position n_b + i + rope_delta_b on all three rows, where n_b counts the row's *real* prompt tokens
(left padding makes slots and real-token counts differ). Padding slots have kv segment 0 and are never attended.

Executables are compiled ahead of time (`jit(...).lower(...).compile()`) and cached by argument shapes, which
gives exact compile counts (`Engine.num_compiles`) and compile times separate from run times.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Glm4vConfig
from .model import Glm4v, init_cache, prepare_inputs
from .sampling import SamplingParams, sample_tokens

MAX_EOS = 8  # eos ids are passed as a fixed-size array (padded with -1) so that changing them never recompiles


class GenerationError(ValueError):
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
    """Prompt-length bucket: powers of two from `minimum` to 2048, then multiples of 1024."""
    n = max(int(n), 1)
    if n > 2048:
        return _round_up(n, 1024)
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


@dataclasses.dataclass
class PreparedBatch:
    """A left-padded, bucketed batch ready for the prefill program."""

    model_kwargs: dict[str, Any]  # input_ids, positions, segment_ids, vision, vision_index (NumPy)
    prompt_token_ids: list[list[int]]
    next_positions: np.ndarray  # (B,) M-RoPE position of the first generated token
    prompt_len: int  # T, the padded prompt length
    max_len: int  # S, cache slots


def prepare_batch(cfg: Glm4vConfig, inputs: Mapping[str, Any], max_new_tokens: int,
                  prompt_bucket: Callable[[int], int] = bucket_length,
                  patch_bucket: Callable[[int], int] | None = vision_bucket) -> PreparedBatch:
    """Processor output (input_ids, attention_mask, mm_token_type_ids, pixel_values, ...) -> PreparedBatch.

    Rows are re-laid-out left-padded (whatever padding side they came with) to `prompt_bucket(longest)`.
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
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = [ids[b][mask[b] > 0] for b in range(ids.shape[0])]
    if any(len(r) == 0 for r in rows):
        raise GenerationError("empty prompt (a row has no tokens)")
    longest = max(len(r) for r in rows)
    limit = cfg.text.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} is too long for the "
                              f"model's context of {limit} positions")
    t = prompt_bucket(longest)
    bsz = len(rows)
    new_ids = np.full((bsz, t), cfg.text.pad_token_id, np.int32)
    new_mask = np.zeros((bsz, t), np.int32)
    new_types = None if types is None else np.zeros((bsz, t), np.int32)
    for b, r in enumerate(rows):
        new_ids[b, t - len(r):] = r
        new_mask[b, t - len(r):] = 1
        if types is not None:
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
    if int(next_pos.max()) + max_new_tokens > limit:
        raise GenerationError(f"prompt positions reach {int(next_pos.max())} (images and videos take fewer positions "
                              f"than tokens, but still count); + max_new_tokens {max_new_tokens} exceeds the model's "
                              f"context of {limit} positions")
    return PreparedBatch(mi.as_kwargs(), [r.astype(int).tolist() for r in rows], next_pos, t,
                         cache_length(t, max_new_tokens))


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
                                kv_segment_ids=kv_seg, logits_index=jnp.full((b,), t - 1, jnp.int32))
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


def _prefill(params, kw, next_pos, key, scalars, eos, *, model: Glm4v, cfg: Glm4vConfig, max_len: int,
             sampling: SamplingParams):
    logits, cache, kv_seg = _prefill_logits(params, kw, model=model, cfg=cfg, max_len=max_len)
    b = logits.shape[0]
    seen = None
    if sampling.use_repetition_penalty:  # the prompt's tokens (padding excluded), as HF's input_ids
        ids = kw["input_ids"]
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], ids].max(kw["segment_ids"] > 0)
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), sampling, scalars, seen)
    state = {"kv_seg": kv_seg, "slot": jnp.int32(kw["input_ids"].shape[1]), "pos": next_pos.astype(jnp.int32),
             "tok": tok, "done": jnp.isin(tok, eos), "step": jnp.int32(1), "key": key}
    if seen is not None:
        state["seen"] = seen.at[jnp.arange(b), tok].set(True)
    return cache, state


def _decode(params, cache, state, max_new, scalars, eos, pad_id, *, model: Glm4v, chunk: int,
            sampling: SamplingParams):
    b = state["tok"].shape[0]
    buf = jnp.full((b, chunk), -1, jnp.int32)

    def cond(c):
        _, st, _, i = c
        return (i < chunk) & ~jnp.all(st["done"]) & (st["step"] < max_new)

    def body(c):
        cache, st, buf, i = c
        logits, cache, kv_seg = _step_logits(params, cache, st["kv_seg"], st["slot"], st["pos"], st["tok"],
                                             model=model)
        tok = sample_tokens(logits, jax.random.fold_in(st["key"], st["step"]), sampling, scalars, st.get("seen"))
        tok = jnp.where(st["done"], pad_id, tok)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (jnp.int32(0), i))
        st = {"kv_seg": kv_seg, "slot": st["slot"] + 1, "pos": st["pos"] + 1, "tok": tok,
              "done": st["done"] | jnp.isin(tok, eos), "step": st["step"] + 1, "key": st["key"]}
        if "seen" in c[1]:
            st["seen"] = c[1]["seen"].at[jnp.arange(b), tok].set(True)
        return cache, st, buf, i + 1

    cache, state, buf, n = jax.lax.while_loop(cond, body, (cache, state, buf, jnp.int32(0)))
    return cache, state, buf, n


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


# ---------------------------------------------------------------------------------------------------------------
# Engine.


class Engine:
    """Holds the params on device and the compiled prefill / decode executables of one model.

    `generate_batch` / `generate` serve requests; `num_compiles` counts the executables built so far.
    """

    def __init__(self, params: Any, cfg: Glm4vConfig, *, chunk_size: int = 16,
                 prompt_bucket: Callable[[int], int] = bucket_length,
                 patch_bucket: Callable[[int], int] | None = vision_bucket) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.cfg = cfg
        self.model = Glm4v(cfg)
        self.params = jax.device_put(params)
        self.chunk_size = int(chunk_size)
        self.prompt_bucket = prompt_bucket
        self.patch_bucket = patch_bucket
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # all compiles of this engine
        self._last_compile_s = 0.0  # compiles of the current request

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def _executable(self, kind: str, statics: dict[str, Any], args: tuple, donate: tuple[int, ...] = ()) -> Any:
        key = (kind, tuple(sorted(statics.items(), key=lambda kv: kv[0])), _signature(args[1:]))
        exe = self._compiled.get(key)
        if exe is None:
            fn = {"prefill": _prefill, "decode": _decode}[kind]
            t0 = time.perf_counter()
            exe = jax.jit(functools.partial(fn, model=self.model, **statics), donate_argnums=donate
                          ).lower(*args).compile()
            dt = time.perf_counter() - t0
            self.compile_seconds += dt
            self._last_compile_s += dt
            self._compiled[key] = exe
        return exe

    def generate_batch(
        self,
        inputs: Mapping[str, Any],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        stream_callback: Callable[[list[list[int]]], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every row of a (possibly padded) batch. `eos_ids=()` disables stopping on eos.

        `stream_callback(new_tokens_per_row)` is called with each chunk of new tokens (rows that already stopped
        get an empty list).
        """
        sampling = sampling or SamplingParams()
        eos = tuple(self.cfg.text.eos_token_ids if eos_ids is None else eos_ids)
        if len(eos) > MAX_EOS:
            raise GenerationError(f"at most {MAX_EOS} eos ids are supported, got {len(eos)}")
        eos_arr = np.full((MAX_EOS,), -1, np.int32)
        eos_arr[: len(eos)] = eos
        eos_set = set(int(e) for e in eos)
        prep = prepare_batch(self.cfg, inputs, max_new_tokens, self.prompt_bucket, self.patch_bucket)
        bsz = len(prep.prompt_token_ids)
        self._last_compile_s = 0.0
        scalars = jax.tree.map(np.asarray, sampling.scalars())
        key = jax.random.PRNGKey(seed)
        kw = jax.tree.map(jnp.asarray, prep.model_kwargs)

        pargs = (self.params, kw, prep.next_positions, key, scalars, eos_arr)
        prefill = self._executable("prefill", dict(cfg=self.cfg, max_len=prep.max_len, sampling=sampling.canonical()),
                                   pargs)
        t0 = time.perf_counter()
        cache, state = prefill(*pargs)
        first = np.asarray(state["tok"])
        prefill_s = time.perf_counter() - t0

        out: list[list[int]] = [[int(x)] for x in first]
        done = [int(x) in eos_set for x in first]
        if stream_callback is not None:
            stream_callback([list(r) for r in out])

        max_new = np.int32(max_new_tokens)
        pad_id = np.int32(self.cfg.text.pad_token_id)
        statics = dict(chunk=self.chunk_size, sampling=sampling.canonical())
        steps = 1
        t_dec = time.perf_counter()
        decode_compile_s = 0.0
        pending = None

        def finished() -> bool:
            return all(done) or steps >= max_new_tokens

        while True:
            # Dispatch the next chunk before reading the previous one: `done`/`steps` lag one chunk behind, and a
            # chunk dispatched after the end returns at once with no tokens.
            nxt = None
            if not finished():
                dargs = (self.params, cache, state, max_new, scalars, eos_arr, pad_id)
                c0 = self._last_compile_s
                exe = self._executable("decode", statics, dargs, donate=(1, 2))
                decode_compile_s += self._last_compile_s - c0
                cache, state, buf, n = exe(*dargs)
                nxt = (buf, n)
            if pending is not None:
                buf_np, n_np = np.asarray(pending[0]), int(pending[1])
                new: list[list[int]] = [[] for _ in range(bsz)]
                for b in range(bsz):
                    for tok in buf_np[b, :n_np]:
                        if done[b]:
                            break
                        new[b].append(int(tok))
                        done[b] = int(tok) in eos_set
                    out[b].extend(new[b])
                steps += n_np
                if stream_callback is not None and n_np:
                    stream_callback(new)
            if nxt is None:
                break
            pending = nxt
        decode_s = time.perf_counter() - t_dec - decode_compile_s
        n_decoded = steps - 1
        timings = {
            "compile_s": self._last_compile_s,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": (n_decoded / decode_s) if decode_s > 0 and n_decoded else 0.0,
            "prompt_tokens": float(max(len(p) for p in prep.prompt_token_ids)),
            "prompt_bucket": float(prep.prompt_len),
        }
        results = []
        for b in range(bsz):
            toks = out[b][:max_new_tokens]
            reason = "eos" if toks and toks[-1] in eos_set else "length"
            results.append(GenerationResult(toks, prep.prompt_token_ids[b], reason, dict(timings), self.num_compiles))
        return results

    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 seed: int = 0, eos_ids: Sequence[int] | None = None,
                 stream_callback: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """One prompt (batch of 1). `stream_callback(new_token_ids)` is called per chunk."""
        cb = None if stream_callback is None else (lambda rows: stream_callback(rows[0]) if rows[0] else None)
        res = self.generate_batch(inputs, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                  eos_ids=eos_ids, stream_callback=cb)
        if len(res) != 1:
            raise GenerationError(f"generate() takes one prompt, got a batch of {len(res)}; use generate_batch()")
        return res[0]


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
    """The cached Engine for this params object and config (a few are kept)."""
    key = (id(params), cfg, tuple(sorted(engine_kw.items())))
    hit = _ENGINES.get(key)
    if hit is not None and hit[0] is params:
        return hit[1]
    if len(_ENGINES) >= 4:
        _ENGINES.pop(next(iter(_ENGINES)))
    eng = Engine(params, cfg, **engine_kw)
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
    max_new_tokens: int = 256,
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
