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

import jax
import jax.numpy as jnp

FILTER_VALUE = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `greedy=True` ignores the other fields (argmax, like HF do_sample=False)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applied before the warpers, in greedy mode too (as HF)

    def __post_init__(self) -> None:
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.greedy:
            if not (self.temperature > 0.0):
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")
            if self.top_p is not None and not (0.0 <= self.top_p <= 1.0):
                raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

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
