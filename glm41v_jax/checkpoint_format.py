"""What a checkpoint directory is: the names of its files, the converted format's record, and the one error that
every reader of a checkpoint raises.

Two kinds of directory hold weights:
  * an HF checkpoint: `config.json` with `model.safetensors`, or shards listed in `model.safetensors.index.json`
    (read by `hf_checkpoint`);
  * a converted directory, written by `glm41v convert` (and the trainer's final weights): `params/` (Orbax),
    `FORMAT_FILE` (format name and version, the params/ file sizes, CRC-32 of every array and side file) and the
    `COMPLETE_MARKER` file, written last (read by `converted`). A quantized conversion records its scheme in the
    format file's `QUANT_FIELD` ({"scheme", "group_size", "skip"}); a format file without it (every directory
    written before quantization existed, and every float conversion) holds float weights: `stored_quantization`
    reads both as the runtime fields to load them with.
Both hold the `SIDE_FILES` (config, tokenizer, chat template, processor configs) beside the weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .config import QUANT_SCHEMES, QUANT_SKIPPABLE
from .errors import Glm41vError
from .integrity import CHECKSUM_ALGORITHM, abs_path, damaged_files

# Converted-directory format (written by glm41v_convert.hf_to_orbax).
FORMAT_FILE = "glm41v_jax.json"
FORMAT_NAME = "glm41v-jax-orbax"
FORMAT_VERSION = 1
COMPLETE_MARKER = "CONVERSION_COMPLETE"
QUANT_FIELD = "quantization"  # {"scheme": "int8"|"int4", "group_size": int, "skip": [part, ...]}; absent: float
PARAMS_SUBDIR = "params"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files the processor / generation need, copied alongside converted weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


class CheckpointError(Glm41vError, ValueError):
    """A checkpoint file or directory is missing, corrupt, pickled, or otherwise unusable. The message names it."""


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True if `path` looks like a `glm41v convert` output (complete or not)."""
    return os.path.isfile(os.path.join(abs_path(path), FORMAT_FILE))



def _bad_format(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the converted directory is damaged, convert again")


def read_format(directory: str) -> dict[str, Any]:
    """The format file of a converted directory, checked: a JSON object of this format and version, with the
    completion marker beside it, and well-formed optional `files` / `checksums` / `side_files` records."""
    directory = abs_path(directory)
    path = os.path.join(directory, FORMAT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            fmt = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad_format(path, f"not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(fmt, dict):
        raise _bad_format(path, f"expected a JSON object, got {type(fmt).__name__}")
    if fmt.get("format") != FORMAT_NAME or fmt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported converted format {fmt.get('format')!r} version "
                              f"{fmt.get('format_version')!r} (this version reads {FORMAT_NAME} v{FORMAT_VERSION})")
    if not os.path.isfile(os.path.join(directory, COMPLETE_MARKER)):
        raise CheckpointError(f"{directory}: conversion is incomplete (no {COMPLETE_MARKER} marker); delete it and "
                              "convert again")
    for key, kind, ok in (("files", "sizes", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                          ("side_files", "CRC-32 hex strings", lambda v: isinstance(v, str))):
        rec = fmt.get(key)
        if rec is not None and not (isinstance(rec, dict) and all(isinstance(k, str) and ok(v)
                                                                  for k, v in rec.items())):
            raise _bad_format(path, f"field '{key}' must map file names to {kind}")
    sums = fmt.get("checksums")
    if sums is not None:
        if not (isinstance(sums, dict) and isinstance(sums.get("arrays"), dict)
                and all(isinstance(v, str) for v in sums["arrays"].values())):
            raise _bad_format(path, "field 'checksums' must be an object with an 'arrays' object of hex strings")
        if sums.get("algorithm") != CHECKSUM_ALGORITHM:
            raise CheckpointError(f"{path}: checksums use {sums.get('algorithm')!r}; this version knows "
                                  f"{CHECKSUM_ALGORITHM!r}")
    stored_quantization(fmt, path)
    return fmt


def quant_record(scheme: str, group_size: int, skip: tuple[str, ...]) -> dict[str, Any]:
    """The format file's `QUANT_FIELD` for weights quantized with `RuntimeConfig(quantize=scheme,
    quant_group_size=group_size, quant_skip=skip)`."""
    return {"scheme": scheme, "group_size": int(group_size), "skip": sorted(skip)}


def stored_quantization(fmt: dict[str, Any], path: str = FORMAT_FILE) -> dict[str, Any]:
    """The `RuntimeConfig` fields (quantize, quant_group_size, quant_skip) of the weights a format record describes:
    {} for float weights (no `QUANT_FIELD`: older and float conversions); CheckpointError naming the field when the
    record is malformed."""
    rec = fmt.get(QUANT_FIELD)
    if rec is None:
        return {}
    schemes = [s for s in QUANT_SCHEMES if s != "none"]
    if not isinstance(rec, dict) or rec.get("scheme") not in schemes:
        raise _bad_format(path, f"field '{QUANT_FIELD}' must be an object whose 'scheme' is one of "
                                f"{', '.join(map(repr, schemes))}")
    g = rec.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise _bad_format(path, f"field '{QUANT_FIELD}.group_size' must be a positive integer, got {g!r}")
    skip = rec.get("skip", [])
    if not isinstance(skip, list) or not all(s in QUANT_SKIPPABLE for s in skip):
        raise _bad_format(path, f"field '{QUANT_FIELD}.skip' must list parts among "
                                f"{', '.join(map(repr, QUANT_SKIPPABLE))}, got {str(skip)[:60]}")
    return {"quantize": rec["scheme"], "quant_group_size": g, "quant_skip": tuple(skip)}


def check_files(directory: str, fmt: dict[str, Any]) -> None:
    """Every file recorded under params/ exists with its recorded size (one stat each). Raises CheckpointError."""
    bad = [f"{rel} ({why})" for rel, why in damaged_files(directory, fmt.get("files") or {}).items()]
    if bad:
        raise CheckpointError(f"{directory}: damaged converted checkpoint: {len(bad)} data file(s) missing or "
                              f"changed: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; convert again")

