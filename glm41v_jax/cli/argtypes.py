"""Validating argparse `type=` callables: one per kind of number, so that every flag checks its range the same way.

A bad value becomes argparse's error (`error: argument --max-new-tokens: expected an integer in [1, 2147483647],
got '1e20'`, exit code 2; `glm41v_jax.cli` prints it as one line) instead of a traceback further down.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

INT32_MAX = 2**31 - 1  # token counts and sizes end up in int32 device arrays
SEED_MAX = 2**32 - 1  # jax.random.PRNGKey keeps the low 32 bits of a seed (x64 off): larger seeds alias smaller ones


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi] (decimal, no exponent)."""

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {_show(text)}")
        return v

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
             hint: str = "") -> Callable[[str], float]:
    """A finite number in the range lo..hi (each end open or closed)."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or math.isinf(hi) else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number in {rng}, got {_show(text)}{hint}")
        return v

    parse.__name__ = "number"
    return parse


positive_int = int_in(1, INT32_MAX)
count = int_in(0, INT32_MAX)
seed = int_in(0, SEED_MAX)
