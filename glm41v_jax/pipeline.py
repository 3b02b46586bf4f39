"""The high-level API: a checkpoint, its processor and one generation Engine, serving lists of requests.

    from glm41v_jax import Pipeline, Request
    pipe = Pipeline.load("zai-org/GLM-4.1V-9B-Thinking", mesh="tensor=4,fsdp=2")   # or a local / converted dir
    outs = pipe.generate([Request("Describe this.", images=["cat.png"]), Request("Hello!")], batch_size=8)
    outs[0]["answer"], outs[0]["token_ids"], outs[0]["timings"]

Requests run in batches of `batch_size` rows, in input order; every batch is padded to `batch_size` rows (dummy
rows stop after one token), so one compiled program per prompt/vision bucket serves every batch. Each row stops on
its own eos or its own `max_new_tokens`. A request that cannot be encoded (missing image, ...) either raises or,
with `errors="return"`, yields `{"error": ...}` while the other requests still run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import Glm41vError
from .generate import Engine, GenerationError, collate, read_eos_ids
from .sampling import SamplingParams
from .thinking import FORCED_ANSWER, NO_THINKING_PREFIX, parse_response

REQUEST_FIELDS = ("prompt", "system", "images", "videos", "max_new_tokens")


class RequestError(Glm41vError, ValueError):
    """A malformed request (bad field, missing file); the message names the field."""


@dataclasses.dataclass
class Request:
    """One generation request: a user turn (images, then videos, then the prompt text) or full HF `messages`."""

    prompt: str | None = None
    images: Sequence[Any] = ()
    videos: Sequence[Any] = ()
    system: str | None = None
    max_new_tokens: int | None = None
    messages: Sequence[Mapping[str, Any]] | None = None

    @classmethod
    def from_dict(cls, d: Any, base_dir: str | os.PathLike | None = None) -> Request:
        """A batch-file record {"prompt", "system", "images", "videos", "max_new_tokens"} (only prompt required);
        relative media paths resolve against `base_dir`."""
        if not isinstance(d, Mapping):
            raise RequestError(f"expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                               f"expected {', '.join(REQUEST_FIELDS)}")
        prompt = d.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("field 'prompt': expected a non-empty string")
        system = d.get("system")
        if system is not None and not isinstance(system, str):
            raise RequestError(f"field 'system': expected a string, got {type(system).__name__}")
        media = {}
        for key in ("images", "videos"):
            v = d.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise RequestError(f"field {key!r}: expected a list of file paths")
            media[key] = [p if base_dir is None or os.path.isabs(p) else os.path.join(os.fspath(base_dir), p)
                          for p in v]
        n = d.get("max_new_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise RequestError(f"field 'max_new_tokens': expected an integer >= 1, got {n!r}")
        return cls(prompt=prompt, images=media["images"], videos=media["videos"], system=system, max_new_tokens=n)

    def to_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        if self.prompt is None or not str(self.prompt).strip():
            raise RequestError("empty prompt: a request needs some text")
        for kind, items in (("image", self.images), ("video", self.videos)):
            for p in items:
                if isinstance(p, (str, os.PathLike)) and not os.path.isfile(p):
                    raise RequestError(f"{kind} file not found: {p}")
        content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in self.images]
        content += [{"type": "video", "video": p} for p in self.videos]
        content.append({"type": "text", "text": self.prompt})
        msgs: list[dict[str, Any]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": content})
        return msgs


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
    def load(cls, model: str | os.PathLike | None = None, *, dtype: str | None = None, mesh: Any = "auto",
             chunk_size: int = 16, max_context: int | None = None, **runtime: Any) -> Pipeline:
        """Load a checkpoint (HF dir, converted dir or hub id; None: the embedded tiny random checkpoint).

        dtype: weights and activations (default float32 on CPU, bfloat16 on accelerators). mesh: a `Mesh`, a spec
        string "data=D,fsdp=F,tensor=T", "auto" (`auto_mesh_spec` over all devices) or None (one device).
        """
        import jax

        from . import tiny
        from .config import Glm4vConfig
        from .loading import load, resolve_model_dir
        from .processing import Processor
        from .sharding import make_mesh

        random_weights = model is None
        directory = tiny.materialize_tiny_checkpoint() if random_weights else resolve_model_dir(model)
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        if isinstance(mesh, str):
            if mesh == "auto":
                heads = Glm4vConfig.from_file(os.path.join(directory, "config.json")).text.num_attention_heads
                mesh = auto_mesh_spec(heads, jax.device_count())
            mesh = None if mesh is None else make_mesh(mesh)
        params, cfg = load(directory, dtype=dtype, mesh=mesh, **runtime)
        cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype)
        engine = Engine(params, cfg, mesh=mesh, chunk_size=chunk_size, max_context=max_context)
        return cls(engine, Processor.from_dir(directory), eos_ids=read_eos_ids(directory, cfg), directory=directory,
                   random_weights=random_weights)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, request: Request | Mapping[str, Any], no_thinking: bool = False) -> dict[str, np.ndarray]:
        """One request -> the processor's arrays (one row)."""
        req = request if isinstance(request, Request) else Request.from_dict(request)
        enc = self.processor.encode_messages(req.to_messages(),
                                             assistant_prefix=NO_THINKING_PREFIX if no_thinking else "")
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
        requests: Sequence[Request | Mapping[str, Any] | BaseException],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        max_thinking_tokens: int | None = None,
        no_thinking: bool = False,
        errors: str = "raise",
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate for every request; returns one record per request, in input order.

        A request given as an exception (e.g. a batch-file line that did not parse) is reported as its error.
        `on_result(index, record)` is called as soon as a record is final (in input order).
        """
        if batch_size < 1:
            raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        from .processing import ProcessingError

        records: list[dict[str, Any] | None] = [None] * len(requests)
        encoded: list[tuple[int, dict[str, np.ndarray], int]] = []
        emitted = 0

        def fail(i: int, e: BaseException) -> None:
            if errors == "raise":
                raise e
            records[i] = {"error": " ".join(str(e).split()) or type(e).__name__}

        def flush() -> None:
            nonlocal emitted
            while emitted < len(records) and records[emitted] is not None:
                if on_result is not None:
                    on_result(emitted, records[emitted])
                emitted += 1

        for i, req in enumerate(requests):
            try:
                if isinstance(req, BaseException):
                    raise req
                r = req if isinstance(req, Request) else Request.from_dict(req)
                n = r.max_new_tokens or max_new_tokens
                enc = self.encode(r, no_thinking=no_thinking)
                self.engine.prepare(enc, n)  # per-request limits, before any device work
                encoded.append((i, enc, n))
            except (RequestError, ProcessingError, GenerationError, OSError) as e:
                fail(i, e)
        flush()
        totals = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0.0, "compile_s": 0.0}
        n_batches = 0
        think = {}
        if max_thinking_tokens is not None:
            think = {"max_thinking_tokens": max_thinking_tokens, "think_end_ids": self.think_end_ids}
        t0 = time.perf_counter()
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            idx = [c[0] for c in chunk]
            try:
                batch = collate([c[1] for c in chunk], self.engine.cfg.text.pad_token_id)
                results = self.engine.generate_batch(
                    batch, max_new_tokens=[c[2] for c in chunk], sampling=sampling, seed=seed + n_batches,
                    eos_ids=self.eos_ids, pad_batch_to=min(batch_size, len(encoded)), **think)
            except GenerationError as e:
                for i in idx:
                    fail(i, e)
                flush()
                continue
            n_batches += 1
            tm = results[0].timings
            for k in totals:
                totals[k] += tm[k]
            for i, res in zip(idx, results, strict=True):
                records[i] = self.record(res)
            flush()
        wall = time.perf_counter() - t0
        failed = sum(1 for r in records if r is not None and "error" in r)
        self.last_summary = {
            "requests": len(requests), "failed": failed, "batches": n_batches, "batch_size": batch_size,
            "prefill_s": totals["prefill_s"], "decode_s": totals["decode_s"],
            "generated_tokens": int(sum(len(r["token_ids"]) for r in records if r is not None and "token_ids" in r)),
            "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] > 0 else 0.0,
            "compile_s": totals["compile_s"], "wall_s": wall, "num_compiles": self.engine.num_compiles,
        }
        return [r if r is not None else {"error": "not run"} for r in records]
