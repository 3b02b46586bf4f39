"""Chat templates: found in a checkpoint directory, compiled and rendered in the jinja2 environment transformers
uses (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` plus the same globals and filters:
`raise_exception`, `strftime_now`, `tojson` without HTML escaping, `dict`, `namespace`, loop controls, a
pass-through `{% generation %}` tag). Template inputs are first reduced to plain JSON data (`plain_template_data`)
as transformers does, so a list content of a system/assistant turn renders as the same Python repr.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .image import ProcessingError, read_json_object


def plain_template_data(value: Any) -> Any:
    """Reduce template inputs to plain JSON-like data, like transformers' `_plain_template_data`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def compile_chat_template(template: str):
    """Compile a chat template in the same jinja2 environment transformers uses."""
    class _Generation(Extension):  # `{% generation %}...{% endgeneration %}` renders its body unchanged
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    return env.from_string(template)


def template_error(e: BaseException, source: str) -> ProcessingError:
    """A jinja2 (or Python) error of a chat template -> ProcessingError naming the template and the line."""
    line = getattr(e, "lineno", None)
    where = f"{source}" + (f", line {line}" if line else "")
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return ProcessingError(f"chat template {where}: {type(e).__name__}: {msg}")


# What rendering a template (user data: the checkpoint's file) can raise besides jinja2's own TemplateError.
TEMPLATE_RUNTIME_ERRORS = (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError)


def load_chat_template(checkpoint_dir: str, tokenizer_config: Mapping[str, Any] | None = None) -> str:
    """chat_template.jinja, else tokenizer_config.json "chat_template", else chat_template.json; error if none."""
    return find_chat_template(checkpoint_dir, tokenizer_config)[0]


def find_chat_template(checkpoint_dir: str, tokenizer_config: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(template text, where it came from): chat_template.jinja, else tokenizer_config.json "chat_template", else
    chat_template.json. A file that is not UTF-8, or none found, is a ProcessingError naming it."""
    p = os.path.join(checkpoint_dir, "chat_template.jinja")
    if os.path.isfile(p):
        with open(p, "rb") as f:
            raw = f.read()
        try:
            return raw.decode("utf-8"), p
        except UnicodeDecodeError as e:
            raise ProcessingError(f"{p}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    cfg = tokenizer_config if tokenizer_config is not None else read_json_object(os.path.join(checkpoint_dir,
                                                                                        "tokenizer_config.json"))
    for source, tpl in (("tokenizer_config.json", (cfg or {}).get("chat_template")),
                        ("chat_template.json", (read_json_object(os.path.join(checkpoint_dir, "chat_template.json"))
                                                or {}).get("chat_template"))):
        path = os.path.join(checkpoint_dir, source)
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}]
            tpl = next((t.get("template") for t in tpl if isinstance(t, Mapping) and t.get("name") == "default"), None)
        if isinstance(tpl, str) and tpl:
            return tpl, f"{path} (field 'chat_template')"
        if tpl is not None:
            raise ProcessingError(f"{path!r}: field 'chat_template' must be a string, got {type(tpl).__name__}")
    raise ProcessingError(
        f"{checkpoint_dir!r}: no chat template found (looked for chat_template.jinja, tokenizer_config.json "
        "'chat_template' and chat_template.json)"
    )
