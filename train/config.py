"""The training config: one YAML file (+ `--set key.sub=value` overrides) -> a validated `TrainConfig`.

    model: /ckpt/GLM-4.1V-9B-Thinking      # HF dir, converted dir or hub id
    output_dir: runs/sft1
    steps: 1000
    mesh: data=2,fsdp=4                    # default: every device on fsdp
    data:  {jsonl: data/train.jsonl, seq_len: 4096, batch_size: 8, max_patches: 16384}    # DataConfig (data.py)
    optim: {peak_lr: 1.0e-5, warmup_steps: 50}                                            # OptimConfig (optim.py)
    step:  {accum_steps: 1, remat_policy: full}                                           # StepConfig (step.py)
    eval:  {jsonl: data/val.jsonl, every: 200}                                            # optional
    lora:  {rank: 8, alpha: 16, targets: [q_proj, v_proj], dropout: 0.05}                  # optional (LoraConfig)

Every key is checked: an unknown key, a value of the wrong type, or a value the section rejects raises
`TrainConfigError` naming the field (`data.seq_len: expected an integer, got 'abc' (str)`). Overrides are
`dotted.key=value` with the value read as YAML (`--set optim.peak_lr=2e-5 --set optim.freeze=[vision]`).
`optim.total_steps` defaults to `steps` (the cosine ends with the run).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from glm41v_jax.config import QUANT_SCHEMES, QUANT_SKIPPABLE, ConfigError, LoraConfig
from glm41v_jax.errors import one_line

from .optim import OptimConfig
from .step import StepConfig

RESUME = ("auto", "required", "never")
INT_MAX = 2**31 - 1  # every integer field is a count, a size or a seed in [0, INT_MAX] (the step counters are int32)
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
FINAL_DTYPES = ("bfloat16", "float32")


class TrainConfigError(ConfigError):
    """A bad training config; the message names the field."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out loss every `every` steps: the token-weighted mean over the whole file (each host its shard)."""

    jsonl: str | tuple[str, ...]
    every: int = 500
    seq_len: int | None = None  # default: data.seq_len
    batch_size: int | None = None  # default: data.batch_size
    max_patches: int | None = None  # default: data.max_patches
    max_batches: int | None = None  # cap per host (None: the whole shard)

    def __post_init__(self) -> None:
        if isinstance(self.jsonl, list):
            object.__setattr__(self, "jsonl", tuple(self.jsonl))
        for k in ("every", "seq_len", "batch_size", "max_patches", "max_batches"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ValueError(f"eval.{k} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # HF checkpoint dir, converted dir (`glm41v convert`), or hub id
    output_dir: str  # checkpoints/, metrics.jsonl, tensorboard/, final/
    steps: int  # optimizer steps in the whole run (a resumed run continues to this count)
    data: Any  # DataConfig (train/data.py; imported lazily: it pulls in grain)
    optim: OptimConfig = OptimConfig()
    step: StepConfig = StepConfig()
    eval: EvalConfig | None = None
    # LoRA (train/lora_step.py): train adapters on the frozen base (float, or a quantized converted directory:
    # QLoRA) instead of the weights; the checkpoints hold the adapters and final/ is the adapter directory
    lora: LoraConfig | None = None
    # LoRA only: quantize a float base at load, tensor by tensor ("int8" | "int4": QLoRA without a converted int8
    # directory; a quantized converted directory needs none of these), as `glm41v generate --quantize` does
    quantize: str = "none"
    quant_group_size: int = 128  # int4: input channels per scale
    quant_skip: tuple[str, ...] = ("vision",)  # parts left in float: lm_head, vision
    mesh: str | None = None  # "data=D,fsdp=F,tensor=T" (one axis may be -1); None: all devices on fsdp
    seed: int = 0  # the loop's PRNG key (saved and restored with each checkpoint)
    log_every: int = 10  # steps between metric fetches (every step still gets a metrics.jsonl line)
    save_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # checkpoints kept (older ones are deleted once a newer one is committed)
    async_save: bool = True  # write checkpoints in the background (the next steps run meanwhile)
    resume: str = "auto"  # auto: continue from the latest checkpoint if any; required: fail without one; never:
    #                       fail if output_dir already has checkpoints
    resume_step: int | None = None  # restore this step instead of the latest
    final_dtype: str = "bfloat16"  # dtype of the final weights (output_dir/final, the converted format)
    tensorboard: bool = True  # TensorBoard event files in output_dir/tensorboard (needs tensorboardX)
    log_samples: bool = False  # each host appends the fingerprints of the samples it read to samples.host<i>.jsonl
    progress: bool = True  # tqdm progress bar on process 0
    nonfinite_patience: int = 0  # consecutive steps with a non-finite loss or gradient norm that are skipped (their
    #                              update not applied) before the run stops with an error; 0: stop at the first

    def __post_init__(self) -> None:
        for k in ("steps", "log_every", "save_every", "keep_last"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.resume not in RESUME:
            raise ValueError(f"resume must be one of {', '.join(RESUME)}, got {self.resume!r}")
        if self.resume_step is not None and self.resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {self.resume_step}")
        if self.quantize not in QUANT_SCHEMES:
            raise ValueError(f"quantize must be one of {', '.join(QUANT_SCHEMES)}, got {self.quantize!r}")
        if self.quantize != "none" and self.lora is None:
            raise ValueError("quantize: a quantized base trains adapters only: add a lora: section (full-weight "
                             "training needs float weights)")
        if self.quant_group_size < 1:
            raise ValueError(f"quant_group_size must be a positive integer, got {self.quant_group_size}")
        bad = [p for p in self.quant_skip if p not in QUANT_SKIPPABLE]
        if bad:
            raise ValueError(f"quant_skip: unknown part(s) {bad}; expected any of {', '.join(QUANT_SKIPPABLE)}")
        if self.final_dtype not in FINAL_DTYPES:
            raise ValueError(f"final_dtype must be one of {', '.join(FINAL_DTYPES)}, got {self.final_dtype!r}")

    def quant_request(self) -> dict[str, Any]:
        """The `RuntimeConfig` fields that quantize the base at load ({} for none)."""
        if self.quantize == "none":
            return {}
        return {"quantize": self.quantize, "quant_group_size": self.quant_group_size, "quant_skip": self.quant_skip}

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(os.path.abspath(self.output_dir), "checkpoints")

    @property
    def final_dir(self) -> str:
        return os.path.join(os.path.abspath(self.output_dir), "final")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples as lists)."""

        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)
                        if not f.metadata.get("derived")}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x

        return plain(self)


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with typed checks.


class _WrongType(TrainConfigError):
    """A value of the wrong type (a union tries its next type); any other TrainConfigError is a bad value."""


def _data_config_cls():
    from .data import DataConfig  # imported on use: data.py pulls in grain, which reading a config does not need

    return DataConfig


def _section_types() -> dict[str, type]:
    return {"data": _data_config_cls(), "optim": OptimConfig, "step": StepConfig, "eval": EvalConfig,
            "lora": LoraConfig}


def _describe(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def _check(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and lightly coerced: list -> tuple, int -> float) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise TrainConfigError(f"{where}: may not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except _WrongType as e:
                errors.append(str(e).split(": ", 1)[1])
            except TrainConfigError:  # the right type, a bad value (a NaN, a NUL): that message
                raise
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise TrainConfigError(f"{where}: expected {names}, got {_describe(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise _WrongType(f"{where}: expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _WrongType(f"{where}: expected true or false, got {_describe(value)}")
        return value
    # One rule per type, for every field of every section (the sections' own checks add the ranges that depend on
    # the field): integers are counts, sizes or seeds in [0, INT_MAX]; numbers are finite; strings hold no NUL.
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType(f"{where}: expected an integer, got {_describe(value)}")
        if not 0 <= value <= INT_MAX:
            raise TrainConfigError(f"{where}: expected an integer in [0, {INT_MAX}], got {value}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType(f"{where}: expected a number, got {_describe(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise TrainConfigError(f"{where}: expected a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _WrongType(f"{where}: expected a string, got {_describe(value)}")
        if not value.strip():
            raise TrainConfigError(f"{where}: expected a non-empty string, got {value!r}")
        if "\x00" in value:
            raise TrainConfigError(f"{where}: the string holds a NUL character")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, f"a mapping ({getattr(tp, '__name__', tp)})")


def _build(cls: type, raw: Any, where: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise TrainConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("derived")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        raise TrainConfigError(f"{where + '.' if where else ''}{k}: unknown key; expected one of "
                               f"{', '.join(fields)}")
    kwargs = {}
    sections = _section_types() if cls is TrainConfig else {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        if name in sections:
            kwargs[name] = None if value is None and name in ("eval", "lora") else _build(sections[name], value, key)
        else:
            kwargs[name] = _check(value, hints[name], key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TrainConfigError(f"{where + '.' if where else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = one_line(e)
        if where and not msg.startswith(where + "."):
            msg = f"{where}.{msg}" if msg.split(" ", 1)[0].rstrip(":") in fields else f"{where}: {msg}"
        raise TrainConfigError(msg) from None


# ---------------------------------------------------------------------------------------------------------------
# Overrides and loading.


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`key.sub=value` strings (value parsed as YAML) applied to a nested dict (copied)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. optim.peak_lr=2e-5)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise TrainConfigError(f"--set {item!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError) as e:
            raise TrainConfigError(f"--set {key}: the value is not valid YAML ({one_line(e)})") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise TrainConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    raw = dict(raw)
    optim = raw.get("optim")
    # (a bad `steps` is reported under its own name, not through the optim.total_steps copied from it)
    if isinstance(raw.get("steps"), int) and not isinstance(raw.get("steps"), bool) and raw["steps"] > 0 and (
            optim is None or (isinstance(optim, Mapping) and "total_steps" not in optim)):
        raw["optim"] = {**(optim or {}), "total_steps": raw["steps"]}
        if "warmup_steps" not in raw["optim"]:
            raw["optim"]["warmup_steps"] = min(OptimConfig.warmup_steps, raw["steps"])
    return _build(TrainConfig, raw, "")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config file (or none: overrides only), apply the overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = os.fspath(path)
        if os.path.isdir(path):
            raise TrainConfigError(f"{path}: the config is a directory, expected a YAML file")
        if not os.path.isfile(path):
            raise TrainConfigError(f"{path}: config file not found")
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrainConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
        try:
            raw = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else one_line(e)
            raise TrainConfigError(f"{path}: not valid YAML ({why})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except TrainConfigError as e:
        raise TrainConfigError(f"{path}: {e}" if path is not None else str(e)) from None
