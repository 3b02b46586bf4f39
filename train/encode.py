"""One SFT conversation -> one training sample: tokens, labels, M-RoPE positions and the decoded media.

Tokens are what the checkpoint's chat template renders (`Processor.apply_chat_template`, `add_generation_prompt=False`)
with the media placeholders expanded by the processor. The conversation is rendered turn by turn: turn k's text is
render(messages[:k+1]) minus render(messages[:k]). Each turn starts with a special token, so tokenising the turns one by
one gives the tokens of the whole text (checked on every sample). Labels (aligned with input_ids, HF convention: the
loss shifts them, logits at t predict labels[t+1]) are the tokens of every assistant message's content (the tokens
overlapping its characters; not the `<|assistant|>\\n` header) and ONE `<|endoftext|>` appended after the final
assistant message; everything else is IGNORE_INDEX. `loss_on_thinking=False` also leaves the `<think>...</think>` part
of each assistant message (tags included; an unclosed `<think>` runs to the end of the message) out of the loss. Turns
after the last assistant message are dropped (they would carry no label).

Truncation never cuts inside a turn, so never inside an image or video span: a conversation whose tokens (+1 for the
eos) exceed `seq_len`, or whose patches exceed `max_patches`, keeps its longest prefix that ends with an assistant
turn and fits both; it is counted as `truncated`. If not even the first assistant turn fits, the sample is skipped.

Bad data raises `DataError` with a reason (one of SKIP_REASONS, counted in the stats as `skipped_<reason>`) and the
record's file:line; `EncodeRecords` applies the `on_error` policy (skip and count, or raise). The reasons and when
they apply are listed in train/README.md ("Bad data"). Configuration problems (a chat template that is not stable
turn by turn, a tokenizer that merges tokens across turns) raise DataConfigError whatever the policy.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from glm41v_jax.config import patch_dim_of
from glm41v_jax.errors import Glm41vError, one_line
from glm41v_jax.inputs import get_rope_index
from glm41v_jax.processing import ProcessingError, Processor
from glm41v_jax.processing.processor import IMAGE_TOKEN, VIDEO_TOKEN

from .loss import IGNORE_INDEX
from .packing import DataConfigError

ROLES = ("system", "user", "assistant")
EOS_TOKEN = "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SKIP_REASONS = ("malformed_json", "bad_record", "no_assistant", "path_escape", "missing_media", "media_error",
                "too_long", "too_many_patches", "no_labels")
_THINK_RE = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"|\Z)", re.S)


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
        labels: list[np.ndarray] = [np.full(len(ids[0]), IGNORE_INDEX, np.int64)]
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
                lab = np.asarray([t if any(s < b and e > a for a, b in ranges) and e > s else IGNORE_INDEX
                                  for t, (s, e) in zip(enc.ids, enc.offsets, strict=True)], np.int64)
                ids.append(np.asarray(enc.ids, np.int64))
                labels.append(lab)
                plain.append(enc.ids)
            else:
                out = self._process_turn(proc, m, piece, media, tmp, where)
                ids.append(out["input_ids"][0].astype(np.int64))
                labels.append(np.full(len(ids[-1]), IGNORE_INDEX, np.int64))
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
        if not (label_ids[:-1] != IGNORE_INDEX).any():
            raise DataError("no_labels", where, "the assistant turns have no label tokens")
        arrays = {key: (np.concatenate(v[: n_vis[key]]) if n_vis[key] else None) for key, v in vision.items()}
        types = proc.mm_token_type_ids(input_ids[None])
        positions, _ = get_rope_index(input_ids[None], types, arrays["image_grid_thw"], arrays["video_grid_thw"],
                                      None, proc.image_processor.merge_size)
        patch_dim = patch_dim_of(proc.image_processor.patch_size, proc.image_processor.temporal_patch_size)
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
        raise DataError("malformed_json", where, f"malformed JSON {what}: {one_line(e)[:200]}") from None


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
