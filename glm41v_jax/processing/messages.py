"""Chat messages as the processor takes them: normalised like transformers (None keys dropped, OpenAI `image_url`
blocks), their media in template order, their text, and the flattening of the `images=` / `videos=` arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .chat_template import plain_template_data
from .image import ProcessingError
from .video import VideoMetadata


def message_texts(message: Mapping[str, Any]) -> list[str]:
    """The text of a message: its string content, or its text items."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, (list, tuple)):
        return [c["text"] for c in content if isinstance(c, Mapping) and isinstance(c.get("text"), str)]
    return []


def check_unicode(text: str) -> None:
    """Text the tokenizer can take: no lone surrogates (JSON's "\\ud800" can make them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProcessingError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}"
                              ) from None


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Like transformers: drop None-valued keys; OpenAI {"type": "image_url", "image_url": {"url": u}} blocks
    become {"type": "image", "url": u}."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("content"), list):
            content = []
            for c in m["content"]:
                if isinstance(c, Mapping) and c.get("type") == "image_url" and "image_url" in c:
                    info = c["image_url"]
                    c = {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
                content.append(c)
            m["content"] = content
        out.append(m)
    return out


def extract_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Images and videos of list-content messages in order (the template's test order: video before image)."""
    images: list[Any] = []
    videos: list[Any] = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "video" or "video" in item:
                src = next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
                if src is None:
                    raise ProcessingError(f"video item has no 'video' (or 'path') field: {plain_template_data(item)}")
                videos.append(src)
            elif item.get("type") == "image" or "image" in item:
                src = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
                if src is None:
                    raise ProcessingError(f"image item has no 'image' (or 'path') field: {plain_template_data(item)}")
                images.append(src)
    return images, videos


def flatten_media(media: Any, is_video: bool) -> list[Any]:
    """One item or a list of items -> flat list. For images, nested per-sample lists are flattened; for videos a
    list is always a list of videos (a video itself is a path, an array, a list of frames or (frames, metadata))."""
    if media is None:
        return []
    if isinstance(media, (str, os.PathLike, np.ndarray)) or not isinstance(media, (list, tuple)):
        return [media]
    if is_video and isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], (VideoMetadata, dict)):
        return [media]
    if is_video:
        return list(media)
    flat: list[Any] = []
    for m in media:
        flat.extend(m if isinstance(m, (list, tuple)) else [m])
    return flat
