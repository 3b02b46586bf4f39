"""GLM-4.1V processor: chat template rendering, placeholder expansion, tokenisation (like `Glm4vProcessor`).

What is special here (docs/MODEL.md §5.3, §6; checked against transformers 5.23):

* The chat template is rendered as transformers renders it (chat_template.py); messages are normalised and their
  media collected as transformers does (messages.py).
* `<|image|>` expands to `<|image|>` × t·h·w/4. `<|video|>` expands to, per temporal group,
  `<|begin_of_image|>` + `<|image|>`×(h·w/4) + `<|end_of_image|>` + str(int(ts)) with ts = timestamps[::2]
  (truncated / padded with the last value to gt). Expansion is a single left-to-right pass over the text.
* `mm_token_type_ids` = 2 for `<|image|>` inside a `<|begin_of_video|>`…`<|end_of_video|>` span, 1 for other
  `<|image|>`, 0 otherwise. Batches are padded on the tokenizer's padding side (left for GLM) with `<|endoftext|>`.
* Placeholder counts are checked against the media before any image/video is processed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np
from tokenizers import Tokenizer

from ..inputs import token_types
from .chat_template import (
    TEMPLATE_RUNTIME_ERRORS,
    compile_chat_template,
    find_chat_template,
    plain_template_data,
    template_error,
)
from .image import ImageProcessor, ProcessingError, read_json_object
from .messages import check_unicode, extract_media, flatten_media, message_texts, normalize_messages
from .video import VideoMetadata, VideoProcessor

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
BEGIN_IMAGE = "<|begin_of_image|>"
END_IMAGE = "<|end_of_image|>"
BEGIN_VIDEO = "<|begin_of_video|>"
END_VIDEO = "<|end_of_video|>"
# Media markup: the template writes them around image/video items; in text they would break the pairing of
# placeholders with media, so text read as markup must not hold them.
RESERVED_MEDIA_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN, BEGIN_IMAGE, END_IMAGE, BEGIN_VIDEO, END_VIDEO)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Processor:
    """Text + images + videos -> model inputs (numpy), matching transformers' `Glm4vProcessor`."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        special_tokens: Mapping[str, str] | None = None,
        padding_side: str = "left",
        chat_template_source: str | None = None,
    ) -> None:
        """`tokenizer` is a `tokenizers.Tokenizer`; `special_tokens` the tokenizer_config.json bos/eos/pad/... map;
        `chat_template_source` where the template came from (named in its errors). The template is compiled here, so
        a syntax error shows at once."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source or "(given as text)"
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self.special_tokens.setdefault("eos_token", "<|endoftext|>")
        self.special_tokens.setdefault("pad_token", "<|endoftext|>")
        if padding_side not in ("left", "right"):
            raise ProcessingError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self._template = None
        if chat_template is not None:
            try:
                self._template = compile_chat_template(chat_template)
            except (jinja2.TemplateError, *TEMPLATE_RUNTIME_ERRORS) as e:
                raise template_error(e, self.chat_template_source) from None
        self._added_ids = frozenset(int(i) for i in tokenizer.get_added_tokens_decoder())
        self._plain_tokenizer: Any = None
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.video_token_id = self._token_id(VIDEO_TOKEN)
        self.video_start_id = self._token_id(BEGIN_VIDEO)
        self.video_end_id = self._token_id(END_VIDEO)
        self.pad_token_id = self._token_id(self.special_tokens["pad_token"])

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ProcessingError(f"tokenizer has no token {token!r}")
        return int(tid)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> Processor:
        """tokenizer.json (+ tokenizer_config.json), chat template, preprocessor / video preprocessor configs."""
        d = os.fspath(checkpoint_dir)
        if not os.path.isdir(d):
            raise ProcessingError(f"checkpoint directory not found: {d!r}")
        tok_path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ProcessingError(f"{d!r}: tokenizer.json not found (only fast `tokenizers` files are supported)")
        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ProcessingError(f"{tok_path!r}: cannot load tokenizer: {e}") from e
        tok_cfg = read_json_object(os.path.join(d, "tokenizer_config.json")) or {}
        if not isinstance(tok_cfg.get("padding_side", "left"), str):
            raise ProcessingError(f"{os.path.join(d, 'tokenizer_config.json')!r}: field 'padding_side' must be "
                                  f"'left' or 'right', got {type(tok_cfg['padding_side']).__name__}")
        special = {}
        for k in _SPECIAL_KEYS:
            v = tok_cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                special[k] = v
        template, source = find_chat_template(d, tok_cfg)
        return cls(
            tokenizer,
            template,
            ImageProcessor.from_dir(d),
            VideoProcessor.from_dir(d),
            special_tokens=special,
            padding_side=tok_cfg.get("padding_side", "left"),
            chat_template_source=source,
        )

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render HF-format messages to the prompt string (same output as HF `apply_chat_template(tokenize=False)`)."""
        return "".join(t for t, _ in self._render(messages, add_generation_prompt, False, kwargs))

    def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, keep_user_text: bool,
                kwargs: Mapping[str, Any] | None = None) -> list[tuple[str, bool]]:
        """Render the template -> [(text, is_user_text)]. With `keep_user_text`, the text of user turns goes through
        the template as unique markers and comes back as its own pieces, so it can be tokenized as plain text."""
        if self._template is None:
            raise ProcessingError("this processor has no chat template (chat_template.jinja / tokenizer_config.json)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise ProcessingError("messages must be a list of dicts with 'role' and 'content'")
        nonce = secrets.token_hex(8)
        user_texts: list[str] = []

        def mark(text: Any) -> Any:
            if not isinstance(text, str):
                return text
            user_texts.append(text)
            return f"\ue000{nonce}:{len(user_texts) - 1}\ue001"

        chat = []
        for m in normalize_messages(messages):
            m = plain_template_data(m)
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            if keep_user_text and m.get("role") == "user":
                if isinstance(m.get("content"), str):
                    m["content"] = mark(m["content"])
                elif isinstance(m.get("content"), list):
                    m["content"] = [{**c, "text": mark(c.get("text"))}
                                    if isinstance(c, dict) and c.get("type") == "text" else c for c in m["content"]]
            chat.append(m)
        variables = {**self.special_tokens, **plain_template_data(dict(kwargs or {}))}
        try:
            text = self._template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except (jinja2.TemplateError, *TEMPLATE_RUNTIME_ERRORS) as e:
            raise template_error(e, self.chat_template_source) from None
        if not user_texts:
            return [(text, False)]
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        pieces = [(user_texts[int(p)], True) if i % 2 else (p, False) for i, p in enumerate(parts)]
        if any(nonce in p for p, user in pieces if not user):
            raise ProcessingError(f"chat template {self.chat_template_source} changes the text of user messages, so "
                                  "it cannot be kept apart from the markup; use text_special_tokens=True")
        return [(p, user) for p, user in pieces if p]

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        videos: Any = None,
        video_metadata: Any = None,
        padding: bool = True,
        do_sample_frames: bool | None = None,
        add_special_tokens: bool = True,
        return_metadata: bool = False,
    ) -> dict[str, Any]:
        """Tokenise prompts, expanding media placeholders. Returns numpy arrays: input_ids, attention_mask,
        mm_token_type_ids (int64, (B, L)) and pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw
        when media are given. Images / videos are flat lists in prompt order (nested per-sample lists are flattened).
        `return_metadata=True` adds "video_metadata" (per video, with the sampled frames_indices), like HF.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ProcessingError("text must be a string or a non-empty list of strings")
        return self._encode([[(t, False)] for t in texts], images, videos, video_metadata, padding,
                            do_sample_frames, add_special_tokens, return_metadata)

    def _encode(self, samples: list[list[tuple[str, bool]]], images: Any, videos: Any, video_metadata: Any,
                padding: bool, do_sample_frames: bool | None, add_special_tokens: bool,
                return_metadata: bool) -> dict[str, Any]:
        """`samples`: per prompt, its pieces (text, is_user_text). Placeholders are counted and expanded in the
        markup pieces only; user-text pieces are tokenized as plain text (no added token is matched in them)."""
        for pieces in samples:
            for t, _ in pieces:
                check_unicode(t)
        markup = [t for pieces in samples for t, user in pieces if not user]
        image_list = flatten_media(images, is_video=False)
        video_list = flatten_media(videos, is_video=True)
        n_img_ph = sum(t.count(IMAGE_TOKEN) for t in markup)
        n_vid_ph = sum(t.count(VIDEO_TOKEN) for t in markup)
        if n_img_ph != len(image_list):
            raise ProcessingError(
                f"number of {IMAGE_TOKEN} placeholders in the text ({n_img_ph}) does not match the number of images "
                f"given ({len(image_list)})"
            )
        if n_vid_ph != len(video_list):
            raise ProcessingError(
                f"number of {VIDEO_TOKEN} placeholders in the text ({n_vid_ph}) does not match the number of videos "
                f"given ({len(video_list)})"
            )
        out: dict[str, Any] = {}
        image_repl: list[str] = []
        video_repl: list[str] = []
        if image_list:
            img = self.image_processor(image_list)
            out.update(img)
            m2 = self.image_processor.merge_size**2
            image_repl = [IMAGE_TOKEN * int(np.prod(g) // m2) for g in img["image_grid_thw"]]
        if video_list:
            vid = self.video_processor(video_list, video_metadata, do_sample_frames=do_sample_frames)
            out["pixel_values_videos"] = vid["pixel_values_videos"]
            out["video_grid_thw"] = vid["video_grid_thw"]
            if return_metadata:
                out["video_metadata"] = vid["video_metadata"]
            m2 = self.video_processor.merge_size**2
            video_repl = [
                self._video_structure(g, md, m2)
                for g, md in zip(vid["video_grid_thw"], vid["video_metadata"], strict=True)
            ]
        expanded = iter(_expand_placeholders(markup, image_repl, video_repl))
        ids = []
        for pieces in samples:
            text, spans = "", []
            for t, user in pieces:
                t = t if user else next(expanded)
                if user:
                    spans.append((len(text), len(text) + len(t)))
                text += t
            ids.append(self._tokenize(text, spans, add_special_tokens))
        out.update(self._pad(ids, padding))
        return out

    def _tokenize(self, text: str, user_spans: list[tuple[int, int]], add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; inside `user_spans` no added token (`<|assistant|>`, `<think>`, ...) is matched.

        The whole text is encoded as usual first. When no added token falls in a user span (ordinary text), that is
        the result, so it equals transformers' tokenization. Otherwise the added tokens outside the spans are kept
        and the text between them is encoded by a copy of the tokenizer without added tokens (`tokenizers` encodes
        the text between added tokens piece by piece anyway, so ordinary text gives the same ids either way)."""
        enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not user_spans:
            return list(enc.ids)

        def in_user_text(start: int, end: int) -> bool:
            return any(start < e and end > s for s, e in user_spans)

        added = [tid in self._added_ids and in_user_text(*off) for tid, off in zip(enc.ids, enc.offsets, strict=True)]
        if not any(added):
            return list(enc.ids)
        out: list[int] = []
        pos, seen_text = 0, False
        for tid, (start, end), injected in zip(enc.ids, enc.offsets, added, strict=True):
            if start == end:  # added by the post-processor (no text): before or after the text
                if seen_text:
                    out += self._plain_ids(text[pos:])
                    pos = len(text)
                out.append(int(tid))
                continue
            seen_text = True
            if tid in self._added_ids and not injected:  # markup: kept as the control token
                out += self._plain_ids(text[pos:start])
                out.append(int(tid))
                pos = end
        return out + self._plain_ids(text[pos:])

    def _plain_ids(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain_tokenizer is None:
            spec = json.loads(self.tokenizer.to_str())
            spec["added_tokens"] = []
            self._plain_tokenizer = Tokenizer.from_str(json.dumps(spec))
        return list(self._plain_tokenizer.encode(text, add_special_tokens=False).ids)

    @staticmethod
    def _video_structure(grid: np.ndarray, metadata: VideoMetadata, merge_area: int) -> str:
        gt = int(grid[0])
        per_frame = int(np.prod(grid)) // merge_area // gt
        fps = 24.0 if metadata.fps is None else metadata.fps  # HF assumes 24 fps (with a warning) when unknown
        idx = metadata.frames_indices if metadata.frames_indices is not None else []
        ts = [i / fps for i in idx][::2][:gt]
        while len(ts) < gt:
            ts.append(ts[-1] if ts else 0)
        return "".join(f"{BEGIN_IMAGE}{IMAGE_TOKEN * per_frame}{END_IMAGE}{int(t)}" for t in ts)

    def _pad(self, ids: list[list[int]], padding: bool) -> dict[str, np.ndarray]:
        lengths = {len(x) for x in ids}
        if len(lengths) > 1 and not padding:
            raise ProcessingError(f"prompts have different lengths {sorted(lengths)}; use padding=True")
        L = max(lengths)
        input_ids = np.full((len(ids), L), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), L), dtype=np.int64)
        for i, x in enumerate(ids):
            sl = slice(L - len(x), L) if self.padding_side == "left" else slice(0, len(x))
            input_ids[i, sl] = x
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": self.mm_token_type_ids(input_ids)}

    def mm_token_type_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """The token types (`inputs.token_types`) of each row, int64 like transformers' processor."""
        ids = np.atleast_2d(np.asarray(input_ids))
        return token_types(ids, self.image_token_id, self.video_start_id, self.video_end_id).astype(np.int64)

    # ------------------------------------------------------------------ messages
    def encode_messages(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, assistant_prefix: str = "",
        text_special_tokens: bool = False, **call_kwargs: Any
    ) -> dict[str, Any]:
        """Render the chat template and process the images/videos found in the messages, in order.

        Image items: {"type": "image", "image": path | PIL | uint8 array} ("path"/"url" keys accepted for local
        files). Video items: {"type": "video", "video": path | (frames, VideoMetadata) | frames}.
        `assistant_prefix` is appended after the generation prompt: the start of the reply, written for the model
        (e.g. `"<think></think>"` for an empty thinking block).

        The text of user turns is encoded as plain text: `<|assistant|>`, `<|endoftext|>`, `<think>`, ... typed by a
        user are the characters they are, not control tokens (no role injection). `text_special_tokens=True` reads
        them as control tokens instead, as transformers' `apply_chat_template` + tokenizer does. Text read as markup
        (system and assistant turns; user turns too with `text_special_tokens=True`) must not hold the media tokens
        (`<|image|>`, `<|begin_of_video|>`, ...): images and videos go in their own content items.
        """
        messages = normalize_messages(messages)
        images, videos = extract_media(messages)
        for i, m in enumerate(messages):
            if m.get("role") == "user" and not text_special_tokens:
                continue
            for t in message_texts(m):
                bad = next((tok for tok in RESERVED_MEDIA_TOKENS if tok in t), None)
                if bad is not None:
                    raise ProcessingError(
                        f"message {i + 1} ({m.get('role')}): the text contains the reserved token {bad!r}; images "
                        "and videos go in their own content items (in the CLI: --image / --video, /image / /video)")
        pieces = self._render(messages, add_generation_prompt, not text_special_tokens)
        if assistant_prefix:
            if not add_generation_prompt:
                raise ProcessingError("assistant_prefix needs add_generation_prompt=True")
            if any(tok in assistant_prefix for tok in RESERVED_MEDIA_TOKENS):
                raise ProcessingError("assistant_prefix must not contain media tokens")
            pieces.append((assistant_prefix, False))
        kw = {"padding": True, "do_sample_frames": None, "add_special_tokens": True, "return_metadata": False,
              "video_metadata": None}
        unknown = set(call_kwargs) - set(kw)
        if unknown:
            raise TypeError(f"encode_messages() got unexpected keyword argument(s) {sorted(unknown)}")
        kw.update(call_kwargs)
        return self._encode([pieces], images or None, videos or None, kw["video_metadata"], kw["padding"],
                            kw["do_sample_frames"], kw["add_special_tokens"], kw["return_metadata"])

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (`<think>`/`<answer>` survive skip_special_tokens, as in the real tokenizer)."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(flat, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def num_image_tokens(self, height: int, width: int) -> int:
        """Merged LLM tokens for an image of original size (height, width)."""
        return self.image_processor.num_image_tokens(height, width)


def _expand_placeholders(texts: list[str], image_repl: list[str], video_repl: list[str]) -> list[str]:
    """Replace each placeholder, left to right over the batch, with its expansion (single pass, no re-scanning)."""
    it_img, it_vid = iter(image_repl), iter(video_repl)
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")

    def sub(m: re.Match) -> str:
        return next(it_img) if m.group(0) == IMAGE_TOKEN else next(it_vid)

    return [pattern.sub(sub, t) for t in texts]
