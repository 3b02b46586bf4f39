"""Splitting GLM-4.1V-Thinking output into its reasoning and its answer.

The model writes `<think>{reasoning}</think><answer>{answer}</answer>` (GLM41V_SPEC §6.3). The official demo parses
it with the DOTALL regexes `<think>(.*?)</think>` and `<answer>(.*?)</answer>`; `parse_response` does the same and
also copes with truncated or loosely formatted output:
  * no `</answer>` (stopped by max_new_tokens, or `</answer>` dropped by skip_special_tokens): the answer runs to
    the end of the text;
  * no `<answer>`: the answer is whatever follows `</think>`;
  * no `</think>` (thinking cut short): everything after `<think>` is thinking and the answer is empty;
  * no tags at all: the whole text is the answer.
"""

from __future__ import annotations

import re

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOX_RE = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def parse_response(text: str) -> dict[str, str]:
    """`text` -> {"thinking": ..., "answer": ...}, both stripped of surrounding whitespace."""
    thinking = ""
    rest = text
    m = THINK_RE.search(text)
    if m:
        thinking = m.group(1)
        rest = text[m.end():]
    elif "<think>" in text:  # thinking was cut short
        before, _, after = text.partition("<think>")
        if "<answer>" not in after:
            return {"thinking": after.strip(), "answer": ""}
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
    return {"thinking": thinking.strip(), "answer": answer.strip()}


def boxed(answer: str) -> list[str]:
    """The `<|begin_of_box|>...<|end_of_box|>` spans of an answer (boxed results / coordinates)."""
    return [s.strip() for s in BOX_RE.findall(answer)]


def strip_thinking(text: str) -> str:
    """Assistant text for multi-turn history: `<think>...</think>` removed (the README's rule)."""
    return THINK_RE.sub("", text).strip()
