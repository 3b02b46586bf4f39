"""SFT data: conversations (JSONL or TFDS) -> tokenised samples with labels -> packed batches, through grain.

Input: one conversation per record in the HF messages format,
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "rel/path.jpg"},
                                               {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "<think>...</think><answer>...</answer>"}]}
Roles: system, user, assistant. User content is a string or a list of text / image / video items; system and
assistant content is a string or a list of text items (joined: the chat template would print a list's Python repr).
Media paths are relative to the dataset root (the JSONL file's folder, or `media_root`); a path that leaves the root
is an error.

Tokens are what the checkpoint's chat template renders (`Processor.apply_chat_template`, `add_generation_prompt=False`)
with the media placeholders expanded by the processor. The conversation is rendered turn by turn: turn k's text is
render(messages[:k+1]) minus render(messages[:k]). Each turn starts with a special token, so tokenising the turns one by
one gives the tokens of the whole text (checked on every sample). Labels (aligned with input_ids, HF convention: the
loss shifts them, logits at t predict labels[t+1]) are the tokens of every assistant message's content (the tokens
overlapping its characters; not the `<|assistant|>\\n` header) and ONE `<|endoftext|>` appended after the final
assistant message; everything else is -100. `loss_on_thinking=False` also leaves the `<think>...</think>` part of each
assistant message (tags included; an unclosed `<think>` runs to the end of the message) out of the loss. Turns after
the last assistant message are dropped (they would carry no label).

Truncation never cuts inside a turn, so never inside an image or video span: a conversation whose tokens (+1 for the
eos) exceed `seq_len`, or whose patches exceed `max_patches`, keeps its longest prefix that ends with an assistant
turn and fits both; it is counted as `truncated`. If not even the first assistant turn fits, the sample is skipped.

Bad data (policy `on_error="skip"`: a counted skip, logged with file:line; `"raise"`: a `DataError` naming
file:line). Reasons, as counted in the stats (`skipped_<reason>`):
    malformed_json    the line is not a JSON object (or not UTF-8)
    bad_record        no "messages" list, an unknown role, a non-text item in a system/assistant turn, an unknown
                      content item type, a media placeholder in the text, a media field that is not a path
    no_assistant      no assistant turn
    path_escape       a media path that is absolute or leaves the dataset root
    missing_media     a media file that does not exist
    media_error       a media file that cannot be decoded (corrupt, not an image/video)
    too_long          not even the first assistant turn fits in `seq_len` tokens
    too_many_patches  not even the first assistant turn fits in `max_patches` vision patches
    no_labels         the kept assistant turns have no label token (e.g. thinking only, loss_on_thinking=False)
Blank lines are not records. Configuration problems (a missing checkpoint, a tokenizer that merges tokens across
turns) always raise.

Reading (grain): `MapDataset.source(records).shuffle(seed)[shard::shards].repeat(epochs).map(encoder)`, then
`to_iter_dataset`, `mp_prefetch` (decoding in `worker_count` processes), then the packer (packing.py). Order depends
only on the seed (each epoch reshuffled); each host reads only its slice; `get_state`/`set_state` resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import reprlib
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from glm41v_jax.errors import Glm41vError
from glm41v_jax.processing import ProcessingError, Processor
from glm41v_jax.processing.processor import IMAGE_TOKEN, VIDEO_TOKEN
from glm41v_jax.rope import get_rope_index

from .packing import DataConfigError, PackedBatchDataset

logger = logging.getLogger("glm41v_train.data")

IGNORE = -100
ROLES = ("system", "user", "assistant")
EOS_TOKEN = "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SKIP_REASONS = ("malformed_json", "bad_record", "no_assistant", "path_escape", "missing_media", "media_error",
                "too_long", "too_many_patches", "no_labels")
_THINK_RE = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"|\Z)", re.S)


MAX_RECORD_BYTES = 64 << 20  # a JSONL line longer than this is a bad record, not read (media are separate files)
# What a record can raise, besides DataError, that only says "this record is bad": nesting deeper than Python's
# recursion limit (json.loads, repr), text that is not valid Unicode (bytes that are not UTF-8, lone surrogates from
# JSON escapes, which the tokenizer cannot encode). They are caught in one place, `ConversationEncoder.__call__`, and
# go through the `on_error` policy. Anything else is a configuration problem or a bug, and raises.
RECORD_ERRORS = (RecursionError, UnicodeError)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 4, 4


def _short(value: Any) -> str:
    """A bounded repr of a record value for messages (depth and length capped: never recurses into a hostile
    nesting, never builds a huge string)."""
    return _REPR.repr(value)


class DataError(Glm41vError, ValueError):
    """A bad record: `reason` is one of SKIP_REASONS, `where` names the record (file:line)."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{where}: {message}")
        self.reason, self.where, self.message = reason, where, message


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training config. Exactly one of `jsonl`, `tfds_dir`, `tfds_name` is set."""

    jsonl: str | tuple[str, ...] | None = None  # JSONL file(s); media relative to each file's folder
    tfds_dir: str | None = None  # a prepared TFDS dataset folder (.../name/config/version)
    tfds_name: str | None = None  # a registered TFDS dataset name ("name/config:version"), with tfds_data_dir
    tfds_data_dir: str | None = None
    split: str = "train"  # TFDS split
    media_root: str | None = None  # overrides the media root (JSONL: the file's folder; TFDS: embedded media only)
    seq_len: int = 4096  # tokens per row
    batch_size: int = 8  # rows per host batch
    max_patches: int = 16384  # vision patches per host batch (a multiple of merge**2); the static patch bucket
    packing: bool = True  # several samples per row; False: one sample per row, padded
    open_batches: int = 4  # the first-fit packer's buffer, in batches
    loss_on_thinking: bool = True
    on_error: str = "skip"  # "skip" (counted) | "raise"
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever (reshuffled each epoch)
    worker_count: int = 0  # grain worker processes that decode media and tokenise (0: in this process)
    worker_buffer_size: int = 2  # elements each worker prepares ahead
    read_threads: int = 1  # threads per process running the encoder (grain ReadOptions.num_threads)
    read_buffer: int = 8  # elements prefetched per process (grain ReadOptions.prefetch_buffer_size)

    def __post_init__(self) -> None:
        if isinstance(self.jsonl, list):
            object.__setattr__(self, "jsonl", tuple(self.jsonl))
        given = [k for k in ("jsonl", "tfds_dir", "tfds_name") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"data: set exactly one of jsonl, tfds_dir, tfds_name (got {given or 'none'})")
        for k in ("seq_len", "batch_size", "max_patches", "open_batches", "read_threads", "read_buffer"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ValueError(f"data.{k} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("worker_count", "worker_buffer_size"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise ValueError(f"data.{k} must be a non-negative integer, got {getattr(self, k)!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs <= 0):
            raise ValueError(f"data.num_epochs must be a positive integer or None, got {self.num_epochs!r}")


# ---------------------------------------------------------------------------------------------------------------
# Sources (grain RandomAccessDataSource: __len__ + __getitem__, picklable for worker processes).


class JsonlSource:
    """The non-blank lines of JSONL files, in file order. Record i -> {"where": "file:line", "data": bytes,
    "root": media root}. Lines are read with os.pread (no shared file position: safe across reader threads)."""

    def __init__(self, paths: str | Sequence[str], media_root: str | None = None) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._paths = [os.path.abspath(os.fspath(p)) for p in paths]
        for p in self._paths:
            if os.path.isdir(p):
                raise DataConfigError(f"{p}: is a directory, expected a JSONL file")
        self._roots = [os.path.abspath(media_root) if media_root else os.path.dirname(p) for p in self._paths]
        files, lines, offsets, lengths = [], [], [], []
        for fi, path in enumerate(self._paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"JSONL file not found: {path}")
            pos = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        files.append(fi)
                        lines.append(lineno)
                        offsets.append(pos)
                        lengths.append(len(line))
                    pos += len(line)
        self._file = np.asarray(files, np.int32)
        self._line = np.asarray(lines, np.int64)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fi = int(self._file[index])
        fd = self._fds.get(fi)
        if fd is None:
            with self._lock:
                fd = self._fds.get(fi)
                if fd is None:
                    fd = self._fds[fi] = os.open(self._paths[fi], os.O_RDONLY)
        where = f"{self._paths[fi]}:{int(self._line[index])}"
        if int(self._length[index]) > MAX_RECORD_BYTES:
            return {"where": where, "error": f"the line is {int(self._length[index])} bytes long, over the "
                                             f"{MAX_RECORD_BYTES >> 20} MiB limit of a record", "root": self._roots[fi]}
        data = os.pread(fd, int(self._length[index]), int(self._offset[index]))
        return {"where": where, "data": data, "root": self._roots[fi]}

    def __getstate__(self) -> dict[str, Any]:  # file descriptors and locks do not cross processes
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _fds={}, _lock=threading.Lock())

    def __del__(self) -> None:
        for fd in self.__dict__.get("_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self._paths}, {len(self)} records)"


def make_source(cfg: DataConfig):
    if cfg.jsonl:
        return JsonlSource(cfg.jsonl, cfg.media_root)
    from .tfds_builder import TfdsSource  # tensorflow-datasets is an optional dependency

    return TfdsSource(builder_dir=cfg.tfds_dir, name=cfg.tfds_name, data_dir=cfg.tfds_data_dir, split=cfg.split,
                      media_root=cfg.media_root)


# ---------------------------------------------------------------------------------------------------------------
# One conversation -> one sample.


def _text_of(content: Any, role: str, where: str) -> str:
    """System/assistant content: a string, or a list of text items (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, Mapping) and item.get("type", "text") == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            else:
                raise DataError("bad_record", where, f"{role} content may only hold text items, got {_short(item)}")
        return "".join(parts)
    raise DataError("bad_record", where, f"{role} content must be a string or a list, got {type(content).__name__}")


def _resolve_media(value: Any, kind: str, root: str, media: Mapping[str, bytes] | None, where: str):
    """A media path -> ("file", absolute path) or ("blob", name of an embedded file)."""
    if not isinstance(value, str) or not value:
        raise DataError("bad_record", where, f"{kind} item must give a relative file path, got {_short(value)}")
    if "://" in value:
        raise DataError("bad_record", where, f"{kind} {_short(value)}: URLs are not supported, give a relative "
                                             "file path")
    rel = os.path.normpath(value)
    if os.path.isabs(value) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise DataError("path_escape", where, f"{kind} path {_short(value)} escapes the dataset root "
                                              f"{root or '(none)'}")
    if media is not None and rel in media:
        return "blob", rel
    if not root:
        raise DataError("missing_media", where, f"{kind} {_short(value)} is not embedded in the record and no "
                                                "media_root is set")
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise DataError("missing_media", where, f"{kind} file not found: {path}")
    return "file", path


def _normalize(messages: Any, root: str, media: Mapping[str, bytes] | None, where: str) -> list[dict[str, Any]]:
    """Validate, drop turns after the last assistant turn, join text lists, resolve media (no decoding yet)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("bad_record", where, "'messages' must be a non-empty list of turns")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, Mapping) else m
            raise DataError("bad_record", where, f"turn {i}: role must be one of {', '.join(ROLES)}, "
                                                 f"got {_short(role)}")
        role, content = m["role"], m.get("content")
        if role != "user" or isinstance(content, str):
            text = content if isinstance(content, str) else _text_of(content, role, where)
            if IMAGE_TOKEN in text or VIDEO_TOKEN in text:
                raise DataError("bad_record", where, f"turn {i}: media placeholder token in the text")
            out.append({**m, "content": text})
            continue
        if not isinstance(content, list):
            raise DataError("bad_record", where, f"turn {i}: user content must be a string or a list")
        items = []
        for item in content:
            if not isinstance(item, Mapping):
                raise DataError("bad_record", where, f"turn {i}: content items must be objects, got {_short(item)}")
            kind = "video" if item.get("type") == "video" or "video" in item else \
                "image" if item.get("type") == "image" or "image" in item else item.get("type")
            if kind in ("image", "video"):
                src = next((item[k] for k in (kind, "path") if item.get(k) is not None), None)
                items.append({"type": kind, kind: _resolve_media(src, kind, root, media, where)})
            elif kind == "text" and isinstance(item.get("text"), str):
                if IMAGE_TOKEN in item["text"] or VIDEO_TOKEN in item["text"]:
                    raise DataError("bad_record", where, f"turn {i}: media placeholder token in the text")
                items.append({"type": "text", "text": item["text"]})
            else:
                raise DataError("bad_record", where, f"turn {i}: unsupported content item {_short(item)}")
        out.append({**m, "content": items})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("no_assistant", where, "conversation has no assistant turn")
    return out[: last + 1]


def _label_ranges(piece: str, content: str, loss_on_thinking: bool, where: str) -> list[tuple[int, int]]:
    """Character ranges of `piece` (one rendered assistant turn) that carry the loss: its `content`, less the
    thinking spans when `loss_on_thinking` is False."""
    if not content:
        return []
    start = piece.rfind(content)
    if start < 0:
        raise DataConfigError(f"{where}: the chat template does not render an assistant message's content verbatim; "
                         "its labels cannot be located")
    end = start + len(content)
    if loss_on_thinking:
        return [(start, end)]
    ranges, pos = [], 0
    for m in _THINK_RE.finditer(content):
        ranges.append((start + pos, start + m.start()))
        pos = m.end()
    ranges.append((start + pos, end))
    return [(a, b) for a, b in ranges if b > a]


class ConversationEncoder:
    """messages -> one training sample (NumPy). Holds the processor; thread-safe; picklable (the processor is
    rebuilt in each worker process from `checkpoint_dir`)."""

    def __init__(self, checkpoint_dir: str, seq_len: int, max_patches: int, loss_on_thinking: bool = True,
                 processor: Processor | None = None) -> None:
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.seq_len, self.max_patches, self.loss_on_thinking = seq_len, max_patches, loss_on_thinking
        self._processor = processor
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_processor", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _processor=None, _lock=threading.Lock())

    @property
    def processor(self) -> Processor:
        with self._lock:
            if self._processor is None:
                self._processor = Processor.from_dir(self.checkpoint_dir)
            return self._processor

    def encode(self, messages: Any, root: str = "", media: Mapping[str, bytes] | None = None,
               where: str = "<messages>") -> dict[str, Any]:
        """Returns {"input_ids", "labels" (L,) int32, "positions" (3, L) int32, "pixel_values" (Pi, C*T*p*p) f32,
        "image_grid_thw" (ni, 3), "pixel_values_videos" (Pv, C*T*p*p) f32, "video_grid_thw" (nv, 3) int64,
        "where", "truncated"}. Raises DataError for bad data."""
        msgs = _normalize(messages, root, media, where)
        if any(it[it["type"]][0] == "blob" for m in msgs if isinstance(m["content"], list) for it in m["content"]
               if it["type"] != "text"):
            with tempfile.TemporaryDirectory(prefix="glm41v_media_") as tmp:
                return self._encode(msgs, media, tmp, where)
        return self._encode(msgs, media, None, where)

    def _encode(self, msgs, media, tmp, where) -> dict[str, Any]:
        proc = self.processor
        tok = proc.tokenizer
        texts = [proc.apply_chat_template(msgs[:k], add_generation_prompt=False) for k in range(len(msgs) + 1)]
        for k in range(len(msgs)):
            if not texts[k + 1].startswith(texts[k]):
                raise DataConfigError(f"{where}: the chat template is not turn-by-turn stable (rendering turn {k} "
                                      "changes the text before it); assistant spans cannot be located")
        pieces = [texts[0]] + [texts[k + 1][len(texts[k]):] for k in range(len(msgs))]

        ids: list[np.ndarray] = [np.asarray(tok.encode(pieces[0], add_special_tokens=False).ids, np.int64)]
        labels: list[np.ndarray] = [np.full(len(ids[0]), IGNORE, np.int64)]
        plain: list[list[int]] = [list(ids[0])]  # un-expanded tokens per turn, for the turn-boundary check
        vision: dict[str, list[np.ndarray]] = {k: [] for k in
                                               ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                "video_grid_thw")}
        n_tok, n_patch = len(ids[0]), 0
        kept = None  # (turns, vision parts per key) of the longest fitting prefix ending with an assistant turn
        first_fail = None
        for k, (m, piece) in enumerate(zip(msgs, pieces[1:], strict=True)):
            if m["role"] == "assistant":
                enc = tok.encode(piece, add_special_tokens=False)
                ranges = _label_ranges(piece, m["content"], self.loss_on_thinking, where)
                lab = np.asarray([t if any(s < b and e > a for a, b in ranges) and e > s else IGNORE
                                  for t, (s, e) in zip(enc.ids, enc.offsets, strict=True)], np.int64)
                ids.append(np.asarray(enc.ids, np.int64))
                labels.append(lab)
                plain.append(enc.ids)
            else:
                out = self._process_turn(proc, m, piece, media, tmp, where)
                ids.append(out["input_ids"][0].astype(np.int64))
                labels.append(np.full(len(ids[-1]), IGNORE, np.int64))
                plain.append(tok.encode(piece, add_special_tokens=False).ids)
                for key in vision:
                    if key in out:
                        vision[key].append(out[key])
                n_patch += sum(len(out[key]) for key in ("pixel_values", "pixel_values_videos") if key in out)
            n_tok += len(ids[-1])
            if n_tok + 1 > self.seq_len or n_patch > self.max_patches:
                first_fail = "too_long" if n_tok + 1 > self.seq_len else "too_many_patches"
                break  # budgets only grow: no later prefix fits
            if m["role"] == "assistant":
                kept = (k + 1, {key: len(v) for key, v in vision.items()})
        n_assistant = sum(m["role"] == "assistant" for m in msgs)
        if kept is None:
            what = f"{self.seq_len} tokens" if first_fail == "too_long" else f"{self.max_patches} patches"
            raise DataError(first_fail, where, f"the first assistant turn does not fit in {what}; sample dropped")
        turns, n_vis = kept
        if sum(plain[: turns + 1], []) != tok.encode(texts[turns], add_special_tokens=False).ids:
            raise DataConfigError(f"{where}: the tokenizer merges tokens across turn boundaries; labels cannot be "
                                  "aligned with the rendered conversation")
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataConfigError(f"the tokenizer of {self.checkpoint_dir} has no {EOS_TOKEN} token")
        input_ids = np.concatenate(ids[: turns + 1] + [np.asarray([eos])]).astype(np.int32)
        label_ids = np.concatenate(labels[: turns + 1] + [np.asarray([eos])]).astype(np.int32)
        if not (label_ids[:-1] != IGNORE).any():
            raise DataError("no_labels", where, "the assistant turns have no label tokens")
        arrays = {key: (np.concatenate(v[: n_vis[key]]) if n_vis[key] else None) for key, v in vision.items()}
        types = proc.mm_token_type_ids(input_ids[None])
        positions, _ = get_rope_index(input_ids[None], types, arrays["image_grid_thw"], arrays["video_grid_thw"],
                                      None, proc.image_processor.merge_size)
        patch_dim = proc.image_processor.patch_size**2 * proc.image_processor.temporal_patch_size * 3
        sample = {"input_ids": input_ids, "labels": label_ids, "positions": positions[:, 0].astype(np.int32)}
        for key in ("pixel_values", "pixel_values_videos"):
            a = arrays[key]
            sample[key] = np.zeros((0, patch_dim), np.float32) if a is None else a.astype(np.float32)
        for key in ("image_grid_thw", "video_grid_thw"):
            a = arrays[key]
            sample[key] = np.zeros((0, 3), np.int64) if a is None else a.astype(np.int64)
        sample["where"] = where
        sample["truncated"] = sum(m["role"] == "assistant" for m in msgs[:turns]) < n_assistant
        return sample

    def _process_turn(self, proc, m, piece, media, tmp, where) -> dict[str, Any]:
        images, videos = [], []
        if isinstance(m["content"], list):
            for item in m["content"]:
                if item["type"] in ("image", "video"):
                    src, ref = item[item["type"]]
                    if src == "blob":
                        path = os.path.join(tmp, f"{len(os.listdir(tmp))}{os.path.splitext(ref)[1]}")
                        with open(path, "wb") as f:
                            f.write(media[ref])
                        ref = path
                    (images if item["type"] == "image" else videos).append(ref)
        try:
            return proc(piece, images=images or None, videos=videos or None, padding=False, add_special_tokens=False)
        except ProcessingError as e:
            raise DataError("media_error", where, str(e)) from e

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A source record -> sample. Every failure that the record causes raises DataError (RECORD_ERRORS)."""
        where = record.get("where", "<record>")
        if "error" in record:  # the source could not even read it (an oversized line)
            raise DataError("bad_record", where, record["error"])
        try:
            if "data" in record:
                messages = _parse(record["data"], where, "line")
                if not isinstance(messages, dict):
                    raise DataError("malformed_json", where, f"expected a JSON object, got {type(messages).__name__}")
                if "messages" not in messages:
                    raise DataError("bad_record", where, "no 'messages' field")
                messages = messages["messages"]
            else:
                messages = record["messages"]
                if isinstance(messages, (bytes, str)):
                    messages = _parse(messages, where, "'messages'")
            return self.encode(messages, record.get("root", ""), record.get("media"), where)
        except RecursionError:
            raise DataError("bad_record", where, "the record is nested too deeply") from None
        except UnicodeError as e:
            raise DataError("bad_record", where, f"the record's text is not valid Unicode ({_short(str(e))})") from None


_SURROGATE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse(data: bytes | str, where: str, what: str) -> Any:
    """JSON text -> value; anything that is not JSON (bad syntax, not UTF-8, too deep) is `malformed_json`."""
    try:
        value = json.loads(data)
        if _SURROGATE_RE.search(data.encode() if isinstance(data, str) else data):
            # a \ud800-style escape: valid JSON, but a lone surrogate is not Unicode text (UnicodeEncodeError here)
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except RecursionError:
        raise DataError("malformed_json", where, f"malformed JSON {what}: nested too deeply") from None
    except (ValueError, UnicodeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        msg = " ".join(str(e).split())
        raise DataError("malformed_json", where, f"malformed JSON {what}: {msg[:200]}") from None


class EncodeRecords(grain.transforms.Map):
    """The grain map: a record -> a sample, or {"skip": reason, "where", "message"} (on_error="skip")."""

    def __init__(self, encoder: ConversationEncoder, on_error: str = "skip") -> None:
        self.encoder, self.on_error = encoder, on_error

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.encoder(record)
        except DataError as e:
            if self.on_error == "raise":
                raise
            return {"skip": e.reason, "where": e.where, "message": e.message}


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.


def _source_name(cfg: DataConfig, section: str = "data") -> str:
    if cfg.jsonl:
        return f"{section}.jsonl " + ", ".join([cfg.jsonl] if isinstance(cfg.jsonl, str) else cfg.jsonl)
    return f"{section}.tfds {cfg.tfds_dir or cfg.tfds_name}"


def make_dataset(cfg: DataConfig, checkpoint_dir: str, shard_index: int | None = None,
                 shard_count: int | None = None, model_cfg: Any = None, section: str = "data") -> grain.IterDataset:
    """The grain pipeline: an IterDataset of (batch, stats) pairs (see packing.py for both). `section` names the
    config section in error messages ("data", "eval").

    Shards default to (jax.process_index(), jax.process_count()): host i reads records i, i + n, ... of each epoch's
    shuffled order."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if model_cfg is None:
        from glm41v_jax.config import Glm4vConfig

        model_cfg = Glm4vConfig.from_file(checkpoint_dir)
    m2 = model_cfg.vision.spatial_merge_size**2
    if cfg.max_patches % m2:
        raise DataConfigError(f"data.max_patches ({cfg.max_patches}) must be a multiple of {m2} (spatial_merge_size^2 "
                              "of the model)")
    encoder = ConversationEncoder(checkpoint_dir, cfg.seq_len, cfg.max_patches, cfg.loss_on_thinking)
    pad_id = encoder.processor.pad_token_id  # also checks the checkpoint's tokenizer loads, before any worker starts
    source = make_source(cfg)
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds[shard_index::shard_count]
    if len(source) == 0:
        raise DataConfigError(f"{_source_name(cfg, section)}: no records (the data is empty or only blank lines)")
    if len(ds) == 0:
        raise DataConfigError(f"{_source_name(cfg, section)}: shard {shard_index} of {shard_count} has no records "
                              f"({len(source)} in all, fewer than the hosts)")
    per_epoch = len(ds)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(EncodeRecords(encoder, cfg.on_error))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if cfg.worker_count:
        from absl import flags  # grain reads its absl flags when it starts workers; outside absl.app they are unparsed

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return PackedBatchDataset(it, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_patches=cfg.max_patches,
                              model_cfg=model_cfg, pad_id=pad_id, packing=cfg.packing, open_batches=cfg.open_batches,
                              records_per_epoch=per_epoch, name=_source_name(cfg, section))


class SftIterator(grain.DatasetIterator):
    """Yields batches (the train step's kwargs + labels); `stats` holds the counters as of the last batch.

    A grain DatasetIterator: `get_state()` / `set_state()` (JSON-able dicts) and orbax's
    `grain.checkpoint.CheckpointSave/CheckpointRestore` resume exactly."""

    def __init__(self, parent: grain.DatasetIterator) -> None:
        super().__init__(parent)
        self.stats: dict[str, Any] = {}

    def __next__(self) -> dict[str, Any]:
        batch, self.stats = next(self._parent)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def make_iterator(cfg: DataConfig, checkpoint_dir: str, shard_index: int | None = None,
                  shard_count: int | None = None, model_cfg: Any = None, section: str = "data") -> SftIterator:
    """`make_dataset(...)` as an iterator of batches; see SftIterator."""
    return SftIterator(iter(make_dataset(cfg, checkpoint_dir, shard_index, shard_count, model_cfg, section)))
