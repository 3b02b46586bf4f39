"""The SFT train step: one jitted, sharded, donated `(params, opt_state, batch) -> (params, opt_state, metrics)`.

Batch (per step, NumPy or global jax arrays, static shapes): the kwargs of `Glm4v.apply` plus `labels`:
  input_ids, labels, segment_ids, vision_index  (B, T) int32
  positions                                     (3, B, T) int32, M-RoPE positions restarting per segment
  vision                                        `glm41v_jax.inputs.VisionInputs` (flat packed patches, P rows)
With gradient accumulation (`accum_steps = A > 1`) every leaf carries a leading micro-batch axis A (`stack_batches`):
each micro-batch is a complete batch with its own vision pack, so the vision tower's activations scale with one
micro-batch, like the decoder's. The step scans over the A micro-batches, summing the gradients of
sum(token losses) / N, where N counts the label tokens of the whole accumulated global batch (all rows, hosts and
micro-batches): the update is that of the token-weighted mean loss, whatever the split.

Precision: fp32 master weights (`param_dtype`), activations and matmuls in `compute_dtype` (bf16 on TPU/GPU; fp32
for CPU tests), fp32 log-softmax. `grad_dtype="bfloat16"` casts the trainable weights to bf16 *before* the
differentiated function, so gradients are produced and accumulated in bf16 (half the memory; the matmuls see the
same bf16 weights either way); the Adam arithmetic is fp32 (train/optim.py has the memory budget).
`param_dtype="bfloat16"` keeps the weights themselves in bf16 (no fp32 master copy): half the parameter memory,
bf16 gradients with no separate bf16 copy of the weights, and each update summed in fp32 and stochastically rounded
back (`apply_updates`), so updates far below a bf16 step are not lost. It is what makes full fine-tuning of the 9B
model fit 16 GB chips with gradient accumulation (train/configs/kaggle_v5e8.yaml; the fp32 master weights are the
default and what the parity tests use).

Frozen groups are not differentiated at all: the trainable leaves are split off and only they are arguments of
`jax.value_and_grad`; the frozen ones enter as constants, so XLA prunes their backward (a frozen vision tower runs
forward only). The optimizer still sees a full tree (zeros for frozen leaves, which `set_to_zero` maps to zero).

Sharding (mesh axes data, fsdp, tensor; `glm41v_jax.sharding.LOGICAL_RULES`):
  * params: `param_shardings(abstract_params(cfg))` of the scanned layout (layer axis replicated);
  * optimizer state: each Adam moment gets the sharding of the parameter it mirrors (`opt_state_shardings`, by key
    path and shape); counts and keys are replicated;
  * text arrays: batch axis over ("data", "fsdp") (replicated along an axis that does not divide it);
  * vision arrays: the packed-patch axis P over ("data", "fsdp") when P is a multiple of merge**2 x that size
    (`vision_sharding="batch"`, the default), else replicated. Row-wise work (patch embed, MLPs, the merger) is then
    split across the batch shards instead of repeated on each, and attention runs as (P/n x P) per device; the
    gather of vision tokens into text positions moves only the merged tokens. `vision_sharding="replicated"` runs
    the whole tower on every device (less communication, n-fold compute). The grouped plan's tables
    (`attn_groups`, logical axes (None, None)) are small and replicated.
Params and optimizer state are donated.

Multi-host (global assembly with `jax.make_array_from_process_local_data`; each host holds its rows and its own
vision pack, which becomes its shard of the P axis in host order): rows are independent, so text `segment_ids` and
`positions` need no offsets. Vision needs: (1) `vision_index` + host_rank * (P_local / merge**2) (the host's first
merged token in the global pack), -1 kept; (2) vision `segment_ids` made distinct across hosts (+ host_rank *
max_segments_per_host, 0 kept), since dense attention masks by segment equality over the whole global P; (3) the
same P_local (bucket) and the same grouped plan shapes on every host, with `attn_groups` row indices +
host_rank * P_local (-1 kept) concatenated along the group rows, and `attn_inverse` remapped to the concatenated slot
numbering — or the dense plan (`vision_attention="dense"`), which needs only (1) and (2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm41v_jax.config import ATTENTION_IMPLS, Glm4vConfig
from glm41v_jax.inputs import ModelInputs
from glm41v_jax.layers import remat_policy as _check_remat
from glm41v_jax.model import abstract_params
from glm41v_jax.sharding import logical_to_spec, make_mesh, param_shardings, unbox, under_mesh
from glm41v_jax.weights import stack_layers, unstack_layers

from .loss import DEFAULT_CHUNK, label_count, loss_and_count
from .optim import (
    OptimConfig,
    global_norm,
    lr_schedule,
    make_optimizer,
    opt_state_shardings,
    stochastic_round,
    trainable_mask,
)

VISION_SHARDING = ("batch", "replicated")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    accum_steps: int = 1  # micro-batches per step (a leading axis on every batch leaf when > 1)
    remat_policy: str = "full"  # none | full | dots | dots_no_batch | everything (glm41v_jax.layers.remat_policy)
    compute_dtype: str = "bfloat16"  # activations / matmul inputs ("float32" on CPU)
    grad_dtype: str = "float32"  # dtype gradients are produced and accumulated in
    # dtype the trained weights are kept in: "float32" master weights, or "bfloat16" weights updated with stochastic
    # rounding (half the parameter memory and no separate bf16 copy for bf16 gradients; module docstring)
    param_dtype: str = "float32"
    loss_chunk: int = DEFAULT_CHUNK  # label rows per head chunk in the loss (train/loss.py)
    vision_sharding: str = "batch"  # "batch" | "replicated" (module docstring)
    # True: layers under nn.scan over stacked weights (compile time flat in depth: TPU pods). False: unrolled layers
    # with per-layer weights (faster on XLA:CPU, where a scan copies each layer's weights and gradients).
    scan_layers: bool = True
    # Attention backend (glm41v_jax.attention): "auto" = the splash kernel on TPU (prefill-shaped training attention,
    # head_dim 128), cuDNN on GPU, the XLA reference elsewhere; "pallas" / "cudnn" force the kernel (and fail on
    # another platform); "xla" materialises (B, K, G, T, S) fp32 logits in every layer.
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}; got "
                             f"{self.attention_impl!r}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.remat_policy != "none":
            _check_remat(self.remat_policy)
        if self.vision_sharding not in VISION_SHARDING:
            raise ValueError(f"vision_sharding must be one of {', '.join(VISION_SHARDING)}; got "
                             f"{self.vision_sharding!r}")
        for name in ("compute_dtype", "grad_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")


def train_config(cfg: Glm4vConfig, sc: StepConfig) -> Glm4vConfig:
    """The model config the step runs: scanned (or unrolled) layers, remat, compute dtype, fp32 master weights."""
    return cfg.with_runtime(scan_layers=sc.scan_layers, remat_policy=sc.remat_policy, compute_dtype=sc.compute_dtype,
                            param_dtype=sc.param_dtype, attention_impl=sc.attention_impl)


def stack_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A micro-batches with identical shapes -> one batch with a leading axis A on every leaf (NumPy)."""
    structs = [jax.tree.structure(b) for b in batches]
    shapes = [[np.shape(x) for x in jax.tree.leaves(b)] for b in batches]
    for i in range(1, len(batches)):
        if structs[i] != structs[0] or shapes[i] != shapes[0]:
            raise ValueError(f"micro-batch {i} differs from micro-batch 0 in structure or shapes (bucket, vision "
                             "pad or grouped-attention layout); accumulated micro-batches must share every shape")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions.


def _split(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable leaves, None elsewhere), (frozen leaves, None elsewhere)."""
    return (jax.tree.map(lambda p, m: p if m else None, params, mask),
            jax.tree.map(lambda p, m: None if m else p, params, mask))


def _merge(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def compute_grads(params: Any, batch: Mapping[str, Any], cfg: Glm4vConfig, sc: StepConfig, trainable: Any
                  ) -> tuple[jax.Array, jax.Array, Any]:
    """(mean token loss, label tokens, gradients of the mean loss) over the whole (accumulated) batch.

    The gradient tree has the trainable leaves in `sc.grad_dtype` and None at frozen leaves. `cfg` is the training
    config (`train_config`); `trainable` a bool tree like params.
    """
    mbs = batch if sc.accum_steps > 1 else jax.tree.map(lambda x: x[None], batch)
    count = label_count(mbs["labels"], mbs["segment_ids"])
    denom = jnp.maximum(count, 1.0)
    train, frozen = _split(params, trainable)
    train = jax.tree.map(lambda x: x.astype(sc.grad_dtype), train)

    def micro_loss(tp, mb):
        s, _ = loss_and_count(_merge(tp, frozen), mb, cfg, chunk_size=sc.loss_chunk)
        return s / denom

    grad_fn = jax.value_and_grad(micro_loss)
    if sc.accum_steps == 1:
        loss, grads = grad_fn(train, batch)
    else:
        def body(carry, mb):
            acc, total = carry
            loss, g = grad_fn(train, mb)
            return (jax.tree.map(jnp.add, acc, g), total + loss), None

        (grads, loss), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, train), jnp.zeros((), jnp.float32)),
                                        mbs)
    return loss, count, grads


def apply_updates(params: Any, updates: Any, key: jax.Array) -> Any:
    """params + updates. fp32 leaves as optax.apply_updates; bf16 leaves (`param_dtype="bfloat16"`) are summed in
    fp32 and stochastically rounded back to bf16 (`optim.stochastic_round`), one key per leaf: an update far below
    a bf16 step (lr 1e-5 on weights ~1e-2) moves the weight by one step with the matching probability instead of
    being rounded away, so the expected weight follows the fp32 trajectory."""
    leaves, tree = jax.tree.flatten(params)
    ups = tree.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, ups, strict=True)):
        if p.dtype == jnp.bfloat16:
            out.append(stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32), jax.random.fold_in(key, i),
                                        jnp.bfloat16))
        else:
            out.append((p + u.astype(p.dtype)).astype(p.dtype))
    return jax.tree.unflatten(tree, out)


def _schedule_count(opt_state: Any) -> jax.Array:
    """Updates applied so far (the learning-rate schedule's step)."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
    return found[0].count


def train_step(params: Any, opt_state: Any, batch: Mapping[str, Any], *, cfg: Glm4vConfig, sc: StepConfig,
               oc: OptimConfig, tx: optax.GradientTransformation) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step (unjitted; `TrainStep` jits it with shardings and donation)."""
    trainable = trainable_mask(params, oc.freeze)
    step = _schedule_count(opt_state)
    with jax.named_scope("grads"):
        loss, count, grads = compute_grads(params, batch, cfg, sc, trainable)
    grad_norm = global_norm(grads)
    full = jax.tree.map(lambda g, p: jnp.zeros(p.shape, p.dtype) if g is None else g, grads, params,
                        is_leaf=lambda x: x is None)
    with jax.named_scope("optimizer"):
        updates, new_opt_state = tx.update(full, opt_state, params, grad_norm=grad_norm)  # one norm per step
        new_params = apply_updates(params, updates, jax.random.fold_in(jax.random.key(oc.seed + 1), step))
    # A non-finite loss or gradient norm: the update is not applied (params and optimizer state, its step count
    # included, stay as they were), so params never turn non-finite; the loop stops after `nonfinite_patience` such
    # steps (train/loop.py). An elementwise select in the same program: no host sync.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (new_params, new_opt_state),
                                     (params, opt_state))
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": lr_schedule(oc)(step),
               "step": step + 1}
    return params, opt_state, metrics


# ---------------------------------------------------------------------------------------------------------------
# The jitted, sharded step.


class TrainStep:
    """Builds and caches the jitted step for a model config, optimizer config, mesh and step config.

        ts = TrainStep(cfg, OptimConfig(peak_lr=1e-5), mesh, StepConfig(accum_steps=2))
        params = ts.place_params(params)          # unrolled or stacked, any dtype -> fp32, stacked, sharded
        opt_state = ts.init_opt_state(params)
        params, opt_state, metrics = ts(params, opt_state, batch)   # batch: NumPy or sharded jax arrays
    """

    def __init__(self, cfg: Glm4vConfig, oc: OptimConfig, mesh: Mesh | None = None, sc: StepConfig | None = None):
        self.sc = sc or StepConfig()
        self.oc = oc
        self._setup(train_config(cfg, self.sc), mesh, abstract_params)

    def _setup(self, cfg: Glm4vConfig, mesh: Mesh | None, trained: Any) -> None:
        """The config, mesh and optimizer, and the abstract trained params (`trained(cfg)`, boxed), their and the
        optimizer state's shardings (LoraTrainStep trains the adapters: `lora.abstract_adapters`)."""
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        self.tx = make_optimizer(self.oc)
        boxed = trained(self.cfg)
        self.abstract_params = unbox(boxed)
        self.param_shardings = param_shardings(boxed, self.mesh)
        abstract_state = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = opt_state_shardings(abstract_state, self.abstract_params, self.param_shardings,
                                                 self.mesh)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._steps: dict[Any, Any] = {}
        self._grads: dict[Any, Any] = {}
        self._losses: dict[Any, Any] = {}

    # -- placement ---------------------------------------------------------------------------------------------

    def place_params(self, params: Any) -> Any:
        """Unrolled or stacked params (NumPy / jax, any float dtype) -> fp32 arrays in the step's layout (stacked
        when `scan_layers`) with their shardings."""
        stacked = "layers" in params.get("language_model", {})
        if self.sc.scan_layers and not stacked:
            params = stack_layers(params)
        elif not self.sc.scan_layers and stacked:
            params = unstack_layers(params)
        want = jax.tree.structure(self.abstract_params)
        if jax.tree.structure(params) != want:
            raise ValueError("params do not match the model config's parameter tree")
        for (path, x), a in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(self.abstract_params),
                                strict=True):
            if tuple(np.shape(x)) != tuple(a.shape):
                raise ValueError(f"param {jax.tree_util.keystr(path)}: shape {np.shape(x)}, expected {a.shape}")
        return jax.tree.map(lambda x, a, s: jax.device_put(jnp.asarray(x, a.dtype), s), params,
                            self.abstract_params, self.param_shardings)

    def init_opt_state(self, params: Any) -> Any:
        return jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)(params)

    def batch_shardings(self, batch: Mapping[str, Any]) -> Any:
        """Each array's sharding from its field's logical axes (`glm41v_jax.inputs`; `labels` has the axes of
        `input_ids`). Vision arrays are replicated under `vision_sharding="replicated"` or when P does not split
        into whole merge groups per batch shard (module docstring)."""
        lead = 1 if self.sc.accum_steps > 1 else 0
        mesh = self.mesh
        m2 = self.cfg.vision.spatial_merge_size ** 2
        n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
        axes = {**ModelInputs.axes(), "labels": ModelInputs.axes()["input_ids"]}

        def spec(logical, x):
            shape = np.shape(x)
            return NamedSharding(mesh, PartitionSpec(*([None] * lead), *logical_to_spec(logical, shape[lead:], mesh)))

        out = {}
        for key, val in batch.items():
            if key == "vision":
                if val is None:
                    out[key] = None
                    continue
                p = np.shape(val.pixel_values)[lead]
                split = self.sc.vision_sharding == "batch" and p % (m2 * n_batch) == 0
                out[key] = val.map_with_axes(lambda logical, x, split=split: spec(logical, x) if split
                                             else self._replicated)
            elif key in axes:
                out[key] = spec(axes[key], val)
            else:
                raise ValueError(f"unexpected batch key {key!r}; expected {', '.join(axes)}, vision")
        return out

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Host NumPy batch -> global jax arrays (single process; multi-host assembles with
        jax.make_array_from_process_local_data and the same shardings)."""
        batch = dict(batch)
        return jax.tree.map(lambda x, s: jax.device_put(x, s), batch, self.batch_shardings(batch))

    # -- compiled programs -------------------------------------------------------------------------------------

    def _key(self, batch) -> tuple:
        return jax.tree.structure(batch), tuple(np.shape(x) for x in jax.tree.leaves(batch))

    def jitted(self, batch: Mapping[str, Any]) -> Any:
        """The jitted, sharded, donated step for this batch's shapes (cached): what `__call__` runs, and what
        `glm41v plan` lowers with abstract params, optimizer state and batch (`.lower(...).compile()`, or `compile`).
        """
        batch = dict(batch)
        key = self._key(batch)
        fn = self._steps.get(key)
        if fn is None:
            # traced under the mesh: attention kernels run under shard_map over it (sharding.under_mesh)
            step = under_mesh(functools.partial(train_step, cfg=self.cfg, sc=self.sc, oc=self.oc, tx=self.tx),
                              self.mesh)
            metric_sh = self._replicated
            fn = jax.jit(step, in_shardings=(self.param_shardings, self.opt_shardings, self.batch_shardings(batch)),
                         out_shardings=(self.param_shardings, self.opt_shardings, metric_sh), donate_argnums=(0, 1))
            self._steps[key] = fn
        return fn

    def compile(self, batch: Mapping[str, Any]) -> Any:
        """Compile the step ahead of time from shapes only: `batch` may hold NumPy arrays or ShapeDtypeStructs;
        params and optimizer state are abstract (no weights needed), so this also compiles for a mesh of devices
        this host does not have (e.g. a TPU topology from `jax.experimental.topologies`)."""
        batch = dict(batch)
        sds = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)  # noqa: E731
        params = jax.tree.map(sds, self.abstract_params, self.param_shardings)
        opt = jax.tree.map(sds, jax.eval_shape(self.tx.init, self.abstract_params), self.opt_shardings)
        batch = jax.tree.map(sds, batch, self.batch_shardings(batch))
        return self.jitted(batch).lower(params, opt, batch).compile()

    def __call__(self, params: Any, opt_state: Any, batch: Mapping[str, Any]):
        batch = dict(batch)
        return self.jitted(batch)(params, opt_state, batch)

    def flop_counter(self, freeze: Sequence[str] = ()) -> Any:
        """The `metrics.FlopCounter` of this step's model FLOPs (`freeze`: optim.freeze)."""
        from .metrics import FlopCounter

        return FlopCounter(self.cfg, self.abstract_params, freeze)

    def loss_fn(self, batch: Mapping[str, Any]) -> Any:
        """(params, batch) -> (sum of token losses, label tokens), jitted for this batch's shapes (the evaluator's
        program)."""
        key = self._key(dict(batch))
        fn = self._losses.get(key)
        if fn is None:
            cfg, chunk = self.cfg, self.sc.loss_chunk
            fn = jax.jit(lambda p, b: loss_and_count(p, b, cfg, chunk_size=chunk),
                         in_shardings=(self.param_shardings, self.batch_shardings(dict(batch))),
                         out_shardings=(self._replicated, self._replicated))
            self._losses[key] = fn
        return fn

    def for_eval(self) -> TrainStep:
        """The same step with accum_steps=1 (the evaluator runs one batch at a time)."""
        return TrainStep(self.cfg, self.oc, self.mesh, dataclasses.replace(self.sc, accum_steps=1))

    def grads(self, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, Any]:
        """(mean loss, label tokens, gradient tree with None at frozen leaves): the step's own gradient path."""
        batch = dict(batch)
        key = self._key(batch)
        fn = self._grads.get(key)
        if fn is None:
            trainable = trainable_mask(self.abstract_params, self.oc.freeze)
            g = under_mesh(functools.partial(compute_grads, cfg=self.cfg, sc=self.sc, trainable=trainable), self.mesh)
            fn = jax.jit(g, in_shardings=(self.param_shardings, self.batch_shardings(batch)))
            self._grads[key] = fn
        return fn(params, batch)
