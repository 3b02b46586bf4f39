"""What every `glm41v` subcommand shares: the one-line error reporting, the parser, and the model, sampling and
media plumbing of `generate` and `chat`.

Error contract: a `Glm41vError` (bad input: a file, a flag, a config field, a request) or an `OSError` (a file the
system refuses) is printed as ONE line `error: ...` on stderr and gives exit code 2. Any other exception is a bug and
keeps its traceback. A reader that went away (`glm41v generate ... | head`) ends the command quietly with 141.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..config import dtype_flag
from ..errors import Glm41vError, one_line
from ..pipeline import Pipeline
from ..sampling import SamplingParams, read_generation_config, resolve_sampling
from . import argtypes

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader went away (`... | head`)
INTERRUPTED_EXIT = 130  # 128 + SIGINT
DEFAULT_MAX_NEW_TOKENS = 1024
COMPILE_LOGGER = "glm41v_jax.generate"  # the engine logs each compile's shape key here; the CLI shows it on stderr
TAG_LABELS = {"<think>": "thinking:\n", "</think>": "\n\n", "<answer>": "answer:\n", "</answer>": ""}


class CliError(Glm41vError):
    """A user-facing problem found by a command itself (a flag, a path): one `error:` line, exit code 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error printed as one `error: ...` line (exit code 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {' '.join(message.split())} ('{self.prog} --help' lists the options)\n")
        raise SystemExit(2)


def print_error(e: BaseException | str) -> None:
    """The one way a command reports an expected failure: `error: <one line>` on stderr."""
    print(f"error: {e if isinstance(e, str) else one_line(e)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- guarded


def _stdout_gone(e: OSError) -> bool:
    """Whether `e` says that stdout can no longer be written: its reader went away (EPIPE), or it is closed."""
    if isinstance(e, BrokenPipeError):
        return True
    if e.errno == errno.EBADF:
        try:
            os.fstat(sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            return True
    return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again ("Exception ignored ...")."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def stdout_closed() -> bool:
    """Started with stdout closed (`>&-`): the results could not be written anywhere."""
    return sys.stdout is None or bool(getattr(sys.stdout, "closed", False))


def guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand. Only the expected failures, `Glm41vError` and `OSError`, become one `error:` line and exit
    code 2 (141 when stdout's reader went away, 130 on Ctrl-C); anything else is a bug and propagates with its
    traceback."""
    try:
        return fn(args)
    except (Glm41vError, OSError) as e:
        if isinstance(e, OSError) and _stdout_gone(e):  # `... | head`: stop quietly, as command-line tools do
            _quiet_stdout()
            return SIGPIPE_EXIT
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return INTERRUPTED_EXIT


# ------------------------------------------------------------------------------------------- generate and chat


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `chat` share: model, system turn, limits, sampling, thinking, dtype, mesh. Every
    number is range-checked by its argparse type (argtypes), so a bad value is a one-line usage error."""
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, converted directory or hub id (default: the embedded tiny "
                        "checkpoint with RANDOM weights)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (a LoRA training run's final/) for --model, merged into its float "
                        "weights at load (run unmerged on a quantized base); an adapter trained on another base is "
                        "refused")
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
    add_quant_args(p, "quantize a float checkpoint's weights at load, one tensor at a time into their shardings "
                      "(a quantized checkpoint needs no flag)")
    p.add_argument("--mesh", default="auto",
                   help="device mesh 'data=D,fsdp=F,tensor=T' (one axis may be -1); 'auto' (default): tensor over "
                        "as many devices as divide the heads (<= 8), fsdp over the rest; 'none': one device")
    p.add_argument("--max-context", type=argtypes.positive_int, default=None,
                   help="cap on prompt + new tokens (default and maximum: the model's max_position_embeddings)")
    p.add_argument("--prefill-chunk", type=argtypes.int_in(0, 65536), default=None, metavar="N",
                   help="run a longer prompt through the decoder in chunks of at most N tokens, in one program "
                        "(bounds the prefill's memory; default: the platform's, 2048 on TPU/GPU, 8192 on CPU; 0: one "
                        "piece). `glm41v plan` shows what a setting needs per chip")
    p.add_argument("--max-thinking-tokens", type=argtypes.count, default=None, metavar="N",
                   help="force '</think><answer>' once N thinking tokens are spent")
    p.add_argument("--no-thinking", action="store_true", help="pre-fill an empty '<think></think>' block")
    p.add_argument("--text-special-tokens", action="store_true",
                   help="read special tokens typed in the user's text (<|assistant|>, <|endoftext|>, <think>, ...) "
                        "as control tokens, as transformers does (default: they are plain text)")


def add_quant_args(p: argparse.ArgumentParser, help_text: str) -> None:
    """--quantize int8|int4, --quant-group-size N, --quantize-skip PARTS (convert, generate, chat, plan)."""
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help=help_text)
    p.add_argument("--quant-group-size", type=argtypes.positive_int, default=None, metavar="N",
                   help="int4: input channels per scale (default 128; must divide every quantized layer's input width)")
    p.add_argument("--quantize-skip", default=None, metavar="PARTS",
                   help="comma-separated parts left in float: lm_head, vision; 'none' quantizes both (default: vision)")


def quant_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `RuntimeConfig` fields the quantization flags give ({} without --quantize; the other two flags need it)."""
    if args.quantize is None:
        for flag, value in (("--quant-group-size", args.quant_group_size), ("--quantize-skip", args.quantize_skip)):
            if value is not None:
                raise CliError(f"{flag} needs --quantize int8|int4")
        return {}
    kw: dict[str, Any] = {"quantize": args.quantize}
    if args.quant_group_size is not None:
        kw["quant_group_size"] = args.quant_group_size
    if args.quantize_skip is not None:
        text = args.quantize_skip.strip()
        kw["quant_skip"] = () if text in ("", "none") else tuple(p.strip() for p in text.split(","))
    return kw


def configure_env() -> None:
    """Process defaults that do not override anything the user set: the tokenizer's own thread pool off (it warns
    after a fork and competes with XLA for the cores)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_media(paths: list[str], kind: str) -> None:
    """Each path names an existing file (not a folder, not a broken link): CliError naming the path otherwise."""
    for p in paths:
        if not p.strip():
            raise CliError(f"{kind} path is empty")
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


def sampling_from(args: argparse.Namespace, directory: str | None) -> SamplingParams:
    """SamplingParams from the flags over the checkpoint's generation_config.json (checked: a bad field is an error
    naming the file and the field)."""
    gen, source = read_generation_config(directory)
    return resolve_sampling(gen, source, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def _log_compiles_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(message)s]"))
    log = logging.getLogger(COMPILE_LOGGER)
    log.setLevel(logging.INFO)
    log.handlers[:] = [handler]
    log.propagate = False


def load_pipeline(args: argparse.Namespace) -> tuple[Pipeline, float, SamplingParams]:
    """Pipeline.load from the common flags (--model, --dtype, --mesh, --chunk-size, --max-context, --prefill-chunk);
    logs compiles.
    Returns (pipeline, load seconds, SamplingParams from the sampling flags over generation_config.json, resolved
    before the weights are read)."""
    _log_compiles_to_stderr()
    if args.model is None:
        print("note: no --model given: running the embedded tiny checkpoint, whose weights are RANDOM; "
              "its output is meaningless", file=sys.stderr)
    mesh = getattr(args, "mesh", None)
    t0 = time.perf_counter()
    sampling: dict[str, SamplingParams] = {}
    pipe = Pipeline.load(args.model, **dtype_flag(args.dtype), mesh=None if mesh in (None, "none") else mesh,
                         chunk_size=args.chunk_size, max_context=getattr(args, "max_context", None),
                         prefill_chunk=getattr(args, "prefill_chunk", None),
                         check_directory=lambda d: sampling.update(params=sampling_from(args, d)),
                         verify=bool(getattr(args, "verify", False)),  # passed on to loading.load
                         adapter=getattr(args, "adapter", None),
                         **quant_kwargs(args))
    return pipe, time.perf_counter() - t0, sampling["params"]


class StreamPrinter:
    """Incremental detokenisation with the thinking / answer tags turned into section labels.

    Decodes the whole generated sequence each time (so multi-token characters come out right), writes only the new
    suffix, and holds back a trailing partial character or a possible partial tag.
    """

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO) -> None:
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
