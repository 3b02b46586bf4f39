"""The LoRA train step: gradients for the adapters only, the base model closed over.

    ts = LoraTrainStep(cfg, OptimConfig(peak_lr=2e-4), mesh, StepConfig(), LoraConfig(rank=8, alpha=16))
    ts.load_base(model_dir)                 # the frozen base, placed once (float, or int8/int4: QLoRA)
    adapters = ts.init_adapters(seed)       # A random (PEFT's init), B zero: step 0 is the base model exactly
    opt_state = ts.init_opt_state(adapters)
    adapters, opt_state, metrics = ts(adapters, opt_state, batch)

A `TrainStep` whose "params" are the adapter tree (`lora` collection of glm41v_jax/lora.py): `abstract_params`,
`param_shardings`, the optimizer and its state, the checkpoints (train/checkpoint.py saves what the loop calls
params) and the evaluator all see the adapters only. The base is an argument of the jitted step that is neither
differentiated nor donated nor returned: `jax.value_and_grad` is taken of the loss as a function of the adapters,
with the base passed through, so XLA computes no weight gradient for it, keeps no optimizer state for it, and never
copies it (it stays in its shardings from `load_base` for the whole run). Gradient accumulation, clipping, the
non-finite guard and the learning-rate schedule are the full step's. Adapter dropout draws its masks from
fold_in(key(optim.seed + 2), step), so a resumed run draws the same ones.

The base is loaded from the model directory as `glm41v loss` and full training load it (`params.place_unrolled`:
each device's shard cut on the host), in `step.param_dtype`, or as the int8/int4 codes and fp32 scales of a quantized
converted directory (QLoRA; the stored scheme comes from the directory, `quant` here).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glm41v_jax import lora as LO
from glm41v_jax.config import Glm4vConfig, LoraConfig
from glm41v_jax.loading import load
from glm41v_jax.model import abstract_params
from glm41v_jax.quant_checkpoint import QuantizedCheckpointError, checkpoint_quantization
from glm41v_jax.sharding import param_shardings, unbox, under_mesh
from glm41v_jax.weights import key_names

from .loss import label_count, loss_and_count
from .optim import GROUPS, OptimConfig, global_norm, group_of, lr_schedule
from .params import place_unrolled
from .step import StepConfig, TrainStep, _schedule_count, apply_updates, train_config


def compute_lora_grads(adapters: Any, base: Any, batch: Mapping[str, Any], cfg: Glm4vConfig, sc: StepConfig,
                       key: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(mean token loss, label tokens, gradients of the mean loss w.r.t. the adapters) over the whole (accumulated)
    batch; the base is a constant of the differentiated function. `key`: the adapters' dropout (one per micro-batch;
    unused without dropout)."""
    mbs = batch if sc.accum_steps > 1 else jax.tree.map(lambda x: x[None], batch)
    count = label_count(mbs["labels"], mbs["segment_ids"])
    denom = jnp.maximum(count, 1.0)
    dropout = cfg.runtime.lora.dropout > 0
    train = jax.tree.map(lambda x: x.astype(sc.grad_dtype), adapters)

    def micro_loss(a, mb, k):
        s, _ = loss_and_count(base, mb, cfg, chunk_size=sc.loss_chunk, lora=a, dropout_rng=k if dropout else None)
        return s / denom

    grad_fn = jax.value_and_grad(micro_loss)
    if sc.accum_steps == 1:
        loss, grads = grad_fn(train, batch, key)
    else:
        keys = jax.random.split(key, sc.accum_steps)

        def body(carry, xs):
            acc, total = carry
            loss, g = grad_fn(train, *xs)
            return (jax.tree.map(jnp.add, acc, g), total + loss), None

        (grads, loss), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, train), jnp.zeros((), jnp.float32)),
                                        (mbs, keys))
    return loss, count, grads


def dropout_key(oc: OptimConfig, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(oc.seed + 2), step)


def lora_train_step(adapters: Any, opt_state: Any, batch: Mapping[str, Any], base: Any, *, cfg: Glm4vConfig,
                    sc: StepConfig, oc: OptimConfig, tx: Any) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step of the adapters (unjitted; `LoraTrainStep` jits it with shardings, donating the adapters
    and the optimizer state, not the base)."""
    step = _schedule_count(opt_state)
    with jax.named_scope("grads"):
        loss, count, grads = compute_lora_grads(adapters, base, batch, cfg, sc, dropout_key(oc, step))
    grad_norm = global_norm(grads)
    with jax.named_scope("optimizer"):
        updates, new_opt_state = tx.update(grads, opt_state, adapters, grad_norm=grad_norm)
        new = apply_updates(adapters, updates, jax.random.fold_in(jax.random.key(oc.seed + 1), step))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # as train_step: a non-finite step is not applied
    adapters, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (new, new_opt_state),
                                       (adapters, opt_state))
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": lr_schedule(oc)(step),
               "step": step + 1}
    return adapters, opt_state, metrics


class LoraTrainStep(TrainStep):
    """`TrainStep` over the adapters of `lora`, with the base model held in `self.base` (module docstring).

    `quant`: the base's quantization (`RuntimeConfig` fields: quantize, quant_group_size, quant_skip), as
    `quant_checkpoint.checkpoint_quantization(model_dir)` reads it; {} for a float base. `quantize_at_load`: the base
    is a float checkpoint that `load_base` quantizes to `quant` (QLoRA from a float checkpoint)."""

    def __init__(self, cfg: Glm4vConfig, oc: OptimConfig, mesh: Mesh | None = None, sc: StepConfig | None = None,
                 lora: LoraConfig | None = None, quant: Mapping[str, Any] | None = None,
                 quantize_at_load: bool = False):
        if lora is None:
            raise ValueError("LoraTrainStep needs a LoraConfig")
        self.sc = sc or StepConfig()
        self.oc = oc
        self._setup(LO.with_lora(train_config(cfg, self.sc).with_runtime(**dict(quant or {})), lora), mesh,
                    LO.abstract_adapters)
        base_boxed = abstract_params(self.cfg)
        self.base_abstract = unbox(base_boxed)
        self.base_shardings = param_shardings(base_boxed, self.mesh)
        self.base: Any = None
        self._load_quant = dict(quant or {}) if quantize_at_load else {}

    def flop_counter(self, freeze: Sequence[str] = ()) -> Any:
        """Model FLOPs of a LoRA step: the base's matmuls forward, and backward (input gradients only, no weight
        gradients) from the first group that carries adapters on; the adapters' own matmuls are not counted."""
        from .metrics import FlopCounter

        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]]
        with_adapters = {group_of(key_names(p)) for p in paths}
        frozen = tuple(g for g in GROUPS if g in freeze or g not in with_adapters)
        return FlopCounter(self.cfg, self.base_abstract, frozen, weight_grads=False)

    # -- the base and the adapters --------------------------------------------------------------------------------

    def load_base(self, model_dir: str) -> None:
        """The base model's weights from `model_dir` (read on every host as NumPy, each device's shard placed)."""
        params, _ = load(model_dir, as_numpy=True, **self._load_quant)
        self.set_base(params)

    def set_base(self, params: Any) -> None:
        """Unrolled host params (or already placed ones in the step's layout) -> `self.base`."""
        target = types.SimpleNamespace(abstract_params=self.base_abstract, param_shardings=self.base_shardings)
        if "layers" in params.get("language_model", {}):  # already stacked: placed as they are
            self.base = jax.tree.map(lambda x, a, s: jax.device_put(jnp.asarray(x, a.dtype), s), params,
                                     self.base_abstract, self.base_shardings)
        else:
            self.base = place_unrolled(params, target)

    def init_adapters(self, seed: int) -> Any:
        """Fresh adapters (lora_a random, lora_b zero), placed in their shardings."""
        fn = jax.jit(lambda k: LO.init_adapters(self.cfg, k), out_shardings=self.param_shardings)
        return fn(jax.random.PRNGKey(seed))

    def identity(self) -> dict[str, str]:
        """The base model's identity (lora.base_identity), recorded with the adapters."""
        return LO.base_identity(self.base, self.cfg)

    def _need_base(self) -> Any:
        if self.base is None:
            raise ValueError("the LoRA step has no base model: call load_base() or set_base() first")
        return self.base

    # -- compiled programs -------------------------------------------------------------------------------------

    def jitted(self, batch: Mapping[str, Any]) -> Any:
        batch = dict(batch)
        key = self._key(batch)
        fn = self._steps.get(key)
        if fn is None:
            step = under_mesh(functools.partial(lora_train_step, cfg=self.cfg, sc=self.sc, oc=self.oc, tx=self.tx),
                              self.mesh)
            fn = jax.jit(step, in_shardings=(self.param_shardings, self.opt_shardings, self.batch_shardings(batch),
                                             self.base_shardings),
                         out_shardings=(self.param_shardings, self.opt_shardings, self._replicated),
                         donate_argnums=(0, 1))
            self._steps[key] = fn
        return fn

    def compile(self, batch: Mapping[str, Any]) -> Any:
        batch = dict(batch)
        sds = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)  # noqa: E731
        params = jax.tree.map(sds, self.abstract_params, self.param_shardings)
        opt = jax.tree.map(sds, jax.eval_shape(self.tx.init, self.abstract_params), self.opt_shardings)
        base = jax.tree.map(sds, self.base_abstract, self.base_shardings)
        batch = jax.tree.map(sds, batch, self.batch_shardings(batch))
        return self.jitted(batch).lower(params, opt, batch, base).compile()

    def __call__(self, params: Any, opt_state: Any, batch: Mapping[str, Any]):
        batch = dict(batch)
        return self.jitted(batch)(params, opt_state, batch, self._need_base())

    def grads(self, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, Any]:
        """(mean loss, label tokens, adapter gradients) without dropout: the step's gradient path."""
        batch = dict(batch)
        key = self._key(batch)
        fn = self._grads.get(key)
        if fn is None:
            g = functools.partial(compute_lora_grads, cfg=self.cfg, sc=self.sc)
            g = under_mesh(lambda a, b, base: g(a, base, b, key=jax.random.key(0)), self.mesh)
            fn = jax.jit(g, in_shardings=(self.param_shardings, self.batch_shardings(batch), self.base_shardings))
            self._grads[key] = fn
        return fn(params, batch, self._need_base())

    def loss_fn(self, batch: Mapping[str, Any]) -> Any:
        """(adapters, batch) -> (sum of token losses, label tokens) on the base, jitted for this batch's shapes (the
        evaluator's program; no dropout)."""
        key = self._key(dict(batch))
        fn = self._losses.get(key)
        if fn is None:
            cfg, chunk = self.cfg, self.sc.loss_chunk
            fn = jax.jit(under_mesh(lambda a, b, base: loss_and_count(base, b, cfg, chunk_size=chunk, lora=a),
                                    self.mesh),
                         in_shardings=(self.param_shardings, self.batch_shardings(dict(batch)), self.base_shardings),
                         out_shardings=(self._replicated, self._replicated))
            self._losses[key] = fn
        return lambda a, b: fn(a, b, self._need_base())

    def for_eval(self) -> LoraTrainStep:
        """This step with accum_steps=1 (the evaluator's), sharing the base (no copy)."""
        out = copy.copy(self)
        out.sc = dataclasses.replace(self.sc, accum_steps=1)
        out._steps, out._grads, out._losses = {}, {}, {}
        return out


def make_train_step(cfg: Glm4vConfig, oc: OptimConfig, mesh: Mesh | None, sc: StepConfig,
                    lora: LoraConfig | None = None, model_dir: str | None = None,
                    quantize: Mapping[str, Any] | None = None) -> TrainStep:
    """The full-weight `TrainStep`, or with `lora` the `LoraTrainStep`: its base's quantization read from
    `model_dir`, or `quantize` (`TrainConfig.quant_request()`) to quantize a float base at load."""
    if lora is None:
        return TrainStep(cfg, oc, mesh, sc)
    stored = checkpoint_quantization(model_dir) if model_dir else {}
    if stored and quantize:
        raise QuantizedCheckpointError(f"{model_dir}: is already quantized ({stored['quantize']}); drop quantize "
                                       "from the training config")
    return LoraTrainStep(cfg, oc, mesh, sc, lora, stored or quantize, quantize_at_load=bool(quantize))


__all__ = ["LoraTrainStep", "compute_lora_grads", "lora_train_step", "make_train_step"]
