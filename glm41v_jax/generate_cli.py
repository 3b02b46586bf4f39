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
import contextlib
import errno
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from . import argtypes
from .errors import Glm41vError, one_line

DEFAULT_MAX_NEW_TOKENS = 1024
MAX_BATCH_SIZE = 65536
MAX_LINE_BYTES = 16 << 20  # a batch-file line longer than this is reported, not read (no prompt fits in it anyway)
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader went away (`... | head`)
TAG_LABELS = {"<think>": "thinking:\n", "</think>": "\n\n", "<answer>": "answer:\n", "</answer>": ""}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `chat` share: model, system turn, limits, sampling, thinking, dtype, mesh. Every
    number is range-checked by its argparse type (argtypes), so a bad value is a one-line usage error."""
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, converted directory or hub id (default: the embedded tiny "
                        "checkpoint with RANDOM weights)")
    p.add_argument("--verify", action="store_true",
                   help="before loading a converted directory, check every array against the checksums recorded at "
                        "conversion (one extra read of the weights; see `glm41v verify`)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=argtypes.positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"at most this many generated tokens per reply (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides the sampling options)")
    p.add_argument("--temperature", type=argtypes.float_in(0, lo_open=True, hint=" (--greedy for argmax decoding)"),
                   default=None, help="sampling temperature, > 0 (turns sampling on)")
    p.add_argument("--top-k", type=argtypes.count, default=None,
                   help="keep the k most likely tokens; 0: off (turns sampling on)")
    p.add_argument("--top-p", type=argtypes.float_in(0, 1), default=None,
                   help="nucleus sampling threshold in [0, 1] (turns sampling on)")
    p.add_argument("--repetition-penalty", type=argtypes.float_in(0, lo_open=True), default=None,
                   help="HF repetition penalty, > 0 (default: generation_config.json's, else 1.0 = off)")
    p.add_argument("--seed", type=argtypes.seed, default=0,
                   help=f"PRNG seed for sampling, in [0, {argtypes.SEED_MAX}] (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--chunk-size", type=argtypes.int_in(1, 4096), default=16,
                   help="tokens per device round trip (default 16)")
    p.add_argument("--mesh", default="auto",
                   help="device mesh 'data=D,fsdp=F,tensor=T' (one axis may be -1); 'auto' (default): tensor over "
                        "as many devices as divide the heads (<= 8), fsdp over the rest; 'none': one device")
    p.add_argument("--max-context", type=argtypes.positive_int, default=None,
                   help="cap on prompt + new tokens (default and maximum: the model's max_position_embeddings)")
    p.add_argument("--max-thinking-tokens", type=argtypes.count, default=None, metavar="N",
                   help="force '</think><answer>' once N thinking tokens are spent")
    p.add_argument("--no-thinking", action="store_true", help="pre-fill an empty '<think></think>' block")
    p.add_argument("--text-special-tokens", action="store_true",
                   help="read special tokens typed in the user's text (<|assistant|>, <|endoftext|>, <think>, ...) "
                        "as control tokens, as transformers does (default: they are plain text)")


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


def _sampling_from(args: argparse.Namespace, directory: str | None) -> Any:
    """SamplingParams from the flags over the checkpoint's generation_config.json (checked: a bad field is an error
    naming the file and the field)."""
    from .sampling import read_generation_config, resolve_sampling

    gen, source = read_generation_config(directory)
    return resolve_sampling(gen, source, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def _check_media(paths: list[str], kind: str) -> None:
    for p in paths:
        if not os.path.exists(p):
            what = "is a broken symbolic link or a symbolic link loop" if os.path.lexists(p) else "not found"
            raise CliError(f"{kind} file {what}: {p}")
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
    _check_media(args.image, "image")
    _check_media(args.video, "video")


def load_pipeline(args: argparse.Namespace) -> tuple[Any, float, Any]:
    """Pipeline.load from the common flags (--model, --dtype, --mesh, --chunk-size, --max-context); logs compiles.
    Returns (pipeline, load seconds, SamplingParams from the sampling flags over generation_config.json, resolved
    before the weights are read)."""
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
    sampling: dict[str, Any] = {}
    pipe = Pipeline.load(args.model, dtype=args.dtype, mesh=None if mesh in (None, "none") else mesh,
                         chunk_size=args.chunk_size, max_context=getattr(args, "max_context", None),
                         check_directory=lambda d: sampling.update(params=_sampling_from(args, d)),
                         verify=bool(getattr(args, "verify", False)))  # passed on to loading.load
    return pipe, time.perf_counter() - t0, sampling["params"]


def iter_batch_file(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, Request or RequestError) for each non-blank line of a JSONL file, read one line at a time.

    The file is read as bytes and each line decoded on its own, so a bad line (not UTF-8, not JSON, nested too
    deeply, a field of the wrong type or out of range, longer than MAX_LINE_BYTES) is that line's RequestError and
    the others still run. Relative media paths resolve against the file's folder."""
    from .pipeline import Request, RequestError

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
                req: Any = Request.from_dict(d, base)
            except RequestError as e:
                req = e
            yield n, req


def _generate(args: argparse.Namespace) -> int:
    _configure_jax()
    _check_args(args)
    lines = None
    if args.batch_file:
        # Anything readable but a directory: a file, a pipe (`--batch-file <(...)`, /dev/stdin), /dev/null.
        if os.path.isdir(args.batch_file) or not os.path.exists(args.batch_file):
            what = "is a directory" if os.path.isdir(args.batch_file) else (
                "is a broken symbolic link or a symbolic link loop" if os.path.lexists(args.batch_file)
                else "not found")
            raise CliError(f"batch file {what}: {args.batch_file}")
        lines = iter_batch_file(args.batch_file)
        first = next(lines, None)  # read before the model loads: an empty file is refused at once
        if first is None:
            raise CliError(f"batch file {args.batch_file} has no requests")
        lines = itertools.chain([first], lines)

    pipe, load_s, sampling = load_pipeline(args)
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
            "dtype": engine.cfg.runtime.dtype,
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


def _generate_batch_file(args: argparse.Namespace, pipe: Any, sampling: Any, lines: Iterator[tuple[int, Any]]
                         ) -> int:
    """Stream the batch file: read and encode one batch, run it, print its records, read on."""
    numbers: collections.deque[int] = collections.deque()

    def requests() -> Iterator[Any]:
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


def _stdout_gone(e: BaseException) -> bool:
    """Whether `e` says that stdout can no longer be written: its reader went away (EPIPE), or it is closed."""
    if isinstance(e, BrokenPipeError):
        return True
    out = sys.stdout
    if isinstance(e, OSError) and e.errno == errno.EBADF:
        try:
            os.fstat(out.fileno())
        except (OSError, ValueError, AttributeError):
            return True
        return False
    return isinstance(e, ValueError) and "closed file" in str(e) and (out is None or getattr(out, "closed", False))


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again ("Exception ignored ...")."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def guarded(fn: Any, args: argparse.Namespace) -> int:
    """Run a subcommand; an expected failure becomes one `error:` line on stderr and exit code 2."""
    try:
        return fn(args)
    except (Glm41vError, OSError, ValueError) as e:
        if _stdout_gone(e):  # `... | head`: stop quietly, as command-line tools do
            _quiet_stdout()
            return SIGPIPE_EXIT
        if not isinstance(e, (Glm41vError, OSError)):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def stdout_closed() -> bool:
    """Started with stdout closed (`>&-`): the results could not be written anywhere."""
    return sys.stdout is None or bool(getattr(sys.stdout, "closed", False))


def run(args: argparse.Namespace) -> int:
    """The `generate` subcommand. Returns the process exit code."""
    if stdout_closed():
        return SIGPIPE_EXIT  # nothing can be written: stop before any work, as after a broken pipe
    return guarded(_generate, args)
