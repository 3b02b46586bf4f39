"""`glm41v generate`: chat with a GLM-4.1V checkpoint from the command line, streaming the reply.

    glm41v generate [--model M] [--image P]... [--video P]... --prompt TEXT [--system TEXT]
                    [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K] [--top-p P]
                    [--repetition-penalty R] [--seed S] [--json] [--dtype float32|bfloat16]

The user turn holds the images, then the videos, then the prompt text. Decoded text is streamed to stdout as it is
generated, with the model's `<think>` part shown under "thinking:" and its `<answer>` part under "answer:". With
`--json` the last stdout line is one JSON object (prompt_token_ids, token_ids, text, thinking, answer, timings,
num_compiles, ...). Without `--model` the embedded tiny checkpoint runs: its weights are random and its output is
meaningless (said on stderr).

Sampling defaults come from the checkpoint's generation_config.json (do_sample, temperature, top_k, top_p,
repetition_penalty); any of
--temperature/--top-k/--top-p switches sampling on, --greedy switches it off. Expected failures (missing or
corrupt media, bad model path, empty prompt, prompt too long for the context) print one `error: ...` line on
stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

DEFAULT_MAX_NEW_TOKENS = 1024
TAG_LABELS = {"<think>": "thinking:\n", "</think>": "\n\n", "<answer>": "answer:\n", "</answer>": ""}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `generate` subcommand to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="generate a reply to a prompt with images / videos (streams text)",
        description="Run GLM-4.1V on one user turn (images, then videos, then the prompt) and stream the reply.",
    )
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, converted directory or hub id (default: the embedded tiny "
                        "checkpoint with RANDOM weights)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"at most this many generated tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides the sampling options)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (turns sampling on)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (turns sampling on)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (turns sampling on)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF repetition penalty (default: generation_config.json's, else 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--chunk-size", type=int, default=16, help="tokens per device round trip (default 16)")
    p.set_defaults(func=run)
    return p


class CliError(Exception):
    """A user-facing problem: printed as one `error:` line, exit code 2."""


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg


class StreamPrinter:
    """Incremental detokenisation with the thinking / answer tags turned into section labels.

    Decodes the whole generated sequence each time (so multi-token characters come out right), writes only the new
    suffix, and holds back a trailing partial character or a possible partial tag.
    """

    def __init__(self, decode: Any, out: TextIO) -> None:
        self.decode = decode
        self.out = out
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handled
        self.wrote_any = False
        self.at_line_start = True

    def _hold(self, text: str) -> int:
        """How many trailing characters to hold back."""
        if text.endswith("\ufffd"):
            return 1
        for n in range(min(len(text), max(len(t) for t in TAG_LABELS) - 1), 0, -1):
            tail = text[-n:]
            if any(tag.startswith(tail) and tag != tail for tag in TAG_LABELS):
                return n
        return 0

    def _write(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()
            self.wrote_any = True
            self.at_line_start = s.endswith("\n")

    def _render(self, s: str) -> str:
        for tag, label in TAG_LABELS.items():
            s = s.replace(tag, label)
        return s

    def feed(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.decode(self.ids)
        end = len(text) - self._hold(text[self.emitted:])
        if end > self.emitted:
            self._write(self._render(text[self.emitted:end]))
            self.emitted = end

    def finish(self) -> str:
        text = self.decode(self.ids)
        self._write(self._render(text[self.emitted:]))
        self.emitted = len(text)
        if not self.at_line_start:
            self._write("\n")
        return text


def _configure_jax() -> None:
    """CPU-friendly defaults that do not override anything the user set."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _sampling_from(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                gen = json.load(f) or {}
        except (OSError, json.JSONDecodeError):
            gen = {}
    explicit = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    greedy = args.greedy or not (explicit or bool(gen.get("do_sample", False)))

    def pick(name: str, flag: Any, default: Any) -> Any:
        if flag is not None:
            return flag
        v = gen.get(name)
        return default if v is None else v

    temperature = float(pick("temperature", args.temperature, 1.0))
    top_k = pick("top_k", args.top_k, None)
    top_p = pick("top_p", args.top_p, None)
    rep = float(pick("repetition_penalty", args.repetition_penalty, 1.0))
    if not rep > 0:
        raise CliError(f"--repetition-penalty must be > 0, got {rep}")
    if not greedy and not temperature > 0:
        raise CliError(f"--temperature must be > 0, got {temperature}")
    if top_k is not None and int(top_k) < 0:
        raise CliError(f"--top-k must be >= 0, got {top_k}")
    if top_p is not None and not 0.0 <= float(top_p) <= 1.0:
        raise CliError(f"--top-p must be in [0, 1], got {top_p}")
    return {"greedy": greedy, "temperature": temperature, "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p), "repetition_penalty": rep}


def _check_media(paths: list[str], kind: str) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise CliError(f"{kind} file not found: {p}")
        if not os.path.isfile(p):
            raise CliError(f"{kind} path is not a file: {p}")


def build_messages(prompt: str, images: list[str], videos: list[str], system: str | None = None
                   ) -> list[dict[str, Any]]:
    """HF-format messages: optional system turn, then one user turn with images, videos, then the text."""
    content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in images]
    content += [{"type": "video", "video": p} for p in videos]
    content.append({"type": "text", "text": prompt})
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": content})
    return msgs


def _generate(args: argparse.Namespace) -> int:
    _configure_jax()
    if not args.prompt or not args.prompt.strip():
        raise CliError("empty prompt: --prompt needs some text")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise CliError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    _check_media(args.image, "image")
    _check_media(args.video, "video")

    import jax
    import numpy as np

    from . import tiny
    from .generate import Engine, read_eos_ids
    from .loading import load, resolve_model_dir
    from .processing import Processor
    from .sampling import SamplingParams
    from .thinking import parse_response

    random_weights = args.model is None
    if random_weights:
        directory = tiny.materialize_tiny_checkpoint()
        print("note: no --model given: running the embedded tiny checkpoint, whose weights are RANDOM; "
              "its output is meaningless", file=sys.stderr)
    else:
        directory = resolve_model_dir(args.model)
    processor = Processor.from_dir(directory)
    inputs = processor.encode_messages(build_messages(args.prompt, args.image, args.video, args.system))
    inputs = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    sampling = SamplingParams(**_sampling_from(args, directory))

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    params, cfg = load(directory, dtype=dtype)
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype)
    load_s = time.perf_counter() - t0
    eos = read_eos_ids(directory, cfg)

    engine = Engine(params, cfg, chunk_size=args.chunk_size)
    printer = StreamPrinter(lambda ids: processor.decode(ids, skip_special_tokens=True), sys.stdout)
    result = engine.generate(inputs, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                             eos_ids=eos, stream_callback=printer.feed)
    text = printer.finish()
    parsed = parse_response(text)
    t = result.timings
    print(f"[{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} generated ({result.finish_reason})"
          f"; load {load_s:.2f}s, compile {t['compile_s']:.2f}s, prefill {t['prefill_s']:.3f}s, "
          f"decode {t['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    if args.json:
        record = {
            "model": "embedded-tiny-random" if random_weights else args.model,
            "random_weights": random_weights,
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": text,
            "thinking": parsed["thinking"],
            "answer": parsed["answer"],
            "finish_reason": result.finish_reason,
            "sampling": {"greedy": sampling.greedy, "temperature": sampling.temperature, "top_k": sampling.top_k,
                         "top_p": sampling.top_p, "repetition_penalty": sampling.repetition_penalty,
                         "seed": args.seed},
            "dtype": dtype,
            "timings": {**t, "load_s": load_s},
            "num_compiles": result.num_compiles,
        }
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    """The `generate` subcommand. Returns the process exit code."""
    from .config import ConfigError
    from .generate import GenerationError
    from .loading import CheckpointError
    from .processing import ProcessingError
    from .weights import WeightsError

    try:
        return _generate(args)
    except (CliError, ProcessingError, CheckpointError, ConfigError, WeightsError, GenerationError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
