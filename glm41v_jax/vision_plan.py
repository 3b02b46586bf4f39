"""The vision tower's attention plan (host side, NumPy): dense or grouped, chosen from the segment lengths.

The tower's attention is block-diagonal over segments (one per image or video frame, 0 = padding). The plan decides
how that runs on the device (`vision.grouped_attention`); it is data, carried by `inputs.VisionInputs`.

The block-diagonal attention over S segments of lengths l_1..l_S (contiguous runs of the P packed rows; padding
rows at the end) runs in one of two plans. Costs are in logits per head (query-key pairs).

* dense: one (P x P) masked attention with the segment ids as masks. Cost P**2.
* grouped (segment-major): one or two groups. Group g is an int32 table `attn_groups[g]` of shape (n_g, L_g):
  each row lists the packed rows of one or more whole segments (bin-packed, best-fit decreasing), -1 = empty slot.
  q/k/v are gathered to (n_g, L_g, Nv, Hv) and the one `attention` function runs with batch n_g and segment ids
  gathered the same way (0 for empty slots), so segments sharing a row stay block-diagonal; the outputs go back
  to (P, Nv, Hv) through `attn_inverse` (P,), the flat slot of each packed row (padding rows point one past the
  end and get 0). Cost
      grouped = sum_g [n_g * L_g**2 + ROW_COST * n_g * L_g + GROUP_COST] + ROW_COST * P
  (ROW_COST: the q/k/v/output gathers of a row; GROUP_COST: one more op per block).

Buckets (these bound the number of compiled programs): L_g is a power of two >= 16 and >= the longest segment in
the group; n_g is a power of two >= the group's row count after packing.

Rule (`plan_attention`, from the segment lengths and P):
  1. one group: L = bucket(longest segment), all segments packed into rows of L;
  2. two groups: over the distinct length buckets, the split into "small" and "large" segments (each group with
     its own L and packing) of least cost; taken only if it costs < SPLIT_GAIN (0.6) x the one-group cost, since
     every extra group shape is an extra program to compile;
  3. grouped if its cost < P**2, else dense.
So a single image filling its patch bucket stays dense (L = P); 4 equal images cost 4 L**2 instead of (4 L)**2;
a video of t frames t L**2; one big image with many small ones a group for the big one and a packed group for the
small ones; many tiny segments a few densely packed rows.

A banded (chunked key window) layout is not offered: with static shapes its window must cover the longest segment,
so its cost is >= P * L_max >= sum_i l_i * L_max >= sum_i l_i**2, what the grouped plan reaches up to bucket
rounding; for equal segments it is >= P * (C + 2 L) against P * L for the grouped plan.

Compile keys: the plan lives in `inputs.VisionInputs` as arrays (`attn_groups`: a tuple of (n_g, L_g) int32 arrays;
`attn_inverse`: (P,) int32; `()` and None for dense), so the mode, G, n_g and L_g are part of the pytree structure
and shapes that every jit / AOT cache keys on; nothing else needs to know. Single images and batches of equal
images add no program to the dense path's one per patch bucket; 500 requests of 1-6 images of random sizes (~490
distinct size lists) give ~46 plans over 11 patch buckets (tests/test_vision_attention).

Backends: every group is one call of the one `attention` function with `impl=RuntimeConfig.attention_impl`. The
cost model is that of the materialised-logits paths ("xla", "cudnn" with its (B, 1, T, S) mask). The TPU splash
kernel ("pallas") already skips fully masked tiles of the dense plan, so there the grouped plan mainly saves
the (P x P) mask and the tile padding; the rule is the same for every backend.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

SPLIT_GAIN = 0.6  # two groups only if they cost < SPLIT_GAIN x one group (each distinct shape is a compile)
ROW_COST = 4  # gathers of q, k, v and of the output, per row, in logit units
GROUP_COST = 64 * 64  # fixed cost of one more attention op per block, in logit units
MIN_LENGTH = 16
PLANS = ("auto", "dense", "grouped")  # the `vision_attention` choices


def _pow2(n: int, minimum: int = 1) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def length_bucket(n: int) -> int:
    """Row length of a group: a power of two >= 16."""
    return _pow2(int(n), MIN_LENGTH)


def count_bucket(n: int) -> int:
    """Rows of a group: a power of two."""
    return _pow2(int(n), 1)


def _pack(lens: Sequence[int], members: Sequence[int], length: int) -> list[tuple[int, ...]]:
    """Best-fit-decreasing bin packing of whole segments into rows of `length`; rows list segments in order."""
    rem: list[tuple[int, int]] = []  # sorted (remaining capacity, row)
    rows: list[list[int]] = []
    for s in sorted(members, key=lambda s: (-lens[s], s)):
        i = bisect.bisect_left(rem, (lens[s], -1))
        if i < len(rem):
            r, row = rem.pop(i)
        else:
            r, row = length, len(rows)
            rows.append([])
        rows[row].append(s)
        bisect.insort(rem, (r - lens[s], row))
    return [tuple(sorted(r)) for r in rows]


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The chosen plan: `groups[g] = (n_g, L_g, rows)`, rows = segment indices per row (empty for dense)."""

    mode: str  # "dense" | "grouped"
    groups: tuple[tuple[int, int, tuple[tuple[int, ...], ...]], ...]
    dense_cost: int
    grouped_cost: int  # of the best grouped plan, whether chosen or not

    @property
    def shape_key(self) -> tuple:
        """What the compiled program depends on (besides P)."""
        return (self.mode, tuple((n, length) for n, length, _ in self.groups))


def _group(lens: list[int], members: list[int]) -> tuple[int, tuple]:
    length = length_bucket(max(lens[s] for s in members))
    rows = _pack(lens, members, length)
    n = count_bucket(len(rows))
    return n * length * length + ROW_COST * n * length + GROUP_COST, (n, length, tuple(rows))


def plan_attention(seg_lens: Sequence[int], total: int, mode: str = "auto") -> AttentionPlan:
    """Dense or grouped for segments of `seg_lens` (packed order) in `total` rows (rule: the module docstring)."""
    if mode not in PLANS:
        raise ValueError(f"vision attention plan must be one of {', '.join(PLANS)}; got {mode!r}")
    lens = [int(x) for x in seg_lens]
    dense_cost = int(total) ** 2
    if not lens or mode == "dense":
        return AttentionPlan("dense", (), dense_cost, -1)
    cost, one = _group(lens, list(range(len(lens))))
    best_cost, groups = cost, (one,)
    buckets = [length_bucket(x) for x in lens]
    for cut in sorted(set(buckets))[:-1]:  # small = buckets <= cut
        small = [s for s, b in enumerate(buckets) if b <= cut]
        large = [s for s, b in enumerate(buckets) if b > cut]
        (c1, g1), (c2, g2) = _group(lens, small), _group(lens, large)
        if c1 + c2 < SPLIT_GAIN * cost and c1 + c2 < best_cost:
            best_cost, groups = c1 + c2, (g1, g2)
    best_cost += ROW_COST * int(total)
    use = mode == "grouped" or best_cost < dense_cost
    return AttentionPlan("grouped" if use else "dense", groups if use else (), dense_cost, best_cost)


def plan_tables(seg_lens: Sequence[int], total: int, mode: str = "auto"
                ) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """The arrays of the chosen plan: `((), None)` for dense, else (`attn_groups`: tuple of int32 (n_g, L_g) tables
    of packed rows, -1 = empty slot; `attn_inverse`: int32 (total,), the flat slot of each row over the concatenated
    groups, padding rows `sum_g n_g * L_g`, one past the end). Segments are the runs of `seg_lens` from row 0."""
    plan = plan_attention(seg_lens, total, mode)
    if plan.mode == "dense":
        return (), None
    starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int64)
    n_slots = sum(n * length for n, length, _ in plan.groups)
    inverse = np.full((int(total),), n_slots, np.int32)
    tables = []
    offset = 0
    for n, length, rows in plan.groups:
        table = np.full((n, length), -1, np.int32)
        for r, segs in enumerate(rows):
            idx = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in segs])
            table[r, : len(idx)] = idx
            inverse[idx] = offset + r * length + np.arange(len(idx))
        tables.append(table)
        offset += n * length
    return tuple(tables), inverse
