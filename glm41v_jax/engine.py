"""The generation `Engine`: params on the device, shardings, compiled programs, the memory check, the serving loop.

Serving a batch: `prepare` buckets and checks the requests on the host (`requests.prepare_batch`), `prefill` runs
the compiled prefill program into a `decode.DecodeState`, then `decode` runs compiled chunks of up to `chunk_size`
steps. The host dispatches the next chunk before reading the previous one, so the device never waits on the host;
the state (KV cache included) is donated to each call (updated in place). `insert` puts a prefilled request into
rows of a running state: the piece that slot-based continuous batching adds to the same programs.

Mesh: with `Engine(mesh=...)` the params live in their `NamedSharding`s (sharding.LOGICAL_RULES), and the decode
state, KV cache included, is laid out from its fields' logical axes by the same table (`decode.state_shardings`;
2 KV heads on tensor > 2 are replicated across the tensor shards, see sharding.py). Every program is compiled with
these explicit in/out shardings, under its mesh (`sharding.under_mesh`).
"""

from __future__ import annotations

import functools
import reprlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout

from . import decode as D
from .backend import AUTO_CACHE_MIN_ROWS, backend_default
from .buckets import bucket_length, format_bytes, kv_cache_bytes, vision_bucket
from .config import KERNEL_LAYOUTS, Glm4vConfig
from .inputs import ModelInputs
from .lora import abstract_adapters
from .model import Glm4v, abstract_params, to_kernel_layout
from .programs import ProgramCache, describe, signature
from .requests import GenerationError, GenerationResult, PreparedBatch, prepare_batch, synthetic_inputs
from .sampling import SamplingParams
from .sharding import logical_to_spec, param_shardings, under_mesh

_PROGRAMS = {"prefill": D.prefill, "insert": D.insert, "decode": D.decode}


def _free_device_bytes(mesh: Any) -> int | None:
    """Free bytes on the (first) device, as the runtime reports it (TPU/GPU); None when unknown (CPU)."""
    dev = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    n_dev = 1 if mesh is None else mesh.devices.size
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * n_dev)


def eos_array(eos: Sequence[int]) -> np.ndarray:
    """Eos ids as the programs take them: (MAX_EOS,) int32 padded with -1 (changing them never recompiles)."""
    if len(eos) > D.MAX_EOS:
        raise GenerationError(f"at most {D.MAX_EOS} eos ids are supported, got {len(eos)}")
    arr = np.full((D.MAX_EOS,), -1, np.int32)
    arr[: len(eos)] = eos
    return arr


def check_prefill_chunk(value: Any) -> int | None:
    """The chunked-prefill setting as an int (None: the platform's default); GenerationError for anything but an
    integer >= 0 (0: the prompt in one piece)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise GenerationError(f"prefill_chunk must be an integer >= 0 (0: the prompt in one piece), got "
                              f"{reprlib.repr(value)}")
    return int(value)


def _cpu_int4_as_int8(params: Any, donate: bool) -> Any:
    """int4 codes as int8 device arrays (the same values), for XLA:CPU: an executable compiled ahead of time expects
    its int4 arguments in a sub-byte layout (4 bits) that XLA:CPU's int4 arrays never report (0), so JAX refuses the
    call ("compiled for input layouts that disagree with the layouts of arguments"). XLA:CPU stores int4 one value
    per byte anyway, so the bytes are the same; `layers.Dense`'s int4 path dequantizes int8 codes alike (its
    branch follows the config's scheme, not the dtype)."""
    def cast(x: Any) -> Any:
        if np.dtype(x.dtype) != np.dtype(jnp.int4):
            return x
        if isinstance(x, np.ndarray):
            return x.astype(np.int8)
        y = jax.jit(lambda v: v.astype(jnp.int8), out_shardings=x.sharding)(x)
        if donate:
            x.delete()
        return y

    return jax.tree.map(cast, params)


class Engine:
    """Holds the params on device (optionally sharded over a mesh) and the compiled prefill / decode executables.

    `generate_batch` / `generate` serve requests; `warmup` compiles ahead of time; `num_compiles` counts the
    executables built so far. `max_context` caps prompt + new tokens (default and maximum: the model's
    max_position_embeddings, 65536 for GLM-4.1V); `memory_limit_bytes` caps the KV cache of one call (default: what
    the device reports as free, when it reports it).

    Chunked prefill (`prefill_chunk`, tokens; default the platform's `BACKEND_TUNING` "prefill_chunk", 0 = never):
    a prompt bucket longer than it runs through the decoder in chunks of at most that many tokens, a loop inside the
    one prefill program (`decode.prefill_logits`), so the prefill's temporaries are one chunk's whatever the prompt
    length (the 9B in int4 at a 32k context on one 16 GB v5e chip). Same results as one piece, up to rounding.

    Kernel layout: `params` are in `cfg.runtime.kernel_layout` (checkpoints: "in_out"); the engine keeps them in
    `kernel_layout`, by default the measured best of the platform it runs on (`BACKEND_TUNING`: "out_in" on CPU,
    "in_out" on TPU/GPU), so `engine.params` and `engine.cfg` describe that layout.

    Ownership (`donate=True`, the default): the engine takes the params. Every device array it replaces (a kernel
    re-laid out, a leaf moved into its mesh sharding) is deleted from the caller's tree as soon as its replacement
    exists, so the device holds one copy of the weights (transiently one kernel more); use `engine.params`
    afterwards. Arrays it keeps as they are stay shared with the caller; host (NumPy) params are copied to the
    device once and stay valid. `donate=False` leaves the caller's arrays valid (two copies of whatever is
    replaced, while the caller keeps them).

    LoRA (`adapters=`, with `cfg.runtime.lora` giving their sites): the adapter tree runs unmerged beside the weights
    (`engine.params` is then {"params": weights, "lora": adapters}, `decode.variables`), e.g. on a quantized base,
    whose codes cannot take a merged adapter; on float weights `Pipeline.load` merges them instead.

    Ahead-of-time compilation without weights: `Engine(None, cfg, mesh=...)` holds ShapeDtypeStructs instead of
    arrays; `warmup(...)` then compiles the same prefill/decode programs for the mesh's devices (which this host
    need not have, e.g. a TPU topology), listed by `programs()`.

    `programs`: the cache of compiled executables (default: the engine's own); engines given the same cache share
    every program whose config, static choices and shapes match (the functional API does this).
    """

    def __init__(self, params: Any, cfg: Glm4vConfig, *, mesh: jax.sharding.Mesh | None = None,
                 chunk_size: int = 16, prompt_bucket: Callable[[int], int] = bucket_length,
                 patch_bucket: Callable[[int], int] | None = vision_bucket, max_context: int | None = None,
                 memory_limit_bytes: int | None = None, kernel_layout: str | None = None, donate: bool = True,
                 programs: ProgramCache | None = None, adapters: Any = None, prefill_chunk: int | None = None) -> None:
        if adapters is not None and (params is None or cfg.runtime.lora is None):
            raise GenerationError("adapters need params and a config with their LoRA sites (lora.with_lora)")
        if chunk_size < 1:
            raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")
        prefill_chunk = check_prefill_chunk(prefill_chunk)
        limit = cfg.text.max_position_embeddings
        if max_context is not None and not 1 <= max_context <= limit:
            raise GenerationError(f"max_context must be in [1, {limit}] (the model's max_position_embeddings), "
                                  f"got {max_context}")
        self.platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        if kernel_layout is None:  # int4 has its own (BACKEND_TUNING: on CPU its grouped dot wants "in_out")
            kernel_layout = backend_default(self.platform, "engine_kernel_layout_int4"
                                            if cfg.runtime.quantize == "int4" else "engine_kernel_layout")
        if kernel_layout not in KERNEL_LAYOUTS:
            raise GenerationError(f"kernel_layout must be 'in_out' or 'out_in', got {kernel_layout!r}")
        self.mesh = mesh
        self.max_context = int(max_context or limit)
        self.memory_limit_bytes = memory_limit_bytes
        self.chunk_size = int(chunk_size)
        self.prefill_chunk = int(backend_default(self.platform, "prefill_chunk") if prefill_chunk is None
                                 else prefill_chunk)
        self.prompt_bucket = prompt_bucket
        self.patch_bucket = patch_bucket
        self.param_shardings = None
        if mesh is not None:
            self.param_shardings = param_shardings(abstract_params(cfg.with_runtime(kernel_layout=kernel_layout)), mesh)
        if params is None:  # abstract (no weights): programs can only be compiled, e.g. for a TPU topology (plan)
            if mesh is None:
                raise GenerationError("an Engine without params needs a mesh (the devices to compile for)")
            self.cfg = cfg.with_runtime(kernel_layout=kernel_layout)
            self.params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nn.meta.unbox(abstract_params(self.cfg)), self.param_shardings)
        else:
            # The decode layout (see layers.Dense): each kernel transposed once, here, straight into its sharding;
            # with `donate` each replaced array of the caller's tree is freed at once (one copy on the device).
            self.params, self.cfg = to_kernel_layout(params, cfg, kernel_layout, self.param_shardings, donate=donate)
            if mesh is None:
                self.params = jax.device_put(self.params)
            if self.platform == "cpu":
                self.params = _cpu_int4_as_int8(self.params, donate)
        if adapters is not None:  # LoRA unmerged (e.g. on a quantized base): every program applies both collections
            boxed = abstract_adapters(self.cfg)
            sh = param_shardings(boxed, mesh) if mesh is not None else None
            adapters = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), adapters, nn.meta.unbox(boxed))
            self.params = {"params": self.params, "lora": jax.device_put(adapters, sh)}
            if mesh is not None:
                self.param_shardings = {"params": self.param_shardings, "lora": sh}
        self.model = Glm4v(self.cfg)
        self._cache = ProgramCache() if programs is None else programs
        self._params_key = (self.cfg, signature(self.params), mesh)  # what every program here depends on
        self._compile_s = 0.0  # compiles of the current request

    @property
    def num_compiles(self) -> int:
        """Programs in this engine's cache (shared with other engines when `programs` was given)."""
        return len(self._cache)

    @property
    def compile_log(self) -> list[tuple[str, float]]:
        """(shape key, seconds) per compiled program, in order."""
        return [(desc, dt) for _, _, desc, dt in self._cache.entries()]

    @property
    def compiling(self) -> str | None:
        """The kind of program being compiled when a compile raised ("prefill" | "insert" | "decode"), else None."""
        return self._cache.compiling

    def programs(self) -> list[tuple[str, Any, float]]:
        """(kind "prefill" | "insert" | "decode", compiled executable, compile seconds) of every program, in order."""
        return [(kind, exe, dt) for kind, exe, _, dt in self._cache.entries()]

    # -------------------------------------------------------------------------------------------- shardings
    def replicated(self) -> Any:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def batch_sharding(self, x: Any, axis: int = 0) -> Any:
        """Shard dimension `axis` (the batch) over the batch mesh axes when it divides them, else replicate."""
        shape = np.shape(x)
        names = [None] * len(shape)
        if len(shape) > axis:
            names[axis] = "batch"
        return jax.sharding.NamedSharding(self.mesh, logical_to_spec(names, shape, self.mesh))

    def cache_shardings(self, cache: Any) -> Any:
        """KV-cache shardings: (B, K, S, H) per layer (L, B, K, S, H stacked) -> batch, kv_heads, length, head_dim."""
        def one(x):
            names = D.CACHE_AXES if len(np.shape(x)) == 4 else ("layers", *D.CACHE_AXES)
            return jax.sharding.NamedSharding(self.mesh, logical_to_spec(names, np.shape(x), self.mesh))

        return jax.tree.map(one, cache)

    def _state_formats(self, state: Any, cache_layouts: Any = None) -> Any:
        """The shardings of a decode state; with `cache_layouts` (a {"k", "v"} tree of `Layout`s, or `Layout.AUTO`
        for every leaf) its KV cache's leaves as `Format(layout, sharding)`."""
        st = D.state_shardings(state, self.mesh)
        if cache_layouts is None:
            return st
        if not isinstance(cache_layouts, dict):
            cache_layouts = jax.tree.map(lambda _: cache_layouts, st.cache)
        return st.replace(cache=jax.tree.map(Format, cache_layouts, st.cache))

    def _in_out_shardings(self, kind: str, fn: Callable, args: tuple, cache_layouts: Any = None) -> tuple[Any, Any]:
        """In and out shardings of a program; `cache_layouts` (decode: `Layout.AUTO`; prefill and insert: the
        decode program's choice) lays out the KV cache of the states it takes and returns."""
        rep = self.replicated()
        if kind == "prefill":
            _, kw, pos, limit, think, *_ = args
            axes = ModelInputs.axes()  # the text arrays' logical axes; the vision pack is replicated
            kw_sh = {k: (None if v is None else jax.tree.map(lambda _: rep, v) if k == "vision"
                         else self.batch_sharding(v, axes[k].index("batch"))) for k, v in kw.items()}
            think_sh = None if think is None else D.state_shardings(think, self.mesh)
            ins = (self.param_shardings, kw_sh, self.batch_sharding(pos), self.batch_sharding(limit), think_sh,
                   rep, jax.tree.map(lambda _: rep, args[6]), rep)
            return ins, self._state_formats(jax.eval_shape(fn, *args), cache_layouts)
        if kind == "insert":
            prefix, state, _ = args
            st = self._state_formats(state, cache_layouts)
            return (self._state_formats(prefix, cache_layouts), st, rep), st
        _, state, scalars, _, _ = args
        st = self._state_formats(state, cache_layouts)
        ins = (self.param_shardings, st, jax.tree.map(lambda _: rep, scalars), rep, rep)
        return ins, (st, self.batch_sharding(np.zeros((np.shape(state.tok)[0], 1))), rep)

    def _cache_layouts(self, kind: str, statics: dict[str, Any], args: tuple) -> Any:
        """The KV cache layouts a program is compiled with (`backend` "cache_layout"): None = row-major (CPU, GPU,
        no mesh); on TPU `Layout.AUTO` for decode (the compiler lays out the cache for its loop), and for prefill
        the layouts the decode program of the state it returns chose (compiled first, if it is not yet), so the
        cache is never re-laid out between the two. Insert takes the layouts of the arrays it is given."""
        if self.mesh is None or backend_default(self.platform, "cache_layout") != "compiler":
            return None
        if kind == "insert":
            fmt = lambda x: getattr(x, "format", None)  # noqa: E731
            layouts = jax.tree.map(lambda x: getattr(fmt(x), "layout", None), args[1].cache)
            return None if any(v is None for v in jax.tree.leaves(layouts, is_leaf=lambda v: v is None)) else layouts
        if kind == "decode":
            return Layout.AUTO if self._auto_cache_layout(args[1]) else None
        fn = under_mesh(functools.partial(D.prefill, model=self.model, **statics), self.mesh)
        state = jax.eval_shape(fn, *args)
        if not self._auto_cache_layout(state):
            return None
        dstatics, dargs = self._decode_args(state, statics["sampling"], args[7])
        decode = self._executable("decode", dstatics, dargs, donate=(1,))
        return jax.tree.map(lambda f: f.layout, decode.input_formats[0][1].cache)

    def _auto_cache_layout(self, state: Any) -> bool:
        """Whether the compiler chooses the cache layout: only with `AUTO_CACHE_MIN_ROWS` or more rows per device.
        Measured with the TPU compiler (9B, 8k cache, BENCHMARKS.md "TPU plans"): at 8 rows per device (v5e-8,
        tensor=8, batch 8) the loop wants (S, K, B, H)-major and row-major arguments cost a copy of every layer's
        cache in and out per chunk (10.6 GiB, bytes ratio 0.34 -> 0.99 with AUTO); at 1 row AUTO gains nothing and
        the compiler then re-lays out weights once per chunk instead (v5e-8: 0.62 GiB, ratio 1.00 -> 0.92; v6e-1:
        the fused gate_up kernels, 17 GiB and 7.6 GiB more temporaries)."""
        leaf = jax.tree.leaves(state.cache)[0]
        sh = jax.tree.leaves(D.state_shardings(state, self.mesh).cache)[0]
        rows = sh.shard_shape(tuple(np.shape(leaf)))[np.ndim(leaf) - 4]
        return rows >= AUTO_CACHE_MIN_ROWS

    # -------------------------------------------------------------------------------------------- programs
    def _executable(self, kind: str, statics: dict[str, Any], args: tuple, donate: tuple[int, ...] = ()) -> Any:
        """The compiled program for these static choices and argument shapes (compiled ahead of time once)."""
        lead = args[1:] if kind != "insert" else args
        # prefill and decode choose their cache layouts from their own statics and shapes (in the key already);
        # insert takes those of its arguments
        layouts = self._cache_layouts(kind, statics, args) if kind == "insert" else None
        key = (kind, self._params_key, tuple(sorted(statics.items(), key=lambda kv: kv[0])), signature(lead),
               None if layouts is None else str(jax.tree.leaves(layouts)))
        exe = self._cache.get(key)
        if exe is not None:
            return exe
        if kind != "insert":
            layouts = self._cache_layouts(kind, statics, args)
        model_kw = {} if kind == "insert" else {"model": self.model}
        fn = under_mesh(functools.partial(_PROGRAMS[kind], **model_kw, **statics), self.mesh)

        def build() -> Any:
            if self.mesh is None:
                jitted = jax.jit(fn, donate_argnums=donate)
            else:
                ins, outs = self._in_out_shardings(kind, fn, args, layouts)
                jitted = jax.jit(fn, donate_argnums=donate, in_shardings=ins, out_shardings=outs)
            return jitted.lower(*args).compile()

        exe, dt = self._cache.compile(key, kind, describe(kind, statics, args), build)
        self._compile_s += dt
        return exe

    def _prefill_args(self, prep: PreparedBatch, sampling: SamplingParams, seed: int, eos: np.ndarray,
                      thinking: D.ThinkingBudget | None, max_len: int) -> tuple[dict[str, Any], tuple]:
        think = None
        if thinking is not None:
            think = thinking.initial_state(prep.prompt_token_ids, len(prep.limits) - len(prep.prompt_token_ids))
        args = (self.params, prep.model_kwargs, prep.next_positions, prep.limits, think, jax.random.PRNGKey(seed),
                jax.tree.map(np.asarray, sampling.scalars()), eos)
        return dict(cfg=self.cfg, max_len=max_len, sampling=sampling.canonical(),
                    prefill_chunk=D.prefill_chunk_length(prep.prompt_len, self.prefill_chunk)), args

    def _decode_args(self, state: Any, sampling: SamplingParams, eos: np.ndarray) -> tuple[dict[str, Any], tuple]:
        args = (self.params, state, jax.tree.map(np.asarray, sampling.scalars()), eos,
                np.int32(self.cfg.text.pad_token_id))
        return dict(chunk=self.chunk_size, sampling=sampling.canonical()), args

    def prefill(self, prep: PreparedBatch, *, sampling: SamplingParams | None = None, seed: int = 0,
                eos_ids: Sequence[int] = (), thinking: D.ThinkingBudget | None = None,
                max_len: int | None = None) -> D.DecodeState:
        """Run the prefill program on a prepared batch -> its decode state (a prefix for `insert`). `max_len`:
        the cache slots (default the batch's own; give the running state's to insert into it)."""
        max_len = prep.max_len if max_len is None else int(max_len)
        if max_len < prep.max_len:
            raise GenerationError(f"max_len {max_len} is shorter than the {prep.max_len} cache slots this batch needs")
        statics, args = self._prefill_args(prep, sampling or SamplingParams(), seed, eos_array(eos_ids), thinking,
                                           max_len)
        return self._executable("prefill", statics, args)(*args)

    def insert(self, prefix: D.DecodeState, state: D.DecodeState, slot: int) -> D.DecodeState:
        """Put the rows of `prefix` into rows [slot, slot + b) of `state` (donated): continuous batching's step.
        The prefix must have been prefilled with the state's cache length and end no later than its write slot."""
        b, n, s = int(np.shape(prefix.tok)[0]), int(np.shape(state.tok)[0]), int(np.shape(state.kv_seg)[1])
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot <= n - b:
            raise GenerationError(f"slot {slot}: rows [{slot}, {slot + b}) are not inside the batch of {n} rows")
        if jax.tree.structure(prefix) != jax.tree.structure(state):
            raise GenerationError("the prefix and the state differ in their optional parts (repetition penalty, "
                                  "thinking budget): prefill the request with the batch's sampling and thinking")
        if np.shape(prefix.kv_seg)[1] != s:
            raise GenerationError(f"the prefix has {np.shape(prefix.kv_seg)[1]} cache slots, the state {s}")
        start, index = int(prefix.index), int(state.index)
        if start > index:
            raise GenerationError(f"the prefix's prompt of {start} slots does not fit before the state's write slot "
                                  f"{index}")
        need = int(np.max(np.asarray(prefix.limit) - np.asarray(prefix.count)))
        if index + need > s:
            raise GenerationError(f"the state has {s - index} free cache slots; the prefix needs {need}")
        args = (prefix, state, np.int32(slot))
        return self._executable("insert", {}, args, donate=(1,))(*args)

    def decode(self, state: D.DecodeState, *, sampling: SamplingParams | None = None,
               eos_ids: Sequence[int] = ()) -> tuple[D.DecodeState, jax.Array, jax.Array]:
        """One chunk of up to `chunk_size` steps of every row of `state` (donated): (state, tokens (B, chunk), n)."""
        statics, args = self._decode_args(state, sampling or SamplingParams(), eos_array(eos_ids))
        return self._executable("decode", statics, args, donate=(1,))(*args)

    # -------------------------------------------------------------------------------------------- limits
    def _check_memory(self, batch: int, max_len: int) -> None:
        need = kv_cache_bytes(self.cfg, batch, max_len)
        budget = self.memory_limit_bytes
        if budget is None:
            budget = _free_device_bytes(self.mesh)
        if budget is not None and need > budget:
            raise GenerationError(f"the KV cache for {batch} rows x {max_len} slots needs {format_bytes(need)}, more "
                                  f"than the {format_bytes(budget)} available; lower the batch size, the prompt "
                                  f"length or max_new_tokens")

    def prepare(self, inputs: Mapping[str, Any], max_new_tokens: int | Sequence[int],
                pad_batch_to: int | None = None) -> PreparedBatch:
        """Bucket and check a batch (no device work): every limit error is raised here."""
        prep = prepare_batch(self.cfg, inputs, max_new_tokens, self.prompt_bucket, self.patch_bucket,
                             self.max_context, pad_batch_to)
        self._check_memory(len(prep.limits), prep.max_len)
        return prep

    # -------------------------------------------------------------------------------------------- serving
    def warmup(self, buckets: Sequence[Mapping[str, Any]], *, sampling: SamplingParams | None = None,
               thinking: bool = False) -> int:
        """Compile the prefill and decode programs for each bucket ahead of time; returns the number of new compiles.

        A bucket is {"batch": B, "prompt_tokens": T, "max_new_tokens": N, "images": [(height, width), ...] in
        pixels after resizing (multiples of patch*merge; optional), "videos": [(frames, height, width), ...]}.
        Any request whose sizes round to the same buckets then runs without compiling. Nothing runs on the device.
        """
        before = self.num_compiles
        sampling = sampling or SamplingParams()
        budget = D.ThinkingBudget(1 << 30, (0,), None) if thinking else None
        for spec in buckets:
            prep = self.prepare(synthetic_inputs(self.cfg, **spec), int(spec.get("max_new_tokens", 16)))
            statics, args = self._prefill_args(prep, sampling, 0, eos_array(()), budget, prep.max_len)
            self._executable("prefill", statics, args)
            fn = under_mesh(functools.partial(D.prefill, model=self.model, **statics), self.mesh)
            dstatics, dargs = self._decode_args(jax.eval_shape(fn, *args), sampling, eos_array(()))
            self._executable("decode", dstatics, dargs, donate=(1,))
        return self.num_compiles - before

    def generate_batch(
        self,
        inputs: Mapping[str, Any],
        *,
        max_new_tokens: int | Sequence[int] = 256,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        stream_callback: Callable[[list[list[int]]], None] | None = None,
        max_thinking_tokens: int | None = None,
        think_end_ids: Sequence[int] | None = None,
        think_start_id: int | None = None,
        pad_batch_to: int | None = None,
    ) -> list[GenerationResult]:
        """Generate for every row of a (possibly padded) batch. `eos_ids=()` disables stopping on eos.

        max_new_tokens: one limit for all rows or one per row. `stream_callback(new_tokens_per_row)` is called with
        each chunk of new tokens (rows that already stopped get an empty list). `max_thinking_tokens` with
        `think_end_ids` (and preferably `think_start_id`) bounds the thinking (see `decode.ThinkingBudget`).
        `pad_batch_to` pads the batch with dummy rows to a fixed size (one compiled program for every batch).
        """
        sampling = sampling or SamplingParams()
        eos = tuple(self.cfg.text.eos_token_ids if eos_ids is None else eos_ids)
        budget = None
        if max_thinking_tokens is not None:
            if not think_end_ids:
                raise GenerationError("max_thinking_tokens needs think_end_ids (the ids of '</think><answer>')")
            budget = D.ThinkingBudget(int(max_thinking_tokens), tuple(int(i) for i in think_end_ids), think_start_id)
        eos_array(eos)  # the eos count is checked before any work
        prep = self.prepare(inputs, max_new_tokens, pad_batch_to)
        self._compile_s = 0.0
        t0 = time.perf_counter()
        state = self.prefill(prep, sampling=sampling, seed=seed, eos_ids=eos, thinking=budget)
        first = np.asarray(state.tok)
        prefill_s = time.perf_counter() - t0 - self._compile_s
        out, decode_s, steps = self._serve(prep, state, first, sampling, eos, stream_callback)
        limits = [int(x) for x in prep.limits]
        n_generated = sum(len(r) - 1 for r in out)
        timings = {
            "compile_s": self._compile_s,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_steps": float(steps),
            "decode_tokens": float(n_generated),
            "decode_tokens_per_s": (n_generated / decode_s) if decode_s > 0 and n_generated else 0.0,
            "prompt_tokens": float(max(len(p) for p in prep.prompt_token_ids)),
            "prompt_bucket": float(prep.prompt_len),
            "batch_rows": float(len(prep.limits)),
            "kv_cache_bytes": float(kv_cache_bytes(self.cfg, len(prep.limits), prep.max_len)),
            "num_compiles": float(self.num_compiles),
        }
        eos_set = set(int(e) for e in eos)
        results = []
        for b, toks in enumerate(out):
            toks = toks[: limits[b]]
            reason = "eos" if toks and toks[-1] in eos_set else "length"
            results.append(GenerationResult(toks, prep.prompt_token_ids[b], reason, dict(timings), self.num_compiles))
        return results

    def _serve(self, prep: PreparedBatch, state: D.DecodeState, first: np.ndarray, sampling: SamplingParams,
               eos: tuple[int, ...], stream_callback: Callable[[list[list[int]]], None] | None,
               ) -> tuple[list[list[int]], float, int]:
        """The decode loop of a prefilled batch: chunks until every real row is done, streaming each chunk's new
        tokens. Returns (tokens per real row, first included; decode seconds without compiles; decode steps)."""
        eos_set = set(int(e) for e in eos)
        n_rows = len(prep.prompt_token_ids)
        limits = [int(x) for x in prep.limits]
        out: list[list[int]] = [[int(x)] for x in first[:n_rows]]
        done = [int(first[b]) in eos_set or limits[b] <= 1 for b in range(n_rows)]
        if stream_callback is not None:
            stream_callback([list(r) for r in out])
        steps = 0
        statics, args = self._decode_args(state, sampling, eos_array(eos))  # the same for every chunk
        c0 = self._compile_s
        t_dec = time.perf_counter()
        pending = None
        while True:
            # Dispatch the next chunk before reading the previous one: `done` lags one chunk behind, and a chunk
            # dispatched after the end returns at once with no tokens.
            nxt = None
            if not all(done):
                args = (args[0], state, *args[2:])
                state, buf, n = self._executable("decode", statics, args, donate=(1,))(*args)
                nxt = (buf, n)
            if pending is not None:
                buf_np, n_np = np.asarray(pending[0]), int(pending[1])
                new: list[list[int]] = [[] for _ in range(n_rows)]
                for b in range(n_rows):
                    for tok in buf_np[b, :n_np]:
                        if done[b]:
                            break
                        new[b].append(int(tok))
                        done[b] = int(tok) in eos_set or len(out[b]) + len(new[b]) >= limits[b]
                    out[b].extend(new[b])
                steps += n_np
                if stream_callback is not None and n_np:
                    stream_callback(new)
            if nxt is None:
                break
            pending = nxt
        return out, time.perf_counter() - t_dec - (self._compile_s - c0), steps

    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 seed: int = 0, eos_ids: Sequence[int] | None = None,
                 stream_callback: Callable[[list[int]], None] | None = None, max_thinking_tokens: int | None = None,
                 think_end_ids: Sequence[int] | None = None, think_start_id: int | None = None) -> GenerationResult:
        """One prompt (batch of 1). `stream_callback(new_token_ids)` is called per chunk."""
        cb = None if stream_callback is None else (lambda rows: stream_callback(rows[0]) if rows[0] else None)
        res = self.generate_batch(inputs, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                  eos_ids=eos_ids, stream_callback=cb, max_thinking_tokens=max_thinking_tokens,
                                  think_end_ids=think_end_ids, think_start_id=think_start_id)
        if len(res) != 1:
            raise GenerationError(f"generate() takes one prompt, got a batch of {len(res)}; use generate_batch()")
        return res[0]
