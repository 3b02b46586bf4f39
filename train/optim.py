"""The optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, freezing and weight-decay masks (optax).

    tx = chain(clip_by_global_norm(clip_norm),
               multi_transform({"train": chain(scale_by_adam, add_decayed_weights(wd, decay_mask),
                                               scale_by_learning_rate(warmup_cosine)),
                                "frozen": set_to_zero()}, labels))

That is torch's AdamW (decoupled decay, also scaled by the learning rate). Gradient accumulation is not an optax
wrapper: the train step scans over micro-batches itself (train/step.py), so the loss is the token-weighted mean over
the whole accumulated batch.

Parameter groups (from the Flax paths, `param_groups`):
  vision     visual/* except the two below: patch embed, position table, ViT blocks, post norms
  projector  visual/downsample (the 2x2 merge conv) and visual/merger (vision width -> LLM tokens)
  decoder    language_model/* and lm_head
`OptimConfig.freeze` names groups to freeze. Frozen leaves go to `set_to_zero`: no Adam moments are allocated for
them (multi_transform hands the Adam branch a tree with `MaskedNode`s there), and the train step does not even
differentiate them (train/step.py).

Weight decay: none on norm scales and biases (leaf name `scale` or `bias`; the q/k/v biases are 2-D, so the rule
goes by name, not by rank). The token embedding and the vision tower's learned position table are weight matrices
and are decayed like kernels by default, as in GPT-2/Llama recipes (AdamW decay shrinks a row by lr * wd per step,
1e-6 at lr 1e-5, wd 0.1, so rows of tokens that never occur barely move); `decay_embeddings=False` exempts both.

Memory: the fp32 master weights and fp32 Adam moments take 12 bytes per parameter, too much for the 9B model on
small slices; `state_dtype="bfloat16"` halves the moments (train/README.md, "Optimizer memory", has the sums for the
9B checkpoint on a v5e-8). bf16 moments are written with stochastic rounding: with round-to-nearest,
nu <- b2 * nu + (1 - b2) * g^2 with b2 = 0.999 changes nu by 0.1% < half a bf16 ulp (0.2-0.4%), so nu would never
decay; stochastic rounding keeps the update unbiased. The fp32 moments are the default (and what the parity tests use).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm41v_jax.backend import sum_of_squares  # blocked on XLA:CPU (see glm41v_jax/backend.py)
from glm41v_jax.weights import key_names

GROUPS = ("vision", "projector", "decoder")
STATE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 1e-5
    end_lr: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 10_000  # warmup included; the cosine runs from warmup_steps to total_steps
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0  # None or 0: no clipping
    freeze: tuple[str, ...] = ()  # subset of GROUPS
    decay_embeddings: bool = True  # weight decay on the token embedding and the vision position table
    state_dtype: str = "float32"  # Adam mu/nu: "float32" | "bfloat16" (stochastic rounding)
    seed: int = 0  # stochastic rounding of bf16 moments

    def __post_init__(self) -> None:
        bad = [g for g in self.freeze if g not in GROUPS]
        if bad:
            raise ValueError(f"freeze: unknown group(s) {bad}; expected a subset of {', '.join(GROUPS)}")
        if set(self.freeze) == set(GROUPS):
            raise ValueError("freeze: every group is frozen, nothing would train")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}; got {self.state_dtype!r}")
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps < 1:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                             "total_steps >= 1")
        # Ranges (written so that NaN fails them too; the config loader also rejects non-finite numbers).
        ranges = {"peak_lr": (0.0, False), "end_lr": (0.0, False), "weight_decay": (0.0, False), "eps": (0.0, True),
                  "clip_norm": (0.0, False)}
        for name, (low, strict) in ranges.items():
            v = getattr(self, name)
            if name == "clip_norm" and v is None:
                continue
            if not (math.isfinite(v) and (v > low if strict else v >= low)):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {v!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


def lr_schedule(oc: OptimConfig) -> optax.Schedule:
    """0 -> peak_lr linearly over warmup_steps, then cosine to end_lr at total_steps (constant after). With
    warmup_steps == total_steps (the default for runs of up to 100 steps) there is no cosine: the rate rises to
    peak_lr at the last step."""
    if oc.warmup_steps >= oc.total_steps:
        return optax.linear_schedule(0.0, oc.peak_lr, oc.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, oc.peak_lr, oc.warmup_steps, max(oc.total_steps, 1), oc.end_lr)


# ---------------------------------------------------------------------------------------------------------------
# Masks from parameter paths.


def group_of(names: Sequence[str]) -> str:
    """'vision' | 'projector' | 'decoder' for a Flax parameter path (see the module docstring)."""
    if names[0] == "visual":
        return "projector" if len(names) > 1 and names[1] in ("downsample", "merger") else "vision"
    if names[0] in ("language_model", "lm_head"):
        return "decoder"
    raise ValueError(f"parameter {'/'.join(names)} belongs to no group")


def param_groups(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(key_names(p)), params)


def trainable_mask(params: Any, freeze: Sequence[str] = ()) -> Any:
    """True where a leaf trains, False where its group is frozen."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(key_names(p)) not in freeze, params)


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True where weight decay applies: not norm scales, not biases (and not the embedding tables if asked)."""

    def one(path, _):
        names = key_names(path)
        if names[-1] in ("scale", "bias"):
            return False
        return decay_embeddings or names[-1] not in ("embedding", "position_embedding")

    return jax.tree_util.tree_map_with_path(one, params)


# ---------------------------------------------------------------------------------------------------------------
# Adam with bf16 moments.


class ScaleByAdamLowpState(NamedTuple):
    count: jax.Array  # int32
    mu: Any
    nu: Any
    key: jax.Array  # PRNG key (uint32[2]) for stochastic rounding


def stochastic_round(x: jax.Array, key: jax.Array, dtype: Any) -> jax.Array:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"stochastic rounding is implemented for bfloat16, got {dtype}")
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)  # exact: low bits are zero


def scale_by_adam_lowp(b1: float, b2: float, eps: float, state_dtype: Any = jnp.bfloat16, seed: int = 0
                       ) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu and nu stored in `state_dtype` (bf16); the arithmetic is fp32."""
    sd = jnp.dtype(state_dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, sd)
        return ScaleByAdamLowpState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                                    jax.tree.map(zeros, params), jax.random.PRNGKey(seed))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        key, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, 2 * max(len(leaves), 1))
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        c1 = 1.0 - b1 ** count.astype(jnp.float32)
        c2 = 1.0 - b2 ** count.astype(jnp.float32)
        outs, new_mu, new_nu = [], [], []
        for i, (g, m, v) in enumerate(zip(leaves, mus, nus, strict=True)):
            g = g.astype(jnp.float32)
            m32 = b1 * m.astype(jnp.float32) + (1.0 - b1) * g
            v32 = b2 * v.astype(jnp.float32) + (1.0 - b2) * jnp.square(g)
            outs.append((m32 / c1) / (jnp.sqrt(v32 / c2) + eps))
            new_mu.append(stochastic_round(m32, keys[2 * i], sd))
            new_nu.append(stochastic_round(v32, keys[2 * i + 1], sd))
        unflat = treedef.unflatten
        return unflat(outs), ScaleByAdamLowpState(count, unflat(new_mu), unflat(new_nu), key)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.


def global_norm(tree: Any) -> jax.Array:
    """The fp32 L2 norm over all leaves of a tree (None leaves skipped)."""
    return jnp.sqrt(sum(sum_of_squares(x) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm with `global_norm` and a multiplicative scale (torch's clip_grad_norm_ form):
    updates * min(1, max_norm / norm). A scalar multiply (unlike optax's per-element divide) is fused by XLA into
    each consumer of the clipped gradient instead of being written out as one more gradient-sized array.

    `update(..., grad_norm=n)` (an optax extra argument, passed through `optax.chain`) uses a norm the caller has
    already computed (the train step's `grad_norm` metric) instead of reading every gradient a second time."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """The whole transformation (module docstring). Labels and masks are computed from the params it is given."""
    if oc.state_dtype == "float32":
        adam = optax.scale_by_adam(oc.b1, oc.b2, oc.eps)
    else:
        adam = scale_by_adam_lowp(oc.b1, oc.b2, oc.eps, oc.state_dtype, oc.seed)
    train = optax.chain(
        adam,
        optax.add_decayed_weights(oc.weight_decay, mask=lambda p: decay_mask(p, oc.decay_embeddings)),
        optax.scale_by_learning_rate(lr_schedule(oc)),
    )
    labels = lambda p: jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(p, oc.freeze))
    parts = [clip_by_global_norm(oc.clip_norm)] if oc.clip_norm else []
    return optax.chain(*parts, optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels))


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state (abstract or concrete): each leaf that mirrors a parameter (its key path ends
    in that parameter's path, same shape: Adam's mu / nu, whatever their dtype) gets that parameter's sharding;
    everything else (step counts, the rounding key) is replicated."""
    table = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0], strict=True):
        table[key_names(path)] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        tail = []
        for k in reversed(path):  # the trailing run of dict keys is the parameter path inside mu / nu
            if not isinstance(k, jax.tree_util.DictKey):
                break
            tail.append(str(k.key))
        hit = table.get(tuple(reversed(tail)))
        if hit is not None and hit[0] == tuple(leaf.shape):
            return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)
