"""The high-level API: a checkpoint, its processor and one generation Engine, serving lists of requests.

    from glm41v_jax import Pipeline, Request
    pipe = Pipeline.load("zai-org/GLM-4.1V-9B-Thinking", mesh="tensor=4,fsdp=2")   # or a local / converted dir
    outs = pipe.generate([Request("Describe this.", images=["cat.png"]), Request("Hello!")], batch_size=8)
    outs[0]["answer"], outs[0]["token_ids"], outs[0]["timings"]

Requests run in batches of `batch_size` rows, in input order; every batch is padded to `batch_size` rows (dummy
rows stop after one token), so one compiled program per prompt/vision bucket serves every batch. Each row stops on
its own eos or its own `max_new_tokens`. A request that cannot be encoded (missing image, ...) either raises or,
with `errors="return"`, yields `{"error": ...}` while the other requests still run.

`Pipeline.stream` takes any iterable of requests (a generator reading a file, say) and works one batch at a time:
it encodes `batch_size` requests, runs them, yields their records, and only then reads on, so host memory holds one
batch whatever the number of requests.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import tiny
from .backend import backend_default
from .config import Glm4vConfig, RuntimeConfig
from .engine import Engine, check_prefill_chunk
from .errors import Glm41vError, one_line
from .loading import load, resolve_model_dir
from .lora import base_identity, check_base, load_adapters, merge_adapters, read_adapter_config
from .processing import Processor
from .quant import is_quantized
from .requests import GenerationError, collate, read_eos_ids
from .sampling import SamplingParams, read_generation_config
from .sharding import make_mesh
from .thinking import FORCED_ANSWER, NO_THINKING_PREFIX, parse_response

REQUEST_FIELDS = ("prompt", "system", "images", "videos", "max_new_tokens")
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # jax.random.PRNGKey keeps a seed's low 32 bits
# Error records waiting behind a batch that is still filling up: past this many the batch runs early, so a file
# of mostly bad lines does not pile up records in memory.
MAX_WAITING_RECORDS = 1024


class RequestError(Glm41vError, ValueError):
    """A malformed request (bad field, missing file); the message names the field."""


def _show(v: Any) -> str:
    """A value for an error message: short scalars as they are, anything else by its type (never a huge repr)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        r = repr(v)
        return r if len(r) <= 40 else r[:37] + "..."
    return f"a JSON {'object' if isinstance(v, Mapping) else 'array' if isinstance(v, list) else type(v).__name__}"


def _check_text(field: str, v: Any, *, required: bool) -> None:
    if v is None and not required:
        return
    if not isinstance(v, str):
        raise RequestError(f"field {field!r}: expected a string, got {_show(v)}")
    if required and not v.strip():
        raise RequestError(f"field {field!r}: expected a non-empty string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"field {field!r}: not valid Unicode (lone surrogate {v[e.start]!r} at character "
                           f"{e.start})") from None


def _check_path(field: str, p: Any) -> None:
    if isinstance(p, os.PathLike):
        p = os.fspath(p)
    if isinstance(p, str):  # file names may hold lone surrogates (undecodable bytes, surrogateescape'd): allowed
        if not p.strip():
            raise RequestError(f"field {field!r}: expected a non-empty string")
        if "\0" in p:
            raise RequestError(f"field {field!r}: a file path holds a NUL character")


def check_max_new_tokens(v: Any, field: str = "max_new_tokens", error: type[Glm41vError] = RequestError) -> int:
    """An integer in [1, 2**31 - 1] (the context check comes later, against the engine's max_context)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= INT32_MAX:
        raise error(f"field {field!r}: expected an integer in [1, {INT32_MAX}], got {_show(v)}")
    return int(v)


@dataclasses.dataclass
class Request:
    """One generation request: a user turn (images, then videos, then the prompt text) or full HF `messages`."""

    prompt: str | None = None
    images: Sequence[Any] = ()
    videos: Sequence[Any] = ()
    system: str | None = None
    max_new_tokens: int | None = None
    messages: Sequence[Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        """One validation for every way a request is made (batch-file line, dict, constructor): types and ranges;
        any problem is a RequestError naming the field."""
        if self.messages is not None:
            if not isinstance(self.messages, (list, tuple)) or not self.messages or \
                    not all(isinstance(m, Mapping) for m in self.messages):
                raise RequestError("field 'messages': expected a non-empty list of {'role', 'content'} objects")
        else:
            _check_text("prompt", self.prompt, required=True)
        _check_text("system", self.system, required=False)
        for key in ("images", "videos"):
            v = getattr(self, key)
            if isinstance(v, (str, os.PathLike)):
                v = [v]
            if v is None:
                v = []
            if not isinstance(v, (list, tuple)):
                raise RequestError(f"field {key!r}: expected a list of file paths, got {_show(v)}")
            for p in v:
                _check_path(key, p)
            setattr(self, key, list(v))
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_max_new_tokens(self.max_new_tokens)

    @classmethod
    def from_dict(cls, d: Any, base_dir: str | os.PathLike | None = None) -> Request:
        """A batch-file record {"prompt", "system", "images", "videos", "max_new_tokens"} (only prompt required);
        relative media paths resolve against `base_dir`."""
        if not isinstance(d, Mapping):
            raise RequestError(f"expected a JSON object, got {_show(d)}")
        unknown = sorted(set(d) - set(REQUEST_FIELDS), key=str)
        if unknown:
            shown = ", ".join(_show(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise RequestError(f"unknown field(s) {shown}; expected {', '.join(REQUEST_FIELDS)}")
        media = {}
        for key in ("images", "videos"):
            v = d.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise RequestError(f"field {key!r}: expected a list of file paths (strings), got {_show(v)}")
            for p in v:
                _check_path(key, p)
            media[key] = [p if base_dir is None or os.path.isabs(p) else os.path.join(os.fspath(base_dir), p)
                          for p in v]
        return cls(prompt=d.get("prompt"), images=media["images"], videos=media["videos"], system=d.get("system"),
                   max_new_tokens=d.get("max_new_tokens"))

    def to_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        if self.prompt is None or not str(self.prompt).strip():
            raise RequestError("empty prompt: a request needs some text")
        for kind, items in (("image", self.images), ("video", self.videos)):
            for p in items:
                if isinstance(p, (str, os.PathLike)) and not os.path.isfile(p):
                    what = ("is a directory" if os.path.isdir(p) else "is not a regular file" if os.path.exists(p)
                            else "is a broken symbolic link or a symbolic link loop" if os.path.lexists(p)
                            else "not found")
                    raise RequestError(f"{kind} file {what}: {p}")
        content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in self.images]
        content += [{"type": "video", "video": p} for p in self.videos]
        content.append({"type": "text", "text": self.prompt})
        msgs: list[dict[str, Any]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": content})
        return msgs


def _with_adapter(params: Any, cfg: Glm4vConfig, adapter: str, model: str) -> tuple[Any, Glm4vConfig, Any]:
    """(params, cfg, adapters for the Engine) with the LoRA adapter in `adapter`: merged into float `params` (no
    adapters left), or kept unmerged on quantized ones (`cfg` then carries their LoRA sites; merging would requantize
    the codes). LoraError: another base, a damaged adapter."""
    adapters, lcfg, meta = load_adapters(adapter, cfg)
    check_base(meta, base_identity(params, cfg), adapter, model)
    if is_quantized(params):
        return params, lcfg, adapters
    return merge_adapters(params, adapters, lcfg), cfg, None


def auto_mesh_spec(num_heads: int, n_devices: int) -> str | None:
    """The default generation mesh: tensor parallel over as many devices as divide the query heads (at most 8),
    FSDP over the rest. None on one device."""
    if n_devices <= 1:
        return None
    t = math.gcd(n_devices, num_heads, 8)
    return f"tensor={t},fsdp={n_devices // t}"


class Pipeline:
    """A loaded model ready to serve: `engine` (compiled programs, params), `processor`, `eos_ids`."""

    def __init__(self, engine: Engine, processor: Any, *, eos_ids: Sequence[int], directory: str | None = None,
                 random_weights: bool = False) -> None:
        self.engine = engine
        self.processor = processor
        self.eos_ids = tuple(eos_ids)
        self.directory = directory
        self.random_weights = random_weights
        self.think_end_ids = processor.tokenizer.encode(FORCED_ANSWER, add_special_tokens=False).ids
        self.last_summary: dict[str, Any] = {}

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, runtime: RuntimeConfig | None = None, *,
             mesh: Any = "auto", chunk_size: int = 16, max_context: int | None = None,
             prefill_chunk: int | None = None, check_directory: Callable[[str], Any] | None = None,
             adapter: str | os.PathLike | None = None,
             **overrides: Any) -> Pipeline:
        """Load a checkpoint (HF dir, converted dir or hub id; None: the embedded tiny random checkpoint).

        runtime, overrides: how to run, as `loading.load` takes them (a `RuntimeConfig`, and its fields by name:
        `param_dtype`, `compute_dtype`, `attention_impl`, ...; also `verify`; `quantize="int8"|"int4"` with
        `quant_group_size`, `quant_skip` quantizes a float checkpoint at load, leaf by leaf into the shardings, and a
        quantized checkpoint needs none of them). Without a `runtime`, the weights and the
        computation default to the platform's dtype (`backend.BACKEND_TUNING`: float32 on CPU, bfloat16 on TPU/GPU);
        the CLIs' `--dtype D` is `**config.dtype_flag(D)`. mesh: a `Mesh`, a spec string "data=D,fsdp=F,tensor=T",
        "auto" (`auto_mesh_spec` over all devices) or None (one device).
        The config's limits and the side files (generation config, tokenizer, chat template, processor configs) are
        checked before the weights are read; `check_directory(directory)` runs then too, for the caller's checks.
        adapter: a LoRA adapter directory (`glm41v train` with a lora: section writes one as output_dir/final),
        checked against the model (`lora.check_base`: LoraError for another base) and merged into the float weights
        at load (`lora.merge_adapters`: fp32, rounded once), so generation runs at the base model's speed with no
        extra matmul; on a quantized base (int8/int4, stored or `quantize=`) the adapters run unmerged beside the
        codes (`Engine(adapters=...)`: the model QLoRA trained, two small matmuls more per adapted layer).
        prefill_chunk: the Engine's chunked prefill (tokens; None: the platform's, 0: one piece; `Engine`).
        """
        random_weights = model is None
        directory = tiny.materialize_tiny_checkpoint() if random_weights else resolve_model_dir(model)
        if runtime is None:
            default = backend_default(jax.default_backend(), "dtype")
            overrides = {"param_dtype": default, "compute_dtype": default, **overrides}
        # Everything that can be checked before the weights are read: the config's limits, the side files.
        config_path = os.path.join(directory, "config.json")
        text_cfg = Glm4vConfig.from_file(config_path).text if os.path.isfile(config_path) else None
        if max_context is not None and text_cfg is not None and (
                isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer))
                or not 1 <= max_context <= text_cfg.max_position_embeddings):
            raise GenerationError(f"max_context must be an integer in [1, {text_cfg.max_position_embeddings}] (the "
                                  f"model's max_position_embeddings), got {_show(max_context)}")
        prefill_chunk = check_prefill_chunk(prefill_chunk)
        if adapter is not None:  # a bad adapter directory fails before the weights are read
            read_adapter_config(os.fspath(adapter))
        read_generation_config(directory)
        processor = Processor.from_dir(directory)
        if check_directory is not None:
            check_directory(directory)
        if isinstance(mesh, str):
            if mesh == "auto":
                heads = Glm4vConfig.from_file(config_path).text.num_attention_heads
                mesh = auto_mesh_spec(heads, jax.device_count())
            mesh = None if mesh is None else make_mesh(mesh)
        params, cfg = load(directory, runtime, mesh=mesh, **overrides)
        adapters = None
        if adapter is not None:
            params, cfg, adapters = _with_adapter(params, cfg, os.fspath(adapter),
                                                  directory if model is None else os.fspath(model))
        engine = Engine(params, cfg, mesh=mesh, chunk_size=chunk_size, max_context=max_context, adapters=adapters,
                        prefill_chunk=prefill_chunk)
        return cls(engine, processor, eos_ids=read_eos_ids(directory, cfg), directory=directory,
                   random_weights=random_weights)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, request: Request | Mapping[str, Any], no_thinking: bool = False,
               text_special_tokens: bool = False) -> dict[str, np.ndarray]:
        """One request -> the processor's arrays (one row). The user's text is plain text unless
        `text_special_tokens` (see `Processor.encode_messages`)."""
        req = request if isinstance(request, Request) else Request.from_dict(request)
        enc = self.processor.encode_messages(req.to_messages(),
                                             assistant_prefix=NO_THINKING_PREFIX if no_thinking else "",
                                             text_special_tokens=text_special_tokens)
        return {k: v for k, v in enc.items() if isinstance(v, np.ndarray)}

    def record(self, result: Any) -> dict[str, Any]:
        """A GenerationResult -> the JSON record of `glm41v generate --json`."""
        text = self.processor.decode(result.token_ids, skip_special_tokens=True)
        parsed = parse_response(text)
        return {"prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids, "text": text,
                "thinking": parsed["thinking"], "answer": parsed["answer"], "finish_reason": result.finish_reason,
                "timings": dict(result.timings), "num_compiles": result.num_compiles}

    # ------------------------------------------------------------------------------------------------ serving
    def generate(
        self,
        requests: Iterable[Request | Mapping[str, Any] | BaseException],
        *,
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
        **kw: Any,
    ) -> list[dict[str, Any]]:
        """Generate for every request; returns one record per request, in input order (arguments: `stream`).

        A request given as an exception (e.g. a batch-file line that did not parse) is reported as its error.
        `on_result(index, record)` is called as soon as a record is final (in input order).
        """
        out = []
        for i, rec in self.stream(requests, **kw):
            if on_result is not None:
                on_result(i, rec)
            out.append(rec)
        return out

    def stream(
        self,
        requests: Iterable[Request | Mapping[str, Any] | BaseException],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        max_thinking_tokens: int | None = None,
        no_thinking: bool = False,
        text_special_tokens: bool = False,
        errors: str = "raise",
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (index, record) for every request, in input order, one batch at a time.

        Requests are read from `requests` only as needed: `batch_size` of them are encoded, generated and yielded
        before the next one is read, so memory does not grow with the number of requests. With `errors="raise"`
        the first bad request raises (after the batches before it ran); with "return" it yields {"error": ...}.
        `self.last_summary` holds the aggregate figures once the iteration ends.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not batch_size >= 1:
            raise GenerationError(f"batch_size must be an integer >= 1, got {_show(batch_size)}")
        max_new_tokens = check_max_new_tokens(max_new_tokens, "max_new_tokens", GenerationError)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
            raise GenerationError(f"seed must be an integer in [0, {SEED_MAX}], got {_show(seed)}")
        if max_thinking_tokens is not None and (isinstance(max_thinking_tokens, bool) or not isinstance(
                max_thinking_tokens, (int, np.integer)) or not 0 <= max_thinking_tokens <= INT32_MAX):
            raise GenerationError(f"max_thinking_tokens must be an integer in [0, {INT32_MAX}], got "
                                  f"{_show(max_thinking_tokens)}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        think = {}
        if max_thinking_tokens is not None:
            think = {"max_thinking_tokens": int(max_thinking_tokens), "think_end_ids": self.think_end_ids}
        work = _Batches(self, errors, dict(sampling=sampling, eos_ids=self.eos_ids, **think), seed)
        t0 = time.perf_counter()
        ran_full = False
        try:
            for i, req in enumerate(requests):
                work.add(i, req, max_new_tokens, no_thinking=no_thinking, text_special_tokens=text_special_tokens)
                if len(work.batch) == batch_size or (work.batch and
                                                     len(work.queue) - len(work.batch) > MAX_WAITING_RECORDS):
                    ran_full = True
                    work.run(batch_size)
                yield from work.ready()
            if work.batch:
                # A file that fits in one batch is padded to its own size; otherwise every batch to batch_size.
                work.run(batch_size if ran_full else len(work.batch))
            yield from work.ready()
        finally:
            self.last_summary = work.summary(int(batch_size), time.perf_counter() - t0)


class _Batches:
    """The requests of one `Pipeline.stream` call: the batch being filled, the records not yielded yet (in input
    order: [index, record or None while its batch has not run]) and the running totals."""

    def __init__(self, pipe: Pipeline, errors: str, generate_kw: dict[str, Any], seed: int) -> None:
        self.pipe = pipe
        self.errors = errors
        self.generate_kw = generate_kw
        self.seed = seed
        self.totals = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0.0, "compile_s": 0.0}
        self.counts = {"requests": 0, "failed": 0, "batches": 0, "generated_tokens": 0}
        self.queue: collections.deque[list[Any]] = collections.deque()
        self.batch: list[tuple[int, dict[str, np.ndarray], int]] = []

    def error_record(self, e: BaseException) -> dict[str, Any]:
        if self.errors == "raise":
            raise e
        self.counts["failed"] += 1
        return {"error": one_line(e)}

    def add(self, i: int, req: Request | Mapping[str, Any] | BaseException, max_new_tokens: int, *,
            no_thinking: bool, text_special_tokens: bool) -> None:
        """Encode and check one request (its limits, before any device work): into the batch, or an error record."""
        self.counts["requests"] += 1
        try:
            if isinstance(req, BaseException):
                raise req
            r = req if isinstance(req, Request) else Request.from_dict(req)
            n = r.max_new_tokens or max_new_tokens
            enc = self.pipe.encode(r, no_thinking=no_thinking, text_special_tokens=text_special_tokens)
            self.pipe.engine.prepare(enc, n)
        except (Glm41vError, OSError) as e:
            self.queue.append([i, self.error_record(e)])
        else:
            self.batch.append((i, enc, n))
            self.queue.append([i, None])

    def run(self, pad_to: int) -> None:
        """Generate the batch (padded to `pad_to` rows) and fill in its records."""
        engine = self.pipe.engine
        idx = [c[0] for c in self.batch]
        done: dict[int, dict[str, Any]] = {}
        try:
            inputs = collate([c[1] for c in self.batch], engine.cfg.text.pad_token_id)
            results = engine.generate_batch(inputs, max_new_tokens=[c[2] for c in self.batch],
                                            seed=self.seed + self.counts["batches"], pad_batch_to=pad_to,
                                            **self.generate_kw)
        except GenerationError as e:
            for i in idx:
                done[i] = self.error_record(e)
        else:
            self.counts["batches"] += 1
            tm = results[0].timings
            for k in self.totals:
                self.totals[k] += tm[k]
            for i, res in zip(idx, results, strict=True):
                done[i] = self.pipe.record(res)
                self.counts["generated_tokens"] += len(res.token_ids)
        self.batch.clear()
        for item in self.queue:
            if item[1] is None:
                item[1] = done[item[0]]

    def ready(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The records at the head of the queue whose batch has run."""
        while self.queue and self.queue[0][1] is not None:
            i, rec = self.queue.popleft()
            yield i, rec

    def summary(self, batch_size: int, wall: float) -> dict[str, Any]:
        c, t = self.counts, self.totals
        return {
            "requests": c["requests"], "failed": c["failed"], "batches": c["batches"], "batch_size": batch_size,
            "prefill_s": t["prefill_s"], "decode_s": t["decode_s"], "generated_tokens": c["generated_tokens"],
            "decode_tokens_per_s": t["decode_tokens"] / t["decode_s"] if t["decode_s"] > 0 else 0.0,
            "compile_s": t["compile_s"], "wall_s": wall, "num_compiles": self.pipe.engine.num_compiles,
        }
