"""Generation's public face: `generate` / `generate_batch` on (params, cfg), and the names user code imports.

The work lives in four modules, one concern each:
  buckets.py    static-shape buckets (prompt, vision patches, cache slots) and KV-cache sizes
  requests.py   host side: collate, prepare_batch (bucketing and every limit check), synthetic warmup inputs
  decode.py     the pure device programs (prefill, insert, decode) over a typed DecodeState
  engine.py     the Engine: params on the device, shardings, compiled programs (programs.py), the serving loop

The functional API builds an `Engine` per call that serves the caller's params as they are: device params in their
own layout and sharding (no re-layout, no second copy on the device, never consumed), host (NumPy) params copied to
the device for the call. Its compiled programs come from one module-level cache (`programs.SHARED`, executables
only, keyed by config, static choices and shapes), so calls with the same shapes compile once. To serve many
requests, build an `Engine` once: it re-lays the params out for the platform and keeps them on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from .buckets import format_bytes, kv_cache_bytes
from .config import Glm4vConfig
from .engine import Engine
from .programs import SHARED
from .requests import GenerationError, GenerationResult, synthetic_inputs
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationError", "GenerationResult", "format_bytes", "generate", "generate_batch",
           "kv_cache_bytes", "synthetic_inputs"]


def _engine(params: Any, cfg: Glm4vConfig, chunk_size: int) -> Engine:
    """An Engine over the caller's params, sharing the module's compiled programs. Device params keep their layout
    (no second copy of them); host params take the platform's layout as they are copied to the device."""
    on_device = any(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    return Engine(params, cfg, chunk_size=chunk_size, donate=False, programs=SHARED,
                  kernel_layout=cfg.runtime.kernel_layout if on_device else None)


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
    sampling = _sampling(greedy, temperature, top_k, top_p, repetition_penalty)
    return _engine(params, cfg, chunk_size).generate(inputs, max_new_tokens=max_new_tokens, sampling=sampling,
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
    sampling = _sampling(greedy, temperature, top_k, top_p, repetition_penalty)
    return _engine(params, cfg, chunk_size).generate_batch(inputs, max_new_tokens=max_new_tokens, sampling=sampling,
                                                           seed=seed, eos_ids=eos_ids,
                                                           stream_callback=stream_callback)
