"""Next-token selection: greedy, temperature, top-k, top-p, with transformers' semantics and order.

An optional repetition penalty (HF `RepetitionPenaltyLogitsProcessor`, a processor, so it runs first and also
in greedy mode) needs the set of tokens already in each sequence.
HF applies its warpers in this order (`GenerationMixin._get_logits_processor`): `TemperatureLogitsWarper`
(scores / T), `TopKLogitsWarper` (drop scores < the k-th largest; ties at the k-th value survive),
`TopPLogitsWarper` (sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep the
most likely one). Dropped scores become -inf. `process_logits` reproduces that on full (B, V) logits;
`sample_tokens` picks tokens, taking a cheaper path when top-k is set (the sampling then runs over the k survivors
only, which is the same distribution). Randomness comes from an explicit JAX PRNG key: a fixed seed gives the same
tokens on the same device and program.

`top_k` is a static (compile-time) integer so that `lax.top_k` can be used; temperature and top_p are traced
scalars and never cause a recompile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp

from .errors import Glm41vError

FILTER_VALUE = -jnp.inf
INT32_MAX = 2**31 - 1


class SamplingError(Glm41vError, ValueError):
    """A sampling setting of the wrong type or out of range; the message names the setting and where it came from."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    if v is None or isinstance(v, (bool, numbers.Number, str)):
        r = repr(v)
        return r if len(r) <= 40 else r[:37] + "..."
    return f"a {type(v).__name__}"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `greedy=True` ignores the other fields (argmax, like HF do_sample=False)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applied before the warpers, in greedy mode too (as HF)

    def __post_init__(self) -> None:
        if not isinstance(self.greedy, bool):
            raise SamplingError(f"greedy must be True or False, got {_show(self.greedy)}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {_show(self.repetition_penalty)}")
        if not _is_number(self.temperature):
            raise SamplingError(f"temperature must be a finite number, got {_show(self.temperature)}")
        if self.top_k is not None and not (_is_int(self.top_k) and 0 <= self.top_k <= INT32_MAX):
            raise SamplingError(f"top_k must be an integer in [0, {INT32_MAX}], got {_show(self.top_k)}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise SamplingError(f"top_p must be a number in [0, 1], got {_show(self.top_p)}")
        if not self.greedy and not self.temperature > 0.0:
            raise SamplingError(f"temperature must be > 0 when sampling, got {self.temperature} (for argmax "
                                "decoding use greedy=True)")

    @property
    def static_key(self) -> tuple:
        """What the compiled program depends on (the rest is passed as traced scalars)."""
        if self.greedy:
            return ("greedy", self.use_repetition_penalty)
        return ("sample", self.top_k or 0, self.use_top_p, self.use_repetition_penalty)

    def canonical(self) -> SamplingParams:
        """The same static choices with placeholder traced values: one compiled program serves every temperature
        and top_p."""
        rp = 1.5 if self.use_repetition_penalty else 1.0
        if self.greedy:
            return SamplingParams(repetition_penalty=rp)
        return SamplingParams(greedy=False, temperature=1.0, top_k=self.top_k or None,
                              top_p=0.5 if self.use_top_p else None, repetition_penalty=rp)

    @property
    def use_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def use_top_p(self) -> bool:
        return (not self.greedy) and self.top_p is not None and self.top_p < 1.0

    def scalars(self) -> dict[str, jax.Array]:
        """The traced part: temperature, top_p and repetition_penalty as float32 scalars."""
        return {"temperature": jnp.float32(self.temperature),
                "top_p": jnp.float32(self.top_p if self.use_top_p else 1.0),
                "repetition_penalty": jnp.float32(self.repetition_penalty)}


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: for tokens already in the sequence (`seen` (B, V) bool), negative
    scores are multiplied by the penalty and positive ones divided by it."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """HF TemperatureLogitsWarper: scores / temperature."""
    return logits / temperature


def apply_top_k(logits: jax.Array, top_k: int, min_tokens_to_keep: int = 1) -> jax.Array:
    """HF TopKLogitsWarper: scores below the k-th largest become -inf (ties with the k-th value are kept)."""
    k = min(max(int(top_k), min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, FILTER_VALUE, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array | float, min_tokens_to_keep: int = 1) -> jax.Array:
    """HF TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability is <= 1 - top_p.

    Implemented with a threshold (the smallest kept sorted score) instead of a scatter; identical unless scores tie
    exactly at the threshold, where all tied tokens are kept.
    """
    sorted_logits = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove = cum <= (1.0 - top_p)
    n = logits.shape[-1]
    keep_tail = jnp.arange(n) >= n - min_tokens_to_keep
    remove = remove & ~keep_tail
    # Kept entries form a suffix of the ascending order: the threshold is the first kept sorted value.
    first_kept = jnp.sum(remove, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, first_kept, axis=-1)
    return jnp.where(logits < threshold, FILTER_VALUE, logits)


def process_logits(logits: jax.Array, temperature: jax.Array | float = 1.0, top_k: int | None = None,
                   top_p: jax.Array | float | None = None) -> jax.Array:
    """Temperature, then top-k, then top-p, exactly in HF's order. logits (..., V) -> processed (..., V) float32."""
    x = apply_temperature(logits.astype(jnp.float32), temperature)
    if top_k:
        x = apply_top_k(x, top_k)
    if top_p is not None:
        x = apply_top_p(x, top_p)
    return x


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams,
                  scalars: dict[str, jax.Array] | None = None, seen: jax.Array | None = None) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32. `scalars` (from `params.scalars()`) may be traced values; `seen`
    (B, V) bool marks the tokens already in each sequence (needed when the repetition penalty is on)."""
    scalars = params.scalars() if scalars is None else scalars
    if params.use_repetition_penalty:
        if seen is None:
            raise ValueError("the repetition penalty needs `seen`")
        logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, scalars["repetition_penalty"])
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = scalars["temperature"]
    top_p = scalars["top_p"] if params.use_top_p else None
    x = logits.astype(jnp.float32)
    if params.top_k:
        # Only the k survivors can be drawn: sample among them (same distribution, no full-vocabulary sort).
        k = min(int(params.top_k), x.shape[-1])
        vals, idx = jax.lax.top_k(x, k)  # descending
        vals = apply_temperature(vals, temperature)
        if top_p is not None:
            vals = apply_top_p(vals, top_p)
        choice = jax.random.categorical(key, vals, axis=-1)
        return jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    x = process_logits(x, temperature, None, top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# generation_config.json: the checkpoint's sampling defaults.

GENERATION_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id")


def read_generation_config(directory: str | os.PathLike | None) -> tuple[dict[str, Any], str | None]:
    """The sampling fields of `directory/generation_config.json`, checked: ({field: value}, path) or ({}, None) when
    there is no such file. A file that is not UTF-8 JSON holding an object, or a field of the wrong type or out of
    range, is a SamplingError naming the file and the field. Fields set to null count as absent."""
    if directory is None:
        return {}, None
    path = os.path.join(os.fspath(directory), "generation_config.json")
    if not os.path.isfile(path):
        return {}, None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SamplingError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except RecursionError:
        raise SamplingError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        raise SamplingError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SamplingError(f"{path}: expected a JSON object, got {type(data).__name__}")
    checks = {
        "do_sample": (lambda v: isinstance(v, bool), "true or false"),
        "temperature": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
        "top_k": (lambda v: _is_int(v) and 0 <= v <= INT32_MAX, f"an integer in [0, {INT32_MAX}]"),
        "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "eos_token_id": (lambda v: (_is_int(v) and 0 <= v <= INT32_MAX) or (
            isinstance(v, list) and len(v) > 0 and all(_is_int(x) and 0 <= x <= INT32_MAX for x in v)),
            "a token id or a non-empty list of token ids"),
    }
    out: dict[str, Any] = {}
    for name, (ok, expected) in checks.items():
        v = data.get(name)
        if v is None:
            continue
        if not ok(v):
            raise SamplingError(f"{path}: field {name!r}: expected {expected}, got {_show(v)}")
        out[name] = v
    return out, path


def resolve_sampling(gen: dict[str, Any], source: str | None, *, greedy: bool = False,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float | None = None) -> SamplingParams:
    """SamplingParams from explicit settings (None: not given) over the checkpoint's defaults `gen` (from
    `read_generation_config`, read from `source`).

    Sampling is on when any of temperature / top_k / top_p is given, else when `gen` says do_sample; `greedy` turns
    it off. Like transformers, a temperature of 0 is not read as greedy: sampling with it is an error, which names
    where the 0 came from.
    """
    explicit = any(v is not None for v in (temperature, top_k, top_p))
    sample = not greedy and (explicit or bool(gen.get("do_sample", False)))
    src = source or "generation_config.json"

    def pick(name: str, given: Any, default: Any) -> tuple[Any, str]:
        if given is not None:
            return given, f"--{name.replace('_', '-')}"
        if gen.get(name) is not None:
            return gen[name], f"{name!r} in {src}"
        return default, "the default"

    t, t_from = pick("temperature", temperature, 1.0)
    rp, rp_from = pick("repetition_penalty", repetition_penalty, 1.0)
    k, k_from = pick("top_k", top_k, None)
    p, p_from = pick("top_p", top_p, None)
    for v, name, where, ok, expected in (
        (rp, "repetition_penalty", rp_from, _is_number(rp) and rp > 0, "a finite number > 0"),
        (t, "temperature", t_from, _is_number(t) and (t > 0 or not sample), "a finite number > 0"),
        (k, "top_k", k_from, k is None or (_is_int(k) and 0 <= k <= INT32_MAX), f"an integer in [0, {INT32_MAX}]"),
        (p, "top_p", p_from, p is None or (_is_number(p) and 0 <= p <= 1), "a number in [0, 1]"),
    ):
        if not ok:
            why = ""
            if name == "temperature" and _is_number(v) and v == 0:
                why = (" (transformers refuses to sample at temperature 0 too; pass --greedy for argmax decoding, "
                       "or --temperature T)")
            when = " when sampling" if name == "temperature" else ""
            raise SamplingError(f"{name} {_show(v)} from {where}: expected {expected}{when}{why}")
    return SamplingParams(greedy=not sample, temperature=float(t), top_k=k, top_p=None if p is None else float(p),
                          repetition_penalty=float(rp))
