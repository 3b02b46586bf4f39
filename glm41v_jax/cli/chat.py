"""`glm41v chat`: an interactive multi-turn session with images and videos, streaming each reply.

    glm41v chat [--model M] [--system TEXT] [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K]
                [--top-p P] [--repetition-penalty R] [--seed S] [--dtype float32|bfloat16] [--chunk-size C]
                [--no-thinking] [--max-thinking-tokens N] [--log-jsonl PATH]

User lines are read from stdin (a terminal or a pipe). A line is a message to the model, or a command:
    /image PATH   attach an image to the next message (repeatable)
    /video PATH   attach a video to the next message (repeatable)
    /reset        forget the conversation (and pending attachments); the system message stays
    /history      print the conversation so far
    /help         list the commands
    /exit, /quit  leave (so does end of input); exit code 0
A line starting with `//` is sent as a message starting with `/`.

Each reply streams to stdout like `glm41v generate` ("thinking:" / "answer:" sections); notices, per-turn
statistics and errors go to stderr. The history is a list of HF-format messages. As the model card asks, the
`<think>` part of a reply is kept out of it: the assistant turn stored is `thinking.history_text(reply)` (the reply
without `<think>...</think>`, an `<answer>` left open by the `</answer>` stop token closed again). The images and
videos of earlier turns stay in the history and are re-read and re-encoded on every turn (the compiled programs
are reused across turns through the engine's length buckets, but there is no prefix cache yet).

A failing turn (a missing or corrupt image, a conversation too long for the context, ...) prints one `error: ...`
line; the message is not added to the history, its pending attachments are dropped, and the session goes on.
Problems found before the session starts (model path, sampling flags) exit with code 2, as in `generate`.

Turn k of a session (0-based) samples with seed `--seed + k`. `--log-jsonl PATH` appends one JSON record per
answered turn: prompt_token_ids, token_ids, text, thinking, answer, history_content, boxes / points (pixels for
the images of the latest user turn that had images), images, videos, finish_reason, timings, num_compiles.

Thinking control: `--no-thinking` appends `thinking.NO_THINKING_PREFIX` ("<think></think>") after the generation
prompt, so the model answers at once; `--max-thinking-tokens N` lets the engine force `thinking.FORCED_ANSWER`
("</think><answer>") once N thinking tokens are spent (counted from the first generated token, GLM-4.1V's opening
`<think>` included, unless the prompt already closed the block).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from ..errors import Glm41vError, one_line
from ..processing import ProcessingError
from ..processing.image import load_image
from ..sampling import SamplingParams
from ..thinking import FORCED_ANSWER, NO_THINKING_PREFIX, history_text, parse_response
from .common import (
    SIGPIPE_EXIT,
    CliError,
    StreamPrinter,
    add_model_args,
    build_messages,
    check_media,
    configure_env,
    guarded,
    load_pipeline,
    stdout_closed,
)

HELP = ("commands: /image PATH, /video PATH (attach to the next message), /reset, /history, /help, "
        "/exit (or end of input)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to a `glm41v` subparsers object."""
    p = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat with images / videos (reads stdin, streams replies)",
        description="Chat with GLM-4.1V turn by turn. Lines from stdin are messages; /image PATH and /video PATH "
                    "attach media to the next message; /reset, /history, /exit. Earlier <think> parts are kept "
                    "out of the history.",
    )
    add_model_args(p)
    p.add_argument("--log-jsonl", default=None, metavar="PATH",
                   help="append one JSON record per answered turn (token ids, text, thinking, answer, boxes, ...)")
    p.set_defaults(func=run)
    return p


def _image_size(path: Any) -> tuple[int, int] | None:
    """(width, height) of an image file (EXIF orientation applied, as the processor does), or None."""
    try:
        return load_image(path).size  # the processor's own reader: the same orientation and the same checks
    except (ProcessingError, OSError):
        return None


class ChatSession:
    """The conversation state and one turn of generation; the REPL in `_chat` drives it line by line."""

    def __init__(self, engine: Any, processor: Any, *, sampling: SamplingParams, eos_ids: Any, max_new_tokens: int,
                 seed: int, system: str | None, out: TextIO, err: TextIO, no_thinking: bool = False,
                 max_thinking_tokens: int | None = None, log: TextIO | RecordLog | None = None,
                 text_special_tokens: bool = False) -> None:
        self.engine = engine
        self.processor = processor
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.system = system
        self.out = out
        self.err = err
        self.log = log
        self.no_thinking = no_thinking
        self.max_thinking_tokens = max_thinking_tokens
        self.text_special_tokens = text_special_tokens
        self.gen_kwargs: dict[str, Any] = {}
        if max_thinking_tokens is not None:
            self.gen_kwargs = {"max_thinking_tokens": int(max_thinking_tokens),
                               "think_end_ids": processor.tokenizer.encode(FORCED_ANSWER,
                                                                           add_special_tokens=False).ids}
        self.turns_done = 0  # answered turns of this session (all conversations): the seed offset
        self.conversation = 1
        self.history: list[dict[str, Any]] = []
        self.pending_images: list[str] = []
        self.pending_videos: list[str] = []
        self.reset(quiet=True)

    # ------------------------------------------------------------------ commands
    def reset(self, quiet: bool = False) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.pending_images, self.pending_videos = [], []
        if not quiet:
            self.conversation += 1
            self.notice("(conversation reset)")

    def notice(self, msg: str) -> None:
        self.err.write(msg + "\n")
        self.err.flush()

    def error(self, msg: str) -> None:
        self.notice(f"error: {msg}")

    def attach(self, kind: str, path: str) -> None:
        path = os.path.expanduser(path.strip())
        if not path:
            raise CliError(f"/{kind} needs a file path")
        check_media([path], kind)
        (self.pending_images if kind == "image" else self.pending_videos).append(path)
        n = len(self.pending_images) + len(self.pending_videos)
        self.notice(f"({kind} attached to the next message: {path}; {n} pending)")

    def format_history(self) -> str:
        if not self.history:
            return "(history is empty)"
        lines = []
        for i, m in enumerate(self.history, 1):
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for item in content:
                    if item.get("type") == "image":
                        parts.append(f"<image: {item['image']}>")
                    elif item.get("type") == "video":
                        parts.append(f"<video: {item['video']}>")
                    else:
                        parts.append(str(item.get("text", "")))
                content = " ".join(p for p in parts if p)
            lines.append(f"[{i}] {m['role']}: {content}")
        return "\n".join(lines)

    def handle(self, line: str) -> bool:
        """One input line. Returns False when the session should end."""
        line = line.rstrip("\r\n")
        stripped = line.strip()
        if not stripped:
            return True
        if stripped.startswith("/") and not stripped.startswith("//"):
            cmd, _, arg = stripped.partition(" ")
            cmd = cmd.lower()
            try:
                if cmd in ("/exit", "/quit"):
                    return False
                if cmd == "/image":
                    self.attach("image", arg)
                elif cmd == "/video":
                    self.attach("video", arg)
                elif cmd == "/reset":
                    self.reset()
                elif cmd == "/history":
                    self.out.write(self.format_history() + "\n")
                    self.out.flush()
                elif cmd == "/help":
                    self.notice(HELP)
                else:
                    raise CliError(f"unknown command {cmd} ({HELP})")
            except BrokenPipeError:
                raise
            except (Glm41vError, OSError) as e:
                self.error(one_line(e))
            return True
        if stripped.startswith("//"):
            line = line.lstrip()[1:]
        self.turn(line)
        return True

    # ------------------------------------------------------------------ one turn
    def _history_paths(self) -> list[str]:
        return [item[item["type"]] for m in self.history if m["role"] == "user" and isinstance(m["content"], list)
                for item in m["content"] if item.get("type") in ("image", "video")
                and isinstance(item.get(item["type"]), str)]

    def _latest_image_sizes(self, messages: list[dict[str, Any]]) -> list[tuple[int, int]] | None:
        for m in reversed(messages):
            if m["role"] != "user" or not isinstance(m["content"], list):
                continue
            paths = [item["image"] for item in m["content"] if item.get("type") == "image"]
            if paths:
                sizes = [_image_size(p) for p in paths]
                return None if any(s is None for s in sizes) else sizes  # type: ignore[return-value]
        return None

    def _check_history_media(self) -> None:
        """The images and videos of earlier turns are read again on every turn: say which one is gone."""
        turn = 0
        for m in self.history:
            if m["role"] != "user":
                continue
            turn += 1
            for item in m["content"] if isinstance(m["content"], list) else []:
                kind = item.get("type")
                path = item.get(kind) if kind in ("image", "video") else None
                if isinstance(path, str) and not os.path.isfile(path):
                    raise CliError(f"the {kind} of earlier turn {turn} is gone: {path} (no such file); restore it, "
                                   "or /reset to start a new conversation without it")

    def turn(self, text: str) -> None:
        """Send one user message (with the pending attachments) and stream the reply. Errors are reported, and
        leave the history as it was."""
        images, videos = self.pending_images, self.pending_videos
        self.pending_images, self.pending_videos = [], []
        user = build_messages(text, images, videos)[-1]
        messages = [*self.history, user]
        printer = StreamPrinter(lambda ids: self.processor.decode(ids, skip_special_tokens=True), self.out)
        try:
            check_media(images, "image")
            check_media(videos, "video")
            self._check_history_media()
            enc_kw = {"assistant_prefix": NO_THINKING_PREFIX} if self.no_thinking else {}
            inputs = self.processor.encode_messages(messages, text_special_tokens=self.text_special_tokens, **enc_kw)
            inputs = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
            result = self.engine.generate(inputs, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                          seed=self.seed + self.turns_done, eos_ids=self.eos_ids,
                                          stream_callback=printer.feed, **self.gen_kwargs)
        except BrokenPipeError:
            raise  # stdout is gone: the session ends (guarded exits quietly)
        except (Glm41vError, OSError) as e:
            if printer.wrote_any:
                printer.finish()
            dropped = len(images) + len(videos)
            hint = ""
            if isinstance(e, ProcessingError) and any(p in str(e) for p in self._history_paths()):
                hint = " (a file of an earlier turn; restore it, or /reset to start a new conversation)"
            self.error(one_line(e) + hint
                       + (f" (message not sent; {dropped} attachment(s) dropped)" if dropped else ""))
            return
        except KeyboardInterrupt:
            printer.finish()
            self.error("interrupted (the reply was discarded)")
            return
        reply = printer.finish()
        stored = history_text(reply)
        self.history += [user, {"role": "assistant", "content": stored}]
        self.turns_done += 1
        t = result.timings
        self.notice(f"[{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} generated "
                    f"({result.finish_reason}); compile {t.get('compile_s', 0.0):.2f}s, prefill "
                    f"{t.get('prefill_s', 0.0):.3f}s, decode {t.get('decode_tokens_per_s', 0.0):.1f} tok/s]")
        self._log_turn(text, images, videos, messages, reply, stored, result)

    def _log_turn(self, text: str, images: list[str], videos: list[str], messages: list[dict[str, Any]],
                  reply: str, stored: str, result: Any) -> None:
        """Append the --log-jsonl record of the turn just answered (nothing without --log-jsonl)."""
        if self.log is None:
            return
        parsed = parse_response(reply, self._latest_image_sizes(messages))
        record = {
            "conversation": self.conversation,
            "turn": sum(1 for m in self.history if m["role"] == "assistant"),
            "user": text,
            "images": images,
            "videos": videos,
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": reply,
            "thinking": parsed["thinking"],
            "answer": parsed["answer"],
            "history_content": stored,
            "boxes": parsed["boxes"],
            "points": parsed["points"],
            "finish_reason": result.finish_reason,
            "seed": self.seed + self.turns_done - 1,
            "no_thinking": self.no_thinking,
            "max_thinking_tokens": self.max_thinking_tokens,
            "timings": result.timings,
            "num_compiles": result.num_compiles,
        }
        self.log.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.log.flush()


def _read_lines(stdin: TextIO, stdout: TextIO, err: TextIO) -> Iterator[str]:
    """Lines from stdin until EOF; with a terminal, a `you> ` prompt and line editing (readline).

    A pipe is read as bytes and each line decoded on its own: a line that is not UTF-8 is reported and skipped, and
    the session (and its history) goes on."""
    interactive = bool(getattr(stdin, "isatty", lambda: False)()) and stdin is sys.__stdin__
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    raw_in = getattr(stdin, "buffer", None)
    n = 0
    while True:
        n += 1
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                stdout.write("\n")
                return
            except UnicodeDecodeError as e:
                _undecodable(err, n, e)
                continue
        elif raw_in is not None:
            raw = raw_in.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := raw_in.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # drop the rest of the line without holding it
                _too_long(err, n)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _undecodable(err, n, e)
                continue
        else:
            line = stdin.readline()
            if not line:
                return
        if len(line) > MAX_LINE_BYTES:  # characters: at most as many as the UTF-8 bytes
            _too_long(err, n)
            continue
        yield line


# One chat line is at most 1 MiB. Tokenising costs a few hundred bytes of memory per character, and 1 MiB of text
# is far more than the 65536-token context at any plausible characters per token, so nothing usable is refused.
MAX_LINE_BYTES = 1 << 20


def _too_long(err: TextIO, n: int) -> None:
    err.write(f"error: input line {n} is longer than {MAX_LINE_BYTES} bytes; it was ignored, the conversation "
              "goes on\n")
    err.flush()


def _undecodable(err: TextIO, n: int, e: UnicodeDecodeError) -> None:
    err.write(f"error: input line {n} is not UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); it "
              "was ignored, the conversation goes on\n")
    err.flush()


class RecordLog:
    """`--log-jsonl PATH`: one JSON line per turn, appended whole or not at all. The file is opened before the model
    loads (a bad path fails at once); a failed write (full disk...) is cut back off the file and reported as one
    CliError naming the file, the earlier records kept."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._f = open(path, "ab", buffering=0)  # noqa: SIM115  (closed by close())
        except OSError as e:
            raise CliError(f"--log-jsonl {path}: cannot open it for appending ({e.strerror or e})") from None

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        start = self._f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self._f.write(data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                self._f.truncate(start)
            raise CliError(f"--log-jsonl {self.name}: cannot append this turn's record ({e.strerror or e}); the file "
                           "keeps the records of the earlier turns") from None

    def flush(self) -> None:
        """Writes are unbuffered: nothing to flush."""

    def close(self) -> None:
        self._f.close()


def _chat(args: argparse.Namespace) -> int:
    configure_env()
    log = RecordLog(args.log_jsonl) if args.log_jsonl else None  # opened first: a bad path fails before loading
    try:
        pipe, load_s, sampling = load_pipeline(args)
        engine, processor = pipe.engine, pipe.processor
        print(f"[model loaded in {load_s:.2f}s; {HELP}]", file=sys.stderr)
        session = ChatSession(engine, processor, sampling=sampling, eos_ids=pipe.eos_ids,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, system=args.system,
                              out=sys.stdout, err=sys.stderr, no_thinking=args.no_thinking,
                              max_thinking_tokens=args.max_thinking_tokens, log=log,
                              text_special_tokens=args.text_special_tokens)
        for line in _read_lines(sys.stdin, sys.stdout, sys.stderr):
            if not session.handle(line):
                break
    finally:
        if log is not None:
            log.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """The `chat` subcommand. Returns the process exit code."""
    if stdout_closed():
        return SIGPIPE_EXIT  # nothing can be written: stop before any work, as after a broken pipe
    return guarded(_chat, args)
