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
import collections
import itertools
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from ..buckets import format_bytes, kv_cache_bytes
from ..pipeline import Pipeline, Request, RequestError
from ..sampling import SamplingParams
from . import argtypes
from .common import (
    SIGPIPE_EXIT,
    CliError,
    StreamPrinter,
    add_model_args,
    check_media,
    configure_env,
    guarded,
    load_pipeline,
    stdout_closed,
)

MAX_BATCH_SIZE = 65536
MAX_LINE_BYTES = 16 << 20  # a batch-file line longer than this is reported, not read (no prompt fits in it anyway)


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
    p.add_argument("--batch-size", type=argtypes.int_in(1, MAX_BATCH_SIZE), default=8,
                   help="rows generated together in batch mode (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_file is None and (not args.prompt or not args.prompt.strip()):
        raise CliError("empty prompt: --prompt needs some text")
    if args.batch_file is not None and (args.prompt or args.image or args.video):
        raise CliError("--batch-file takes the prompts, images and videos from the file; drop --prompt/--image/--video")
    check_media(args.image, "image")
    check_media(args.video, "video")


def iter_batch_file(path: str) -> Iterator[tuple[int, Request | RequestError]]:
    """(line number, Request or RequestError) for each non-blank line of a JSONL file, read one line at a time.

    The file is read as bytes and each line decoded on its own, so a bad line (not UTF-8, not JSON, nested too
    deeply, a field of the wrong type or out of range, longer than MAX_LINE_BYTES) is that line's RequestError and
    the others still run. Relative media paths resolve against the file's folder."""
    base = os.path.dirname(os.path.abspath(path))

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield n, RequestError(f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RequestError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if n == 1:
                    text = text.removeprefix("\ufeff")
                try:
                    d = json.loads(text, parse_constant=reject)
                except json.JSONDecodeError as e:
                    raise RequestError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise RequestError("not valid JSON (nested too deeply)") from None
                except ValueError as e:  # NaN/Infinity, an integer of too many digits
                    raise RequestError(f"not valid JSON ({e})") from None
                req: Request | RequestError = Request.from_dict(d, base)
            except RequestError as e:
                req = e
            yield n, req


def _open_batch_file(path: str) -> Iterator[tuple[int, Request | RequestError]]:
    """The batch file's requests, its first line read now, before the model loads: a missing or empty file is
    refused at once. Anything readable but a directory is a batch file: a file, a pipe (`--batch-file <(...)`,
    /dev/stdin), /dev/null."""
    if not path.strip():
        raise CliError("--batch-file: the path is empty")
    if os.path.isdir(path) or not os.path.exists(path):
        what = "is a directory" if os.path.isdir(path) else (
            "is a broken symbolic link or a symbolic link loop" if os.path.lexists(path) else "not found")
        raise CliError(f"batch file {what}: {path}")
    lines = iter_batch_file(path)
    first = next(lines, None)
    if first is None:
        raise CliError(f"batch file {path} has no requests")
    return itertools.chain([first], lines)


def _generate(args: argparse.Namespace) -> int:
    configure_env()
    _check_args(args)
    lines = _open_batch_file(args.batch_file) if args.batch_file is not None else None
    pipe, load_s, sampling = load_pipeline(args)
    engine = pipe.engine
    ctx = engine.max_context
    print(f"[model loaded in {load_s:.2f}s; {engine.mesh.shape if engine.mesh is not None else '1 device'}; "
          f"max context {ctx} tokens: KV cache {format_bytes(kv_cache_bytes(engine.cfg, 1, ctx))} per row]",
          file=sys.stderr)
    if lines is not None:
        return _generate_batch_file(args, pipe, sampling, lines)
    return _generate_one(args, pipe, sampling, load_s)


def _generate_one(args: argparse.Namespace, pipe: Pipeline, sampling: SamplingParams, load_s: float) -> int:
    """The single request of --prompt/--image/--video, its reply streamed to stdout."""
    engine = pipe.engine
    req = Request(args.prompt, images=args.image, videos=args.video, system=args.system)
    inputs = pipe.encode(req, no_thinking=args.no_thinking, text_special_tokens=args.text_special_tokens)
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
            "dtype": engine.cfg.runtime.compute_dtype,
            "quantize": engine.cfg.runtime.quantize,
        })
        record["timings"]["load_s"] = load_s
        write_json_line(sys.stdout, record)
    return 0


def write_json_line(out: TextIO, record: dict[str, Any]) -> None:
    """One JSON object per line, flushed; non-ASCII as is when the stream can encode it."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode(getattr(out, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        line = json.dumps(record)
    out.write(line + "\n")
    out.flush()


def _generate_batch_file(args: argparse.Namespace, pipe: Pipeline, sampling: SamplingParams,
                         lines: Iterator[tuple[int, Request | RequestError]]) -> int:
    """Stream the batch file: read and encode one batch, run it, print its records, read on."""
    numbers: collections.deque[int] = collections.deque()

    def requests() -> Iterator[Request | RequestError]:
        for n, req in lines:
            numbers.append(n)
            yield req

    for _, rec in pipe.stream(requests(), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, seed=args.seed, max_thinking_tokens=args.max_thinking_tokens,
                              no_thinking=args.no_thinking, text_special_tokens=args.text_special_tokens,
                              errors="return"):
        n = numbers.popleft()
        if "error" in rec:
            print(f"error: {args.batch_file}:{n}: {rec['error']}", file=sys.stderr)
        write_json_line(sys.stdout, {"line": n, **rec})
    summary = pipe.last_summary
    write_json_line(sys.stdout, {"summary": summary})
    print(f"[{summary['requests']} requests ({summary['failed']} failed) in {summary['batches']} batches of "
          f"{args.batch_size}; prefill {summary['prefill_s']:.3f}s, decode {summary['decode_tokens_per_s']:.1f} "
          f"tok/s over all rows, {summary['num_compiles']} programs]", file=sys.stderr)
    return 2 if summary["failed"] else 0


def run(args: argparse.Namespace) -> int:
    """The `generate` subcommand. Returns the process exit code."""
    if stdout_closed():
        return SIGPIPE_EXIT  # nothing can be written: stop before any work, as after a broken pipe
    return guarded(_generate, args)
