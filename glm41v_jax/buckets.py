"""Static-shape buckets of generation: prompt length, packed vision patches, KV-cache slots, and their byte sizes.

Requests of similar size round to the same buckets, so they reuse one compiled program (`engine.Engine`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import Glm4vConfig


def round_up(n: int, m: int) -> int:
    """`n` rounded up to a multiple of `m`."""
    return -(-n // m) * m


def bucket_length(n: int, minimum: int = 32) -> int:
    """Prompt-length bucket: powers of two from `minimum` to 256, then multiples of 64 to 2048, of 256 to 8192,
    then of 1024. Padding stays under 25% above 256 tokens (prefill cost is linear in the bucket), with at most
    ~56 buckets up to 8192 tokens."""
    n = max(int(n), 1)
    if n > 8192:
        return round_up(n, 1024)
    if n > 2048:
        return round_up(n, 256)
    if n > 256:
        return round_up(n, 64)
    b = minimum
    while b < n:
        b *= 2
    return b


def vision_bucket(n: int, multiple: int = 4, minimum: int = 64) -> int:
    """Packed-patch bucket: powers of two from `minimum` to 4096, then multiples of 2048 (all multiples of 4)."""
    if n > 4096:
        return round_up(n, max(2048, multiple))
    b = minimum
    while b < n:
        b *= 2
    return round_up(b, multiple)


def cache_length(prompt_bucket: int, max_new_tokens: int, multiple: int = 128) -> int:
    """KV-cache slots: the prompt bucket plus room for the new tokens, rounded up."""
    return round_up(prompt_bucket + max_new_tokens, multiple)


def kv_cache_bytes(cfg: Glm4vConfig, batch: int, max_len: int, dtype: Any = None) -> int:
    """Bytes of the KV cache for `batch` rows of `max_len` slots (keys and values, every layer)."""
    t = cfg.text
    itemsize = np.dtype(jnp.dtype(dtype or cfg.runtime.compute_dtype)).itemsize
    return 2 * t.num_hidden_layers * batch * max_len * t.num_key_value_heads * t.head_dim * itemsize


def format_bytes(n: float) -> str:
    """A byte count for people: "512 B", "1.50 MiB", "9.37 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
