"""Compiled generation programs, cached by what they depend on.

A program is compiled ahead of time (`jit(...).lower(...).compile()`) and cached by its kind ("prefill", "insert",
"decode"), the config, the static choices (cache length, chunk, sampling mode) and the shapes and dtypes of its
arguments. That gives exact compile counts, compile times separate from run times, and one log line per compile
(logger "glm41v_jax.generate", naming the shape key). A cache holds executables only, never params: the params are
an argument of every program.

Each `Engine` has its own `ProgramCache`; the functional `generate(params, cfg, ...)` API shares `SHARED`, so calls
with the same shapes compile once, whatever params object they pass.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The public name of generation's compile log (the CLI shows it on stderr), kept when the engine moved to engine.py.
log = logging.getLogger("glm41v_jax.generate")


def signature(tree: Any) -> tuple:
    """The shapes, dtypes and structure of a pytree: what a compiled program is specialised on."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


def describe(kind: str, statics: Mapping[str, Any], args: tuple) -> str:
    """A short human-readable description of a compiled program (for the compile log)."""
    parts = [kind]
    if kind == "prefill":
        kw = args[1]
        b, t = np.shape(kw["input_ids"])
        parts.append(f"batch={b} prompt={t} cache={statics['max_len']}")
        if statics.get("prefill_chunk"):
            parts.append(f"prefill_chunk={statics['prefill_chunk']}")
        if kw.get("vision") is not None:
            parts.append(f"patches={kw['vision'].num_patches}")
    elif kind == "decode":
        b, s = np.shape(args[1].kv_seg)
        parts.append(f"batch={b} cache={s} chunk={statics['chunk']}")
    else:
        parts.append(f"rows={np.shape(args[0].kv_seg)[0]} into batch={np.shape(args[1].kv_seg)[0]}")
    if "sampling" in statics:
        parts.append(f"sampling={statics['sampling'].static_key}")
    return " ".join(parts)


class ProgramCache:
    """Compiled executables by key, in compile order; with `max_programs`, the least recently used goes first."""

    def __init__(self, max_programs: int | None = None) -> None:
        self.max_programs = max_programs
        self.compiling: str | None = None
        self._entries: collections.OrderedDict[tuple, tuple[str, Any, str, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if self.max_programs is not None:
            self._entries.move_to_end(key)
        return hit[1]

    def compile(self, key: tuple, kind: str, desc: str, build: Callable[[], Any]) -> tuple[Any, float]:
        """Compile with `build()` and keep the executable under `key`; returns it and the seconds it took."""
        t0 = time.perf_counter()
        self.compiling = kind  # what a compile error was raised by (glm41v plan names it)
        exe = build()
        self.compiling = None
        dt = time.perf_counter() - t0
        self._entries[key] = (kind, exe, desc, dt)
        if self.max_programs is not None and len(self._entries) > self.max_programs:
            self._entries.popitem(last=False)
        log.info("compiled %s in %.2fs (%d programs)", desc, dt, len(self._entries))
        return exe, dt

    def entries(self) -> list[tuple[str, Any, str, float]]:
        """(kind, executable, shape key, compile seconds) of every program held, in order."""
        return list(self._entries.values())


# The functional API's executables (they hold no params); a few dozen programs at most.
SHARED = ProgramCache(max_programs=32)
