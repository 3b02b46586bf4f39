"""`glm41v generate`: run GLM-4.1V from the command line, one prompt (streamed) or a batch file of requests.

    glm41v generate [--model M] [--image P]... [--video P]... --prompt TEXT [--system TEXT]
                    [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K] [--top-p P]
                    [--repetition-penalty R] [--seed S] [--json] [--dtype float32|bfloat16]
                    [--mesh data=D,fsdp=F,tensor=T] [--max-context N] [--max-thinking-tokens N] [--no-thinking]
    glm41v generate [--model M] --batch-file requests.jsonl [--batch-size N] [...]

The user turn holds the images, then the videos, then the prompt text. Decoded text is streamed to stdout as it is
generated, with the model's `<think>` part shown under "thinking:" and its `<answer>` part under "answer:". With
`--json` the last stdout line is one JSON object (prompt_token_ids, token_ids, text, thinking, answer, timings,
num_compiles, ...). Without `--model` the embedded tiny checkpoint runs: its weights are random and its output is
meaningless (said on stderr).

Batch mode: `--batch-file` holds one request per line, `{"prompt": ..., "system": ..., "images": [...], "videos":
[...], "max_new_tokens": N}` (only prompt required; relative paths resolve against the file's folder). stdout gets
one JSON result per request in input order (the `--json` fields, or `{"line": n, "error": ...}` for a line that
failed while the others still ran), then `{"summary": {...}}`. Exit code 2 when any line failed.

Sampling defaults come from the checkpoint's generation_config.json (do_sample, temperature, top_k, top_p,
repetition_penalty); any of
--temperature/--top-k/--top-p switches sampling on, --greedy switches it off. Expected failures (missing or
corrupt media, bad model path, empty prompt, prompt too long for the context, bad --mesh) print one `error: ...`
line on stderr and exit with code 2. Every compile logs its shape key on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from .errors import Glm41vError, one_line

DEFAULT_MAX_NEW_TOKENS = 1024
TAG_LABELS = {"<think>": "thinking:\n", "</think>": "\n\n", "<answer>": "answer:\n", "</answer>": ""}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `chat` share: model, system turn, limits, sampling, thinking, dtype, mesh."""
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, converted directory or hub id (default: the embedded tiny "
                        "checkpoint with RANDOM weights)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"at most this many generated tokens per reply (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides the sampling options)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (turns sampling on)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (turns sampling on)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (turns sampling on)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF repetition penalty (default: generation_config.json's, else 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--chunk-size", type=int, default=16, help="tokens per device round trip (default 16)")
    p.add_argument("--mesh", default="auto",
                   help="device mesh 'data=D,fsdp=F,tensor=T' (one axis may be -1); 'auto' (default): tensor over "
                        "as many devices as divide the heads (<= 8), fsdp over the rest; 'none': one device")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap on prompt + new tokens (default and maximum: the model's max_position_embeddings)")
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="force '</think><answer>' once N thinking tokens are spent")
    p.add_argument("--no-thinking", action="store_true", help="pre-fill an empty '<think></think>' block")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `generate` subcommand to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="generate a reply to a prompt with images / videos (streams text)",
        description="Run GLM-4.1V on one user turn (images, then videos, then the prompt) and stream the reply.",
    )
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    p.add_argument("--prompt", default=None, help="the user's text (required unless --batch-file)")
    p.add_argument("--batch-file", default=None, metavar="JSONL",
                   help="requests, one JSON object per line (prompt, system, images, videos, max_new_tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="rows generated together in batch mode (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


class CliError(Glm41vError):
    """A user-facing problem: printed as one `error:` line, exit code 2."""


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


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_file is None and (not args.prompt or not args.prompt.strip()):
        raise CliError("empty prompt: --prompt needs some text")
    if args.batch_file is not None and (args.prompt or args.image or args.video):
        raise CliError("--batch-file takes the prompts, images and videos from the file; drop --prompt/--image/--video")
    for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--chunk-size", args.chunk_size),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            raise CliError(f"{flag} must be >= 1, got {v}")
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise CliError(f"--max-thinking-tokens must be >= 0, got {args.max_thinking_tokens}")
    if args.max_context is not None and args.max_context < 1:
        raise CliError(f"--max-context must be >= 1, got {args.max_context}")
    _check_media(args.image, "image")
    _check_media(args.video, "video")


def load_pipeline(args: argparse.Namespace) -> tuple[Any, float]:
    """Pipeline.load from the common flags (--model, --dtype, --mesh, --chunk-size, --max-context); logs compiles."""
    import logging

    from .pipeline import Pipeline

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(message)s]"))
    glog = logging.getLogger("glm41v_jax.generate")
    glog.setLevel(logging.INFO)
    glog.handlers[:] = [handler]
    glog.propagate = False
    if args.model is None:
        print("note: no --model given: running the embedded tiny checkpoint, whose weights are RANDOM; "
              "its output is meaningless", file=sys.stderr)
    mesh = getattr(args, "mesh", None)
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model, dtype=args.dtype, mesh=None if mesh in (None, "none") else mesh,
                         chunk_size=args.chunk_size, max_context=getattr(args, "max_context", None))
    return pipe, time.perf_counter() - t0


def _read_batch_file(path: str) -> list[Any]:
    """Requests of a JSONL file; a line that does not parse becomes its error (reported with its line number)."""
    from .pipeline import Request, RequestError

    if not os.path.isfile(path):
        raise CliError(f"batch file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    out: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RequestError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                req: Any = Request.from_dict(d, base)
            except RequestError as e:
                req = RequestError(f"{path}:{n}: {e}")
            out.append((n, req))
    if not out:
        raise CliError(f"batch file {path} has no requests")
    return out


def _generate(args: argparse.Namespace) -> int:
    _configure_jax()
    _check_args(args)
    lines = _read_batch_file(args.batch_file) if args.batch_file else None

    from .sampling import SamplingParams

    pipe, load_s = load_pipeline(args)
    sampling = SamplingParams(**_sampling_from(args, pipe.directory))
    engine = pipe.engine
    ctx = engine.max_context
    from .generate import format_bytes, kv_cache_bytes

    print(f"[model loaded in {load_s:.2f}s; {engine.mesh.shape if engine.mesh is not None else '1 device'}; "
          f"max context {ctx} tokens: KV cache {format_bytes(kv_cache_bytes(engine.cfg, 1, ctx))} per row]",
          file=sys.stderr)
    if lines is not None:
        return _generate_batch_file(args, pipe, sampling, lines)

    from .pipeline import Request

    req = Request(args.prompt, images=args.image, videos=args.video, system=args.system)
    inputs = pipe.encode(req, no_thinking=args.no_thinking)
    printer = StreamPrinter(lambda ids: pipe.processor.decode(ids, skip_special_tokens=True), sys.stdout)
    think = {}
    if args.max_thinking_tokens is not None:
        think = {"max_thinking_tokens": args.max_thinking_tokens, "think_end_ids": pipe.think_end_ids}
    result = engine.generate(inputs, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                             eos_ids=pipe.eos_ids, stream_callback=printer.feed, **think)
    printer.finish()
    record = pipe.record(result)
    t = result.timings
    print(f"[{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} generated ({result.finish_reason})"
          f"; compile {t['compile_s']:.2f}s ({result.num_compiles} programs), prefill {t['prefill_s']:.3f}s, "
          f"decode {t['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    if args.json:
        record.update({
            "model": "embedded-tiny-random" if pipe.random_weights else args.model,
            "random_weights": pipe.random_weights,
            "sampling": {"greedy": sampling.greedy, "temperature": sampling.temperature, "top_k": sampling.top_k,
                         "top_p": sampling.top_p, "repetition_penalty": sampling.repetition_penalty,
                         "seed": args.seed},
            "dtype": engine.cfg.runtime.dtype,
        })
        record["timings"]["load_s"] = load_s
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def _generate_batch_file(args: argparse.Namespace, pipe: Any, sampling: Any, lines: list[Any]) -> int:
    def emit(i: int, rec: dict[str, Any]) -> None:
        rec = {"line": lines[i][0], **rec}
        if "error" in rec:
            print(f"error: line {lines[i][0]}: {rec['error']}", file=sys.stderr)
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    pipe.generate([r for _, r in lines], batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  sampling=sampling, seed=args.seed, max_thinking_tokens=args.max_thinking_tokens,
                  no_thinking=args.no_thinking, errors="return", on_result=emit)
    summary = pipe.last_summary
    sys.stdout.write(json.dumps({"summary": summary}) + "\n")
    sys.stdout.flush()
    print(f"[{summary['requests']} requests ({summary['failed']} failed) in {summary['batches']} batches of "
          f"{args.batch_size}; prefill {summary['prefill_s']:.3f}s, decode {summary['decode_tokens_per_s']:.1f} "
          f"tok/s over all rows, {summary['num_compiles']} programs]", file=sys.stderr)
    return 2 if summary["failed"] else 0


def guarded(fn: Any, args: argparse.Namespace) -> int:
    """Run a subcommand; an expected failure becomes one `error:` line on stderr and exit code 2."""
    try:
        return fn(args)
    except (Glm41vError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    """The `generate` subcommand. Returns the process exit code."""
    return guarded(_generate, args)
