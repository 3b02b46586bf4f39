"""Splitting GLM-4.1V-Thinking output into its reasoning, its answer, and the boxes / points the answer gives.

The model writes `<think>{reasoning}</think><answer>{answer}</answer>` (docs/MODEL.md §6.3). The official demo parses
it with the DOTALL regexes `<think>(.*?)</think>` and `<answer>(.*?)</answer>`; `parse_response` does the same and
also copes with truncated or loosely formatted output:
  * no `</answer>` (stopped by max_new_tokens, or `</answer>` dropped by skip_special_tokens): the answer runs to
    the end of the text;
  * no `<answer>`: the answer is whatever follows `</think>`;
  * no `</think>` (thinking cut short): everything after `<think>` is thinking and the answer is empty;
  * no tags at all: the whole text is the answer.
The answer comes back without its `<answer>`, `</answer>`, `<|begin_of_box|>` and `<|end_of_box|>` tags (what was
inside a box stays).

Grounding. GLM-V writes coordinates normalised to 0..1000 of the image (x = round(x_pixel / W * 1000), origin at
the top-left corner), in several bracket styles, with or without box tags, with any spacing, ints or floats:
    [[x1,y1,x2,y2]]    [x1, y1, x2, y2]    [[a,b,c,d],[e,f,g,h]]    (x1,y1,x2,y2)    [(x1,y1),(x2,y2)]
    <|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>                        points: [x, y]   [[x, y]]   [[x,y],[u,v]]
`parse_response` finds every bracket group of numbers in the answer and classifies it:
  * 4 numbers in `[...]` or `(...)` -> a box [x1, y1, x2, y2];
  * two 2-number groups in parentheses, `[(x1,y1),(x2,y2)]` or `((x1,y1),(x2,y2))` -> a box (its two corners);
  * 2 numbers in `[...]` -> a point; in `(...)` only when nested in a bracket group or inside box tags (a bare
    `(3, 4)` in prose is left alone);
  * a group of groups (`[[...],[...]]`) -> each member on its own (so `[[x,y],[u,v]]` is two points);
  * anything else (3 numbers, words, unbalanced or mismatched brackets) is skipped. Nothing ever raises.
Any 4-number group is taken for a box, so a math answer like `[1, 2, 3, 4]` yields one too.

Pixels. With `image_size=(width, height)` of the ORIGINAL image (before the processor's smart_resize: the 0..1000
coordinates are relative to the image, so resizing does not matter), x_px = round(x / 1000 * width) and
y_px = round(y / 1000 * height), rounded half up to an int and clamped to [0, width] x [0, height] (edge
coordinates: x_px = width is the right edge). A box or point with a coordinate outside 0..1000 is kept but flagged
`in_range=False` and gets no pixels.
Several images: pass a list of sizes. A box maps to the first image unless the answer, before the box, names an
image ("image 2", "picture 2", "图2", "第2张"; the last such mention before the box wins, 1-based, ignored when
it is out of range); `image` holds the 0-based index used.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import TypedDict

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOX_RE = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.DOTALL)
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ANSWER_TAGS = ("<answer>", "</answer>", BOX_OPEN, BOX_CLOSE)

# Prompt / stream pieces for controlling the thinking phase (docs/MODEL.md §6.3).
NO_THINKING_PREFIX = "<think></think>"  # appended after the generation prompt: the model answers at once
FORCED_ANSWER = "</think><answer>"  # forced into the stream when a thinking budget runs out

Number = int | float


class Box(TypedDict):
    """One bounding box of an answer.

    box_1000: [x1, y1, x2, y2] as the model wrote them (0..1000 normalised; ints stay ints, floats stay floats).
    box_px:   [x1, y1, x2, y2] in pixels of the original image (ints), or None without `image_size` or when the
              box is out of range.
    label:    the short text right before the box on its line ("cat: [[...]]" -> "cat"; a JSON-style
              `"label": "cat"` counts too), or None when there is none or it is a long sentence.
    image:    0-based index of the image the box refers to (0 unless several sizes were given and the text named
              another image).
    in_range: all four coordinates lie in 0..1000.
    text:     the bracket text the box was read from.
    """

    box_1000: list[Number]
    box_px: list[int] | None
    label: str | None
    image: int
    in_range: bool
    text: str


class Point(TypedDict):
    """One point of an answer; fields as in `Box` with [x, y]."""

    point_1000: list[Number]
    point_px: list[int] | None
    label: str | None
    image: int
    in_range: bool
    text: str


class ParsedResponse(TypedDict):
    thinking: str
    answer: str  # without <answer>/</answer>/<|begin_of_box|>/<|end_of_box|> tags
    boxes: list[Box]
    points: list[Point]


ImageSize = tuple[int, int] | Sequence[int]


# ---------------------------------------------------------------------------------------------------------------
# Thinking / answer.


def _split(text: str) -> tuple[str, str]:
    """(thinking, raw answer) with answer tags removed but box tags kept; both unstripped."""
    thinking = ""
    rest = text
    m = THINK_RE.search(text)
    if m:
        thinking = m.group(1)
        rest = text[m.end():]
    elif "<think>" in text:  # thinking was cut short
        before, _, after = text.partition("<think>")
        if "<answer>" not in after:
            return after, ""
        thinking, _, tail = after.partition("<answer>")
        rest = before + "<answer>" + tail
    elif "</think>" in text:  # opening tag missing (e.g. forced into the prompt)
        thinking, _, rest = text.partition("</think>")
    m = ANSWER_RE.search(rest)
    if m:
        answer = m.group(1)
    elif "<answer>" in rest:
        answer = rest.partition("<answer>")[2]
    else:
        answer = rest
    for tag in TAGS:
        answer = answer.replace(tag, "")
    return thinking, answer


def parse_response(text: str, image_size: ImageSize | Sequence[ImageSize] | None = None) -> ParsedResponse:
    """`text` -> {"thinking", "answer", "boxes", "points"} (see the module docstring and `Box` / `Point`).

    thinking and answer are stripped of surrounding whitespace; the answer has no answer or box tags. `image_size`:
    (width, height) of the original image, or a list of them (one per image of the prompt), for pixel coordinates.
    Raises only for a malformed `image_size` (ValueError), never for odd text.
    """
    thinking, raw = _split(text if isinstance(text, str) else str(text))
    sizes, multi = _sizes(image_size)
    boxes, points = _find_coordinates(raw, sizes, multi)
    answer = raw
    for tag in ANSWER_TAGS:
        answer = answer.replace(tag, "")
    return {"thinking": thinking.strip(), "answer": answer.strip(), "boxes": boxes, "points": points}


def boxed(answer: str) -> list[str]:
    """The `<|begin_of_box|>...<|end_of_box|>` spans of an answer (boxed results / coordinates)."""
    return [s.strip() for s in BOX_RE.findall(answer)]


def strip_thinking(text: str) -> str:
    """Assistant text for multi-turn history: `<think>...</think>` removed (the model card's rule).

    A thinking part that never closed (`<think>` ... end of text) is removed too, and so is everything up to a
    `</think>` whose `<think>` is missing.
    """
    text = THINK_RE.sub("", text)
    if "<think>" in text:
        text = text.partition("<think>")[0]
    if "</think>" in text:
        text = text.rpartition("</think>")[2]
    return text.strip()


def history_text(text: str) -> str:
    """The assistant content to keep in a multi-turn history: `strip_thinking(text)`, with an `<answer>` that
    was left open closed again (`</answer>` is an eos token, so `skip_special_tokens` decoding drops it; the
    template's rendered history shows `<answer>...</answer>`, docs/MODEL.md §6.1)."""
    out = strip_thinking(text)
    if "<answer>" in out and "</answer>" not in out.rpartition("<answer>")[2]:
        out += "</answer>"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Coordinates.


def _sizes(image_size: ImageSize | Sequence[ImageSize] | None) -> tuple[list[tuple[int, int]], bool]:
    if image_size is None:
        return [], False
    seq = list(image_size)
    if len(seq) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
        seq, multi = [seq], False
    else:
        multi = True
    out = []
    for s in seq:
        try:
            w, h = s
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be (width, height) or a list of them, got {image_size!r}") from None
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
            raise ValueError(f"image sizes must be positive (width, height), got {s!r}")
        out.append((int(w), int(h)))
    return out, multi


_NUM_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_SEP_RE = re.compile(r"[\s,，;；]*")
_CLOSE = {"[": "]", "(": ")"}
_MAX_DEPTH = 4


class _Group:
    __slots__ = ("kind", "items", "start", "end")

    def __init__(self, kind: str, items: list, start: int, end: int) -> None:
        self.kind, self.items, self.start, self.end = kind, items, start, end


def _parse_group(s: str, i: int, depth: int = 0) -> _Group | None:
    """Parse a bracket group of numbers / groups starting at s[i] in "[(", or None."""
    if depth >= _MAX_DEPTH:
        return None
    kind, close = s[i], _CLOSE[s[i]]
    start = i
    i += 1
    items: list = []
    while True:
        i = _SEP_RE.match(s, i).end()
        if i >= len(s):
            return None
        c = s[i]
        if c == close:
            return _Group(kind, items, start, i + 1) if items else None
        if c in _CLOSE:
            g = _parse_group(s, i, depth + 1)
            if g is None:
                return None
            items.append(g)
            i = g.end
            continue
        m = _NUM_RE.match(s, i)
        if not m:
            return None
        v = m.group(0)
        try:
            num: Number = int(v) if re.fullmatch(r"[-+]?\d+", v) else float(v)
        except ValueError:
            return None
        if isinstance(num, float) and not math.isfinite(num):
            return None
        items.append(num)
        i = m.end()


def _is_numbers(g: _Group, n: int) -> bool:
    return len(g.items) == n and all(not isinstance(x, _Group) for x in g.items)


def _classify(g: _Group, boxed_span: bool, nested: bool, out: list[tuple[str, list[Number], _Group]]) -> None:
    if _is_numbers(g, 4):
        out.append(("box", list(g.items), g))
    elif _is_numbers(g, 2):
        if g.kind == "[" or nested or boxed_span:
            out.append(("point", list(g.items), g))
    elif len(g.items) == 2 and all(isinstance(x, _Group) and x.kind == "(" and _is_numbers(x, 2) for x in g.items):
        a, b = g.items
        out.append(("box", [*a.items, *b.items], g))
    else:
        for x in g.items:
            if isinstance(x, _Group):
                _classify(x, boxed_span, True, out)


_LABEL_JSON_RE = re.compile(r"""["']?(?:label|name|object|category|class)["']?\s*[:=]\s*["']([^"'\n]{1,80})["']""",
                            re.IGNORECASE)
_LEAD_RE = re.compile(r"^(?:[\s\-*•·>#,，;；:：.。!?]|\d{1,3}[.)、]\s)+")
_TRAIL_RE = re.compile(
    r"(?:[\s:：=,，(（\[{\"'`*\-–—|]|\b(?:is|are|was|were|located|found|at|in|with|coordinates?|bbox(?:_2d)?|bounding|"
    r"boxes|box|positions?|points?)\b)+$",
    re.IGNORECASE)
_IMAGE_RE = re.compile(
    r"(?:\b(?:image|picture|photo|img)\s*#?\s*(\d{1,2})\b|图(?:片|像)?\s*(\d{1,2})|第\s*(\d{1,2})\s*张)", re.IGNORECASE)
_CONNECTIVE_RE = re.compile(r"^(?:and|or|then|also|plus|while|whereas)\b\s*", re.IGNORECASE)
_MAX_LABEL_WORDS, _MAX_LABEL_CHARS = 8, 60


def _json_label(s: str) -> str | None:
    matches = _LABEL_JSON_RE.findall(s)
    return (matches[-1].strip() or None) if matches else None


def _label(raw: str, seg_start: int, g: _Group) -> str | None:
    """The label of the box / point group `g`: a JSON-style `"label": "x"` in the same `{...}` object (after the
    group, then before it), else the short text between `seg_start` and the group."""
    after = raw[g.end:g.end + 200]
    cut = min((k for k in (after.find("}"), after.find("{"), after.find("["), after.find("\n")) if k >= 0),
              default=-1)
    if cut >= 0 and after[cut] == "}":
        found = _json_label(after[:cut])
        if found:
            return found
    seg = raw[seg_start:g.start].replace(BOX_OPEN, " ").replace(BOX_CLOSE, " ")
    obj = seg.rfind("{")
    if obj >= 0 and "}" not in seg[obj:]:
        found = _json_label(seg[obj:])
        if found:
            return found
    seg = seg.strip()
    if not seg or len(seg) > 4 * _MAX_LABEL_CHARS:
        return None
    seg = _TRAIL_RE.sub("", seg)
    seg = re.split(r"[,，!?！？]|[.。](?:\s|$)", seg)[-1]  # "In image 2, the cat is at [...]" -> "the cat"
    seg = _CONNECTIVE_RE.sub("", _LEAD_RE.sub("", seg)).strip()
    if not seg or len(seg) > _MAX_LABEL_CHARS or len(seg.split()) > _MAX_LABEL_WORDS:
        return None
    if any(c in seg for c in "[](){}") or not any(ch.isalpha() for ch in seg):
        return None
    return seg


def _to_px(vals: list[Number], size: tuple[int, int]) -> list[int]:
    """0..1000 -> pixels: round half up, clamp to [0, width] / [0, height] (x at even, y at odd positions)."""
    out = []
    for k, v in enumerate(vals):
        dim = size[k % 2]
        p = math.floor(float(v) * dim / 1000.0 + 0.5)
        out.append(min(max(p, 0), dim))
    return out


def _find_coordinates(raw: str, sizes: list[tuple[int, int]], multi: bool) -> tuple[list[Box], list[Point]]:
    boxes: list[Box] = []
    points: list[Point] = []
    try:
        spans = [(m.start(), m.end()) for m in BOX_RE.finditer(raw)]
        tops: list[tuple[_Group, list[tuple[str, list[Number], _Group]]]] = []
        i = 0
        n = len(raw)
        while i < n:
            j = min((k for k in (raw.find("[", i), raw.find("(", i)) if k >= 0), default=-1)
            if j < 0:
                break
            g = _parse_group(raw, j)
            if g is None:
                i = j + 1
                continue
            found: list[tuple[str, list[Number], _Group]] = []
            _classify(g, any(a <= j < b for a, b in spans), False, found)
            if found:
                tops.append((g, found))
            i = g.end
        mention_ends: list[int] = []
        mentions: list[int] = []  # image numbers named in the text (1-based), by position
        for mm in _IMAGE_RE.finditer(raw) if multi else ():
            mention_ends.append(mm.end())
            mentions.append(int(next(x for x in mm.groups() if x)))
        prev_end = 0
        for top, found in tops:
            line_start = max(raw.rfind(c, 0, top.start) for c in ("\n", "。", ";", "；")) + 1
            seg_start = max(line_start, prev_end)
            image = 0
            k = bisect.bisect_right(mention_ends, top.start)
            if multi and k and 1 <= mentions[k - 1] <= len(sizes):
                image = mentions[k - 1] - 1
            # members of one group ("[[box],[box]]") share the text before the group, unless they carry their own
            # JSON label
            shared = _label(raw, seg_start, top)
            for kind, vals, g in found:
                label = shared if g is top else (_label(raw, g.start, g) if len(found) > 1 else None) or shared
                in_range = all(0 <= float(v) <= 1000 for v in vals)
                px = _to_px(vals, sizes[image]) if sizes and in_range else None
                text = raw[g.start:g.end]
                if kind == "box":
                    boxes.append({"box_1000": vals, "box_px": px, "label": label, "image": image,
                                  "in_range": in_range, "text": text})
                else:
                    points.append({"point_1000": vals, "point_px": px, "label": label, "image": image,
                                   "in_range": in_range, "text": text})
            prev_end = top.end
    except Exception:  # never raise on odd text; whatever was found before the problem is kept
        pass
    return boxes, points
