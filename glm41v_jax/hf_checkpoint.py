"""Reading an HF checkpoint directory (safetensors, one file or shards with an index), one tensor at a time.

Headers are checked first (every name, shape and dtype against the config, every shard file present and
complete), *then* tensors are read. Each tensor is read with its own short-lived `safe_open`, so the mmap of a
5 GB shard never stays resident, and host memory stays bounded by about one tensor. Pickled weights (`*.bin`,
`*.pt`, `*.pth`) are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import ml_dtypes  # (also registers 'bfloat16' with NumPy: safe_open(framework="np") needs it)
import numpy as np
from safetensors import safe_open

from .checkpoint_format import (
    FORMAT_FILE,
    PARAMS_SUBDIR,
    PICKLE_SUFFIXES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    CheckpointError,
)
from .config import Glm4vConfig
from .weights import Rule, WeightsError, build_rules, check_complete, is_ignored_key

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # absolute path of the shard
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header without reading tensor data; truncation is detected here."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n} but file "
                                      f"has {size} bytes)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file not found") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not an object)")
    data = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in meta["data_offsets"])
            st_dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if end > data:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file: tensor '{name}' ends at byte "
                                  f"{8 + n + end} but the file has {size} bytes")
        out[name] = TensorInfo(name, path, _ST_DTYPES.get(st_dtype, st_dtype), shape, end - start)
    return out


def refuse_pickles(directory: str) -> None:
    """Raise if the directory holds only pickled weights (we never unpickle)."""
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))
    if pickles:
        raise CheckpointError(f"{os.path.join(directory, pickles[0])}: refusing to unpickle pickled weights "
                              f"({len(pickles)} file(s)); convert to safetensors first (e.g. transformers "
                              "save_pretrained(..., safe_serialization=True))")


class HFCheckpoint:
    """The tensors of an HF checkpoint directory (single file or sharded with an index), validated up front."""

    def __init__(self, directory: str | os.PathLike, cfg: Glm4vConfig | None = None) -> None:
        self.directory = d = os.fspath(directory)
        self.cfg = cfg or Glm4vConfig.from_file(os.path.join(d, "config.json"))
        index = os.path.join(d, SAFETENSORS_INDEX)
        single = os.path.join(d, SAFETENSORS_FILE)
        infos: dict[str, TensorInfo] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            headers: dict[str, dict[str, TensorInfo]] = {}
            for fname in sorted(set(weight_map.values())):
                path = os.path.join(d, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard file named in {SAFETENSORS_INDEX} is missing")
                headers[fname] = read_safetensors_header(path)
            for name, fname in weight_map.items():
                info = headers[fname].get(name)
                if info is None:
                    raise CheckpointError(f"{os.path.join(d, fname)}: does not contain tensor '{name}' that "
                                          f"{SAFETENSORS_INDEX} places there")
                infos[name] = info
        elif os.path.isfile(single):
            infos = read_safetensors_header(single)
        else:
            refuse_pickles(d)
            if any(f == PARAMS_SUBDIR or f.startswith(PARAMS_SUBDIR + ".") for f in os.listdir(d)):
                raise CheckpointError(f"{d}: an unfinished conversion (params/ but no {FORMAT_FILE}: the converter "
                                      "was stopped before the end); delete it and convert again")
            raise CheckpointError(f"{d}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} found")
        self.infos = infos
        self.rules = build_rules(self.cfg)
        self._validate()

    def _validate(self) -> None:
        unexpected = [n for n in self.infos if n not in self.rules and not is_ignored_key(n, self.cfg)]
        check_complete(self.rules, {n for n in self.infos if n in self.rules}, unexpected, self.directory)
        for name, rule in self.rules.items():
            info = self.infos[name]
            if info.shape != rule.hf_shape:
                raise WeightsError(f"{info.file}: tensor '{name}' has shape {info.shape}, expected {rule.hf_shape} "
                                   "from config.json")
            if info.dtype not in ("bfloat16", "float16", "float32", "float64"):
                raise WeightsError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected a floating-point "
                                   "dtype (BF16/F16/F32)")

    @property
    def total_bytes(self) -> int:
        return sum(self.infos[n].nbytes for n in self.rules)

    def read(self, name: str) -> np.ndarray:
        """One tensor as NumPy in its stored dtype (bf16 via ml_dtypes, bit-exact). Opens and closes the file."""
        info = self.infos[name]
        try:
            with safe_open(info.file, framework="np") as f:
                arr = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError)
            raise CheckpointError(f"{info.file}: could not read tensor '{name}' ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())})") from None
        if tuple(arr.shape) != info.shape or str(arr.dtype) != info.dtype:
            raise CheckpointError(f"{info.file}: tensor '{name}' read back as {arr.dtype}{tuple(arr.shape)}, header "
                                  f"says {info.dtype}{info.shape}")
        return arr

    def iter_flax(self, dtype: Any = None) -> Iterator[tuple[str, Rule, np.ndarray]]:
        """(HF name, rule, Flax-layout array) in rule order (one layer after another), one tensor in memory."""
        for name, rule in self.rules.items():
            yield name, rule, to_flax_layout(name, self.read(name), rule, dtype, self.infos[name].file)


_BF16 = np.dtype(ml_dtypes.bfloat16)
_RAW = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_TILE = 256


def contiguous(view: np.ndarray) -> np.ndarray:
    """np.ascontiguousarray, tiled over the first and last axes, so that each 256 x 256 tile of a transposed
    matrix stays in cache while it is copied (a plain copy of a large transposed view misses the cache)."""
    if view.flags.c_contiguous or view.ndim < 2 or view.size < (1 << 20):
        return np.ascontiguousarray(view)
    out = np.empty(view.shape, view.dtype)
    n0, nl = view.shape[0], view.shape[-1]
    for i in range(0, n0, _TILE):
        for j in range(0, nl, _TILE):
            out[i:i + _TILE, ..., j:j + _TILE] = view[i:i + _TILE, ..., j:j + _TILE]
    return out


def to_flax_layout(name: str, arr: np.ndarray, rule: Rule, dtype: Any, source: str) -> np.ndarray:
    """`weights.convert_tensor` (same checks, same result), but the layout transform moves raw bits (uint16 for
    bf16: bit-exact, through NumPy's own integer copy loops rather than a custom dtype's) through a tiled copy,
    and the dtype cast (elementwise, so order does not matter) comes last."""
    if tuple(arr.shape) != rule.hf_shape:
        raise WeightsError(f"{source}: tensor '{name}' has shape {tuple(arr.shape)}, expected {rule.hf_shape} "
                           "from config.json")
    if arr.dtype.kind != "f" and arr.dtype != _BF16:
        raise WeightsError(f"{source}: tensor '{name}' has dtype {arr.dtype}, expected a floating-point dtype")
    out = contiguous(rule.to_flax(arr.view(_RAW[arr.dtype.itemsize]))).view(arr.dtype)
    if dtype is not None and np.dtype(dtype) != out.dtype:
        out = out.astype(dtype)
    if out.shape != rule.flax_shape:
        raise WeightsError(f"{source}: tensor '{name}' maps to shape {out.shape}, expected {rule.flax_shape}")
    return out

