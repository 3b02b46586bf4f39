"""Frozen model configs, nested the way HF nests them (vision / text / token ids).

`Glm4vConfig.from_hf(d)` accepts a checkpoint's `config.json` as a dict in either spelling:
  * the published (transformers 4.5x) layout: `rope_theta`, `partial_rotary_factor`,
    `rope_scaling={"type"/"rope_type": ..., "mrope_section": [...]}`;
  * the transformers-5 layout: `rope_parameters={"rope_theta", "partial_rotary_factor", "mrope_section", ...}`.
Text fields may sit in `text_config` (normal) or at the top level (older flattened dumps).

Run-time choices that are not part of the checkpoint (dtypes, scan vs unrolled layers, remat) live in
`RuntimeConfig`, so that the same checkpoint config serves training and decoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from .errors import Glm41vError

# Attention backends (glm41v_jax.attention): the XLA reference, TPU splash (Pallas), GPU cuDNN, or per-call choice.
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
KERNEL_LAYOUTS = ("in_out", "out_in")  # RuntimeConfig.kernel_layout (see layers.Dense)
QUANT_SCHEMES = ("none", "int8", "int4")  # RuntimeConfig.quantize (see quant.py)
QUANT_SKIPPABLE = ("lm_head", "vision")  # RuntimeConfig.quant_skip: the parts that may stay in float
# LoraConfig.targets default: every linear layer of the text decoder (LLaMA-Factory's GLM-4.1V recipe), none of the
# vision tower's (whose MLP also has a `down_proj`: hence the scoped last pattern; glm41v_jax/lora.py has the rule).
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "language_model.*.down_proj")


class ConfigError(Glm41vError, ValueError):
    """A config.json field is missing or has a bad value. The message names the field."""


_MISSING = object()


def _get(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING, aliases: Sequence[str] = ()) -> Any:
    for k in (key, *aliases):
        if k in d and d[k] is not None:
            return d[k]
    if default is _MISSING:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return default


# Counts that the code walks in Python (one weight-name rule per layer, one module per layer): a config.json that
# asks for a billion layers must fail here, before anything is built. The 9B has 40 layers, 24 blocks, 32 heads.
MAX_LAYERS = 1024
MAX_HEADS = 4096


def _int(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING, aliases: Sequence[str] = (),
         hi: int = 2**31 - 1) -> int:
    v = _get(d, key, where, default, aliases)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or int(v) != v or not (
            0 < v <= hi):
        raise ConfigError(f"{where}: field '{key}' must be a positive integer (at most {hi}), got {v!r}")
    return int(v)


def _float(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> float:
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: field '{key}' must be a positive number, got {v!r}")
    return float(v)


def _number(v: Any, key: str, where: str, hi: float = math.inf) -> float:
    """A finite number in (0, hi]: ConfigError naming the field otherwise (not a float() traceback)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 < v <= hi:
        bound = "" if hi == math.inf else f" and <= {hi:g}"
        raise ConfigError(f"{where}: field '{key}' must be a finite number > 0{bound}, got {v!r}")
    return float(v)


def _mapping(v: Any, key: str, where: str) -> dict[str, Any]:
    """An optional JSON object field (absent or null: {})."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: field '{key}' must be an object, got {type(v).__name__}")
    return dict(v)


def _bool(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: field '{key}' must be true or false, got {str(v)[:40]!r}")
    return v


def _token_ids(v: Any, key: str, where: str) -> tuple[int, ...]:
    """A token id (an integer >= 0) or a non-empty list of them."""
    ids = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(ids, list | tuple) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{where}: field '{key}' must be a token id (an integer >= 0) or a non-empty list of them, "
                          f"got {str(v)[:60]}")
    return tuple(ids)


def _size2(v: Any, key: str, where: str) -> int:
    """image_size / patch_size may be an int or a square [n, n] pair."""
    if isinstance(v, list | tuple):
        if len(v) != 2 or v[0] != v[1]:
            raise ConfigError(f"{where}: field '{key}' must be an int or a square pair, got {v!r}")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{where}: field '{key}' must be a positive integer, got {v!r}")
    return v


def patch_dim_of(patch_size: int, temporal_patch_size: int, channels: int = 3) -> int:
    """Length of one pixel row of the vision tower: C * T * p * p, ordered (C, T, py, px) (docs/MODEL.md §2)."""
    return channels * temporal_patch_size * patch_size * patch_size


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336
    out_hidden_size: int = 4096  # = LLM width, and the width of every ViT block's MLP
    intermediate_size: int = 13696  # used by the patch merger's SwiGLU only
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row (`patch_dim_of`)."""
        return patch_dim_of(self.patch_size, self.temporal_patch_size, self.in_channels)

    @property
    def num_positions_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> VisionConfig:
        w = "config.json vision_config"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{w}: expected an object, got {type(d).__name__}")
        rope = _mapping(d.get("rope_parameters"), "rope_parameters", w)
        rope_type = rope.get("rope_type", "axial")
        if rope_type != "axial":
            raise ConfigError(f"{w}: field 'rope_parameters.rope_type' must be 'axial', got {rope_type!r}")
        act = _get(d, "hidden_act", w, "silu")
        if act != "silu":
            raise ConfigError(f"{w}: field 'hidden_act' must be 'silu', got {act!r}")
        cfg = cls(
            depth=_int(d, "depth", w, aliases=("num_hidden_layers",), hi=MAX_LAYERS),
            hidden_size=_int(d, "hidden_size", w),
            num_heads=_int(d, "num_heads", w, aliases=("num_attention_heads",), hi=MAX_HEADS),
            in_channels=_int(d, "in_channels", w, 3),
            patch_size=_size2(_get(d, "patch_size", w, 14), "patch_size", w),
            temporal_patch_size=_size2(_get(d, "temporal_patch_size", w, 2), "temporal_patch_size", w),
            spatial_merge_size=_int(d, "spatial_merge_size", w, 2),
            image_size=_size2(_get(d, "image_size", w, 336), "image_size", w),
            out_hidden_size=_int(d, "out_hidden_size", w),
            intermediate_size=_int(d, "intermediate_size", w),
            rms_norm_eps=_float(d, "rms_norm_eps", w, 1e-5),
            attention_bias=_bool(_get(d, "attention_bias", w, False), "attention_bias", w),
            rope_theta=_number(rope.get("rope_theta", 10000.0), "rope_parameters.rope_theta", w),
            hidden_act=act,
        )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"{w}: hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if cfg.head_dim % 4:
            raise ConfigError(f"{w}: head_dim {cfg.head_dim} must be a multiple of 4 for the 2-D RoPE")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"{w}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        return cfg


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    max_position_embeddings: int = 65536
    pad_token_id: int = 151329
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338, 151348)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], top: Mapping[str, Any] | None = None) -> TextConfig:
        w = "config.json text_config"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{w}: expected an object, got {type(d).__name__}")
        top = top or {}
        # transformers 5: everything in rope_parameters; published: rope_theta/partial_rotary_factor/rope_scaling.
        rope = _mapping(d.get("rope_parameters"), "rope_parameters", w)
        legacy = _mapping(d.get("rope_scaling"), "rope_scaling", w)
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", _MISSING))
        if prf is _MISSING:
            raise ConfigError(
                f"{w}: required field 'partial_rotary_factor' is missing (in rope_parameters or at the text_config "
                "level); GLM-4.1V uses 0.5"
            )
        section = rope.get("mrope_section", legacy.get("mrope_section"))
        if section is None:
            raise ConfigError(f"{w}: required field 'rope_parameters.mrope_section' (or 'rope_scaling.mrope_section') "
                              "is missing")
        if not isinstance(section, list | tuple) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in section):
            raise ConfigError(f"{w}: field 'mrope_section' must be a list of positive integers, got "
                              f"{str(section)[:60]}")
        rope_type = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{w}: field 'rope_type' must be 'default', got {rope_type!r}")
        eos = d.get("eos_token_id", top.get("eos_token_id"))
        if eos is None:
            eos = list(cls.eos_token_ids)
        eos = _token_ids(eos, "eos_token_id", w)
        pad = d.get("pad_token_id", top.get("pad_token_id"))
        if pad is not None:
            pad = _token_ids([pad], "pad_token_id", w)[0]  # one id, not a list
        cfg = cls(
            vocab_size=_int(d, "vocab_size", w),
            hidden_size=_int(d, "hidden_size", w),
            intermediate_size=_int(d, "intermediate_size", w),
            num_hidden_layers=_int(d, "num_hidden_layers", w, hi=MAX_LAYERS),
            num_attention_heads=_int(d, "num_attention_heads", w, hi=MAX_HEADS),
            num_key_value_heads=_int(d, "num_key_value_heads", w, d.get("num_attention_heads"), hi=MAX_HEADS),
            rms_norm_eps=_float(d, "rms_norm_eps", w, 1e-5),
            rope_theta=_number(theta, "rope_theta", w),
            partial_rotary_factor=_number(prf, "partial_rotary_factor", w, hi=1.0),
            mrope_section=tuple(int(s) for s in section),
            max_position_embeddings=_int(d, "max_position_embeddings", w, 65536),
            pad_token_id=int(pad) if pad is not None else eos[0],
            eos_token_ids=eos,
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{w}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                              f"{cfg.num_attention_heads}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{w}: num_attention_heads {cfg.num_attention_heads} is not divisible by "
                              f"num_key_value_heads {cfg.num_key_value_heads}")
        if len(cfg.mrope_section) != 3 or 2 * sum(cfg.mrope_section) != cfg.rotary_dim:
            raise ConfigError(
                f"{w}: field 'mrope_section' {list(cfg.mrope_section)} must have 3 entries summing to rotary_dim/2 = "
                f"{cfg.rotary_dim // 2} (head_dim {cfg.head_dim} x partial_rotary_factor {cfg.partial_rotary_factor})"
            )
        return cfg


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the model's dense layers (glm41v_jax/lora.py): y = W x + B A dropout(x) * alpha / rank.

    `targets`: name patterns over the HF module names (`model.language_model.layers.3.self_attn.q_proj`), as PEFT's
    `target_modules` list: a pattern matches a name that equals it or ends with "." + it; `*` and `?` are wildcards
    (fnmatch). `sites` is what `lora.resolve_lora` found for a model (the Flax module paths with the layer index
    dropped, e.g. "language_model/layers/self_attn/q_proj"): the layers that carry adapters. Left empty here."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    dropout: float = 0.0
    sites: tuple[str, ...] = dataclasses.field(default=(), metadata={"derived": True})  # not a config file key

    def __post_init__(self) -> None:
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
            raise ConfigError(f"lora.rank: must be a positive integer; got {str(r)[:40]!r}")
        object.__setattr__(self, "rank", int(r))
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a <= 0:
            raise ConfigError(f"lora.alpha: must be a finite number > 0; got {str(a)[:40]!r}")
        object.__setattr__(self, "alpha", float(a))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise ConfigError(f"lora.dropout: must be a number in [0, 1); got {str(d)[:40]!r}")
        object.__setattr__(self, "dropout", float(d))
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, Sequence) or not targets or not all(
                isinstance(t, str) and t.strip() and "\x00" not in t for t in targets):
            raise ConfigError(f"lora.targets: must be a non-empty list of module name patterns; got "
                              f"{str(self.targets)[:60]!r}")
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets))
        object.__setattr__(self, "sites", tuple(self.sites))

    @property
    def scale(self) -> float:
        """alpha / rank: what the adapter's product is multiplied by (PEFT's `scaling`, without rsLoRA)."""
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to run the model; not part of the checkpoint. One object for loading (`load(model, runtime)`), the
    Engine and Pipeline (through `cfg.runtime`) and the train step (`step.model_cfg`).

    The CLIs' `--dtype D` means both dtypes (`dtype_flag`); the converter's `--dtype` is the stored dtype.
    """

    compute_dtype: str = "float32"  # activations and matmul inputs: "bfloat16" on TPU/GPU, "float32" on CPU
    param_dtype: str = "float32"  # the weights (load() casts them to it when it is given)
    scan_layers: bool = False  # True: nn.scan over stacked weights (training); False: unrolled (decode)
    remat_policy: str = "none"  # none | full | dots | dots_no_batch (see layers.remat_policy)
    attention_impl: str = "xla"  # xla | pallas | cudnn | auto (see glm41v_jax.attention)
    # How the text decoder's and lm_head's kernels are stored: "in_out" (checkpoints, training) or "out_in" (the
    # Engine's decode layout on CPU; see layers.Dense and model.to_kernel_layout). The vision tower is "in_out".
    kernel_layout: str = "in_out"
    # Weight-only quantization (quant.py): "none" | "int8" (per output channel) | "int4" (groups of
    # `quant_group_size` along the last input axis). The text decoder's projections are always quantized; the parts
    # named in `quant_skip` ("lm_head", "vision": the tower with its merger) stay in float; the embedding never is.
    quantize: str = "none"
    quant_group_size: int = 128
    quant_skip: tuple[str, ...] = ("vision",)
    # LoRA adapters (glm41v_jax/lora.py): None = none. The Dense layers named in `lora.sites` add B A x * alpha / r,
    # with A and B in the "lora" variable collection beside "params" (`lora.resolve_lora` fills the sites).
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        for name in ("compute_dtype", "param_dtype"):
            object.__setattr__(self, name, _float_dtype(getattr(self, name), name))
        if self.quantize not in QUANT_SCHEMES:
            raise ConfigError(f"runtime: quantize must be one of {', '.join(map(repr, QUANT_SCHEMES))}; "
                              f"got {str(self.quantize)[:40]!r}")
        g = self.quant_group_size
        if isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 1:
            raise ConfigError(f"runtime: quant_group_size must be a positive integer; got {str(g)[:40]!r}")
        object.__setattr__(self, "quant_group_size", int(g))
        skip = (self.quant_skip,) if isinstance(self.quant_skip, str) else self.quant_skip
        if not isinstance(skip, Sequence) or any(p not in QUANT_SKIPPABLE for p in skip):
            raise ConfigError(f"runtime: quant_skip must name parts among {', '.join(map(repr, QUANT_SKIPPABLE))}; "
                              f"got {str(self.quant_skip)[:60]!r}")
        object.__setattr__(self, "quant_skip", tuple(sorted(set(skip))))
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"runtime: lora must be a LoraConfig or None; got {type(self.lora).__name__}")
        if self.kernel_layout not in KERNEL_LAYOUTS:
            raise ConfigError(f"runtime: kernel_layout must be 'in_out' or 'out_in'; got {self.kernel_layout!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"runtime: attention_impl must be one of {', '.join(map(repr, ATTENTION_IMPLS))}; "
                              f"got {self.attention_impl!r}")

    def quant_of(self, part: str) -> str:
        """The scheme of `part`'s Dense layers: "text" (the decoder: always `quantize`), "lm_head" or "vision"
        ("none" when `quant_skip` names it)."""
        return "none" if part in self.quant_skip else self.quantize


def _float_dtype(value: Any, name: str) -> str:
    """A dtype given as a name or a NumPy/JAX dtype -> its name; ConfigError unless it is a float dtype."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or value is None or dt.kind != "f" and dt != np.dtype(ml_dtypes.bfloat16):
        raise ConfigError(f"runtime: {name} must be a floating-point dtype such as 'float32' or 'bfloat16'; "
                          f"got {str(value)[:40]!r}")
    return dt.name


def dtype_flag(dtype: str | None) -> dict[str, str]:
    """The CLIs' `--dtype D` as `RuntimeConfig` overrides: the weights and the computation both in D ({} when the
    flag is not given: the caller's default applies)."""
    return {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}


@dataclasses.dataclass(frozen=True)
class Glm4vConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **runtime: Any) -> Glm4vConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt not in ("glm4v",):
            raise ConfigError(f"config.json: field 'model_type' must be 'glm4v', got {mt!r}")
        text_d = d.get("text_config")
        if text_d is None:
            text_d = d  # flattened dump
        if "vision_config" not in d:
            raise ConfigError("config.json: required field 'vision_config' is missing")
        text = TextConfig.from_hf(text_d, top=d)
        vision = VisionConfig.from_hf(d["vision_config"])
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal "
                f"text_config.hidden_size ({text.hidden_size})"
            )
        tie = bool(d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False)))
        w = "config.json"
        return cls(
            text=text,
            vision=vision,
            image_token_id=_int(d, "image_token_id", w, 151343),
            video_token_id=_int(d, "video_token_id", w, 151344),
            image_start_token_id=_int(d, "image_start_token_id", w, 151339),
            image_end_token_id=_int(d, "image_end_token_id", w, 151340),
            video_start_token_id=_int(d, "video_start_token_id", w, 151341),
            video_end_token_id=_int(d, "video_end_token_id", w, 151342),
            tie_word_embeddings=tie,
            runtime=RuntimeConfig(**runtime),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **runtime: Any) -> Glm4vConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
        try:
            return cls.from_hf(d, **runtime)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers-5 spelling of this config (what `save_pretrained` writes)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Glm4vForConditionalGeneration"],
            "model_type": "glm4v",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "video_start_token_id": self.video_start_token_id,
            "video_end_token_id": self.video_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "glm4v_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "pad_token_id": t.pad_token_id,
                "eos_token_id": list(t.eos_token_ids),
                "hidden_act": "silu",
                "attention_bias": True,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "partial_rotary_factor": t.partial_rotary_factor,
                    "mrope_section": list(t.mrope_section),
                },
            },
            "vision_config": {
                "model_type": "glm4v_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "image_size": v.image_size,
                "out_hidden_size": v.out_hidden_size,
                "intermediate_size": v.intermediate_size,
                "rms_norm_eps": v.rms_norm_eps,
                "attention_bias": v.attention_bias,
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    def with_runtime(self, runtime: RuntimeConfig | None = None, **kw: Any) -> Glm4vConfig:
        """This config run as `runtime` (default: its own), with the `RuntimeConfig` fields in `kw` replaced."""
        return dataclasses.replace(self, runtime=dataclasses.replace(runtime or self.runtime, **kw))


# The released GLM-4.1V-9B-Thinking shapes (checked with jax.eval_shape in the tests).
GLM41V_9B = Glm4vConfig()
