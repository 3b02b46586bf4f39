"""Load GLM-4.1V weights from an HF checkpoint directory, a converted (Orbax) directory, or a hub id.

What is special here:
  * HF safetensors are streamed one tensor at a time: headers are checked first (every name, shape and dtype
    against the config, every shard file present and complete), *then* tensors are read. Each tensor is read with
    its own short-lived `safe_open`, so the mmap of a 5 GB shard never stays resident; with a `mesh` each tensor
    goes host -> device into its final `NamedSharding` before the next is read, so host memory stays bounded by
    about one tensor.
  * Pickled weights (`*.bin`, `*.pt`, `*.pth`) are refused, never unpickled.
  * A converted directory (written by `glm41v convert`, see `glm41v_convert.hf_to_orbax`) is restored with Orbax
    directly into target shardings computed from `jax.eval_shape` (`abstract_params` + `param_shardings`); the
    shardings stored in the files are ignored. A converted directory without its completion marker is refused.
  * Paths: every local path is made absolute (`~` expanded, relative to the current directory) by
    `integrity.abs_path` before Orbax sees it (Orbax refuses relative paths, and used to make that look like a
    checkpoint with every array missing).
  * Damage: each load stats the params/ files recorded at conversion (a deleted or truncated file is named before
    any read); a TensorStore read failure becomes one CheckpointError naming the checkpoint and the array;
    `verify=True` / `verify_converted` compare every array with its CRC-32 recorded at conversion.
  * Without a mesh, arrays are placed on `jax.devices()[0]` (single-device jax arrays); `as_numpy=True` returns
    host NumPy arrays instead.
  * A hub id ("zai-org/GLM-4.1V-9B-Thinking") is fetched with `huggingface_hub.snapshot_download` (only *.json,
    *.safetensors, *.jinja and tokenizer files) when huggingface_hub is installed and the hub is reachable; offline
    or without it, one CheckpointError says that no such local directory exists, why the hub was not reached, and
    how to download the directory elsewhere and pass it instead.
  * The returned tree is the canonical *unrolled* layout (`layers_0`, `blocks_3`, ...); with
    `scan_layers=True` in the runtime overrides it is stacked (`weights.stack_layers`) after loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes  # (also registers 'bfloat16' with NumPy: safe_open(framework="np") needs it)
import numpy as np

from .config import ConfigError, Glm4vConfig
from .errors import Glm41vError
from .integrity import (
    CHECKSUM_ALGORITHM,
    abs_path,
    array_crc32,
    damaged_files,
    quiet_storage_threads,
    storage_error,
)
from .weights import Rule, WeightsError, build_rules, check_complete, is_ignored_key, set_path

# Converted-directory format (written by glm41v_convert.hf_to_orbax).
FORMAT_FILE = "glm41v_jax.json"
FORMAT_NAME = "glm41v-jax-orbax"
FORMAT_VERSION = 1
COMPLETE_MARKER = "CONVERSION_COMPLETE"
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
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(Glm41vError, ValueError):
    """A checkpoint file or directory is missing, corrupt, pickled, or otherwise unusable. The message names it."""


# ---------------------------------------------------------------------------------------------------------------
# Resolving a model spec to a directory.


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True if `path` looks like a `glm41v convert` output (complete or not)."""
    return os.path.isfile(os.path.join(abs_path(path), FORMAT_FILE))


def resolve_model_dir(model: str | os.PathLike) -> str:
    """The local directory of a model spec, as an absolute path: an existing directory (relative paths are taken
    from the current directory, `~` is expanded), or a hub id 'owner/name' (downloaded with huggingface_hub).

    The processor files (tokenizer.json, chat_template.jinja, preprocessor_config.json, ...) live in this directory
    for HF checkpoints and converted directories alike.
    """
    spec = os.fspath(model)
    if not spec.strip():
        raise CheckpointError("the model path is empty")
    path = abs_path(spec)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        if spec.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{spec}: refusing to unpickle a pickled checkpoint; convert it to safetensors "
                                  "first (e.g. transformers save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(f"{spec}: expected a checkpoint directory (with config.json), got a file")
    where = spec if os.path.isabs(spec) else f"{spec} (looked for {path})"
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")) or os.path.lexists(path):
        dangling = " (a broken symbolic link)" if os.path.lexists(path) else ""
        raise CheckpointError(f"{where}: no such directory{dangling}, and not a hub id of the form 'owner/name'")
    return _download(spec, where)


def _download(repo_id: str, where: str | None = None) -> str:
    """snapshot_download of the files we need (weights as safetensors, configs, tokenizer, templates).

    `repo_id` is also a relative path that does not exist here; every failure says both."""
    local = f"{where or repo_id}: no such local directory; as a hub id"
    how = (f"if it is a local path, check it; if it is a hub id, download it where the hub is reachable "
           f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{local} it was not fetched because huggingface_hub is not installed "
                              f"(`pip install 'glm41v-jax[hub]'`); {how}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return abs_path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001  (network, auth, not found, offline cache miss: all one message)
        why = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline
               else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise CheckpointError(f"{local} the hugging face hub was tried and failed ({why}); {how}") from None


def load_config(model: str | os.PathLike, **runtime: Any) -> Glm4vConfig:
    """The `Glm4vConfig` of a model spec (HF directory, converted directory or hub id)."""
    return Glm4vConfig.from_file(os.path.join(resolve_model_dir(model), "config.json"), **runtime)


# ---------------------------------------------------------------------------------------------------------------
# Streaming HF safetensors.


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
        from safetensors import safe_open

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
    """np.ascontiguousarray, tiled over the first and last axes: a transposed 1.2 GB matrix copies ~3x faster
    because each 256 x 256 tile stays in cache."""
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
    bf16: bit-exact, and NumPy's native integer loops are ~10x faster than ml_dtypes' generic ones) through a tiled
    copy, and the dtype cast (elementwise, so order does not matter) comes last."""
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


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def _target_shardings(cfg: Glm4vConfig, mesh: Any) -> Any:
    from .model import abstract_params
    from .sharding import param_shardings

    return param_shardings(abstract_params(cfg.with_runtime(scan_layers=False)), mesh)


def _abstract_unboxed(cfg: Glm4vConfig) -> Any:
    from .model import abstract_params
    from .sharding import unbox

    return unbox(abstract_params(cfg.with_runtime(scan_layers=False)))


def _paths_and_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _load_hf(directory: str, cfg: Glm4vConfig, dtype: Any, mesh: Any, as_numpy: bool) -> dict:
    ckpt = HFCheckpoint(directory, cfg)
    shardings = _paths_and_leaves(_target_shardings(cfg, mesh)) if mesh is not None else None
    device = None if (mesh is not None or as_numpy) else jax.devices()[0]
    tree: dict = {}
    for _name, rule, arr in ckpt.iter_flax(dtype):
        if as_numpy:
            value = arr
        else:
            value = jax.device_put(arr, shardings[rule.path] if shardings is not None else device)
            value.block_until_ready()  # the host copy can go before the next tensor is read
        set_path(tree, rule.path, value)
    return tree


@dataclasses.dataclass
class _NumpyAbstract:
    """Orbax v1 abstract leaf restored as np.ndarray (shape + dtype, no sharding)."""

    shape: tuple[int, ...]
    dtype: np.dtype


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
    return fmt


def check_files(directory: str, fmt: dict[str, Any]) -> None:
    """Every file recorded under params/ exists with its recorded size (one stat each). Raises CheckpointError."""
    bad = [f"{rel} ({why})" for rel, why in damaged_files(directory, fmt.get("files") or {}).items()]
    if bad:
        raise CheckpointError(f"{directory}: damaged converted checkpoint: {len(bad)} data file(s) missing or "
                              f"changed: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; convert again")


def _stored_metadata(params_dir: str) -> dict:
    """Orbax's metadata tree of params/ (names, shapes, dtypes), or a CheckpointError naming the directory."""
    import orbax.checkpoint.experimental.v1 as ocp

    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing or not a directory; the converted checkpoint is damaged, "
                              "convert again")
    why = "no array metadata"
    try:
        with quiet_storage_threads():
            stored = ocp.metadata(params_dir).metadata
    except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged tree; all mean "unreadable")
        err = storage_error(e)
        why = err[1] if err is not None else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        stored = None
    if not isinstance(stored, dict) or not stored:
        raise CheckpointError(f"{params_dir}: unreadable Orbax checkpoint ({why}); the converted checkpoint is "
                              "damaged, convert again")
    return stored


def _read_failure(directory: str, e: BaseException, what: str) -> CheckpointError | None:
    """A CheckpointError for a storage failure while reading `directory`, or None when `e` is not one (a bug)."""
    err = storage_error(e)
    if err is None:
        return None
    array, why = err
    name = f"array '{array}'" if array else what
    return CheckpointError(f"{directory}: damaged converted checkpoint: {name} could not be read ({why}); "
                           f"`glm41v verify {directory}` lists every damaged array; convert again")


def _load_converted(directory: str, cfg: Glm4vConfig, dtype: Any, mesh: Any, as_numpy: bool) -> dict:
    import orbax.checkpoint.experimental.v1 as ocp

    directory = abs_path(directory)  # orbax and tensorstore take absolute paths only
    fmt = read_format(directory)
    params_dir = os.path.join(directory, PARAMS_SUBDIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing or not a directory; the converted checkpoint is damaged, "
                              "convert again")
    check_files(directory, fmt)
    stored = _stored_metadata(params_dir)
    expected = _paths_and_leaves(_abstract_unboxed(cfg))
    on_disk = _paths_and_leaves(stored)
    missing = sorted("/".join(p) for p in set(expected) - set(on_disk))
    unexpected = sorted("/".join(p) for p in set(on_disk) - set(expected))
    if missing or unexpected:
        parts = [f"missing {len(missing)} array(s): {', '.join(missing[:8])}"] if missing else []
        parts += [f"unexpected {len(unexpected)} array(s): {', '.join(unexpected[:8])}"] if unexpected else []
        raise WeightsError(f"{params_dir}: " + "; ".join(parts) + " (compared with config.json)")
    for p, a in expected.items():
        if tuple(on_disk[p].shape) != tuple(a.shape):
            raise WeightsError(f"{params_dir}: array '{'/'.join(p)}' has shape {tuple(on_disk[p].shape)}, expected "
                               f"{tuple(a.shape)} from config.json")
    shardings = _paths_and_leaves(_target_shardings(cfg, mesh)) if mesh is not None else None
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(p: tuple[str, ...]) -> Any:
        dt = np.dtype(dtype) if dtype is not None else np.dtype(on_disk[p].dtype)
        shape = tuple(expected[p].shape)
        if as_numpy:
            return _NumpyAbstract(shape, dt)
        return jax.ShapeDtypeStruct(shape, dt, sharding=shardings[p] if shardings is not None else single)

    abstract: dict = {}
    for p in expected:
        set_path(abstract, p, target(p))
    try:
        with quiet_storage_threads():
            return ocp.load(params_dir, abstract)
    except Exception as e:
        err = _read_failure(directory, e, "the params")
        if err is None:
            raise
        raise err from None


# ---------------------------------------------------------------------------------------------------------------
# Verifying a converted directory against its recorded checksums.


@dataclasses.dataclass
class VerifyReport:
    """What `verify_converted` found. `damaged` maps an array name, a params/ file or a side file to the reason."""

    directory: str
    arrays: int = 0
    bytes: int = 0
    has_checksums: bool = True
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.has_checksums and not self.damaged

    def summary(self) -> str:
        """'N damaged: name (what), ...' with the first few names and the kind of damage only."""
        names = list(self.damaged)
        return f"{len(names)} damaged: " + ", ".join(f"{n} ({self.damaged[n].split(':')[0]})" for n in names[:4]) + (
            " ..." if len(names) > 4 else "")


def _read_group(params_dir: str, group: list[tuple[tuple[str, ...], Any]]) -> dict[tuple[str, ...], np.ndarray]:
    import orbax.checkpoint.experimental.v1 as ocp

    abstract: dict = {}
    for p, meta in group:
        set_path(abstract, p, _NumpyAbstract(tuple(meta.shape), np.dtype(meta.dtype)))
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx, quiet_storage_threads():
        return _paths_and_leaves(ocp.load(params_dir, abstract))


def verify_converted(directory: str | os.PathLike, *, group_bytes: int = 256 << 20) -> VerifyReport:
    """Read every array of a converted directory back (in its stored dtype, about `group_bytes` at a time) and compare
    its CRC-32 with the one recorded at conversion; check the params/ file sizes and the side files' CRC-32 too.

    Raises CheckpointError when `directory` is not a readable converted directory. A directory converted before
    checksums were recorded gives `has_checksums=False`; its arrays are still read, so unreadable ones are reported.
    """
    t0 = time.perf_counter()
    directory = abs_path(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: " + ("not a directory" if os.path.exists(directory) else
                                                  "no such directory"))
    if not is_converted_dir(directory):
        raise CheckpointError(f"{directory}: not a converted directory (no {FORMAT_FILE}); `glm41v verify` checks the "
                              "output of `glm41v convert`")
    fmt = read_format(directory)
    sums = (fmt.get("checksums") or {}).get("arrays")
    report = VerifyReport(directory, has_checksums=sums is not None)
    report.damaged.update(damaged_files(directory, fmt.get("files") or {}))
    for name, want in (fmt.get("side_files") or {}).items():
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                got = f"{zlib.crc32(f.read()):08x}"
        except OSError as e:
            report.damaged[name] = f"unreadable: {e.strerror or e}"
            continue
        if got != want:
            report.damaged[name] = f"checksum mismatch: crc32 {got}, {want} recorded"
    params_dir = os.path.join(directory, PARAMS_SUBDIR)
    try:
        stored = _paths_and_leaves(_stored_metadata(params_dir))
    except CheckpointError as e:
        report.damaged[PARAMS_SUBDIR] = str(e).split(": ", 1)[1]
        report.seconds = time.perf_counter() - t0
        return report
    names = {"/".join(p): p for p in stored}
    for name in sorted(set(sums or {}) - set(names)):
        report.damaged[name] = "recorded at conversion, missing from params/"
    for name in sorted(set(names) - set(sums or names)):
        report.damaged[name] = "in params/ but no checksum was recorded for it"

    def check(path: tuple[str, ...], arr: np.ndarray) -> None:
        name = "/".join(path)
        report.arrays += 1
        report.bytes += arr.nbytes
        if tuple(arr.shape) != tuple(stored[path].shape):
            report.damaged[name] = f"read back as shape {tuple(arr.shape)}, metadata says {tuple(stored[path].shape)}"
        elif sums is not None and name in sums and array_crc32(arr) != sums[name]:
            report.damaged[name] = f"checksum mismatch: crc32 {array_crc32(arr)}, {sums[name]} recorded"

    def nbytes(meta: Any) -> int:
        return int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize

    groups: list[list[tuple[tuple[str, ...], Any]]] = [[]]
    size = 0
    for p, meta in stored.items():
        if groups[-1] and size + nbytes(meta) > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append((p, meta))
        size += nbytes(meta)
    for group in groups:
        try:
            got = _read_group(params_dir, group)
        except Exception as e:
            if storage_error(e) is None:
                raise
            got = None
        if got is not None:
            for p, _ in group:
                check(p, got[p])
            del got
            continue
        for p, meta in group:  # find which arrays of the group are unreadable
            try:
                check(p, _read_group(params_dir, [(p, meta)])[p])
            except Exception as e:
                err = storage_error(e)
                if err is None:
                    raise
                report.damaged["/".join(p)] = f"unreadable: {err[1]}"
    report.seconds = time.perf_counter() - t0
    return report


def load(
    model: str | os.PathLike,
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    mesh: Any = None,
    as_numpy: bool = False,
    verify: bool = False,
    **runtime: Any,
) -> tuple[Any, Glm4vConfig]:
    """Load (params, cfg) from an HF checkpoint dir, a converted dir, or a hub id.

    dtype: cast every weight to this dtype (None keeps the stored dtype; bf16 stays bit-exact). When given and
      `param_dtype` is not among the runtime overrides, the returned cfg's `param_dtype` is set to it.
    mesh: place each array directly into its `NamedSharding` from `sharding.LOGICAL_RULES`.
    as_numpy: return host NumPy arrays (ignored with a mesh). Otherwise single-device jax arrays on device 0.
    compute_dtype: the activation / matmul dtype (RuntimeConfig.dtype): "bfloat16" on TPU/GPU, "float32" on CPU.
    runtime: other `RuntimeConfig` overrides (param_dtype, scan_layers, remat_policy, attention_impl).
    verify: first read every array of a converted directory back and compare it with the checksums recorded at
      conversion (`verify_converted`: one extra read of the weights); CheckpointError naming the damaged arrays, or
      saying that the directory has no checksums to compare with. HF directories carry no checksums: refused.
    Every load of a converted directory checks that its data files are all there with their recorded sizes.
    """
    if compute_dtype is not None:
        runtime["dtype"] = np.dtype(compute_dtype).name
    if dtype is not None:
        dtype = np.dtype(dtype)
        runtime.setdefault("param_dtype", dtype.name)
    if mesh is not None:
        as_numpy = False
    directory = resolve_model_dir(model)
    cfg = Glm4vConfig.from_file(os.path.join(directory, "config.json"), **runtime)
    if verify:
        _verify_before_load(directory)
    if is_converted_dir(directory):
        params = _load_converted(directory, cfg, dtype, mesh, as_numpy)
    else:
        params = _load_hf(directory, cfg, dtype, mesh, as_numpy)
    if cfg.runtime.scan_layers:
        params = _stack(params, cfg, mesh)
    return params, cfg


def _verify_before_load(directory: str) -> None:
    if not is_converted_dir(directory):
        raise CheckpointError(f"{directory}: cannot verify an HF checkpoint directory (safetensors files carry no "
                              "checksums); convert it with `glm41v convert`, or load it without verifying")
    report = verify_converted(directory)
    if report.damaged:
        raise CheckpointError(f"{directory}: verification failed, {report.summary()}; convert again")
    if not report.has_checksums:
        raise CheckpointError(f"{directory}: cannot verify: no checksums were recorded when it was written (converted "
                              "by an older version, or the final weights of a multi-host training run); every array "
                              "read back, but bit flips cannot be detected; convert again to record them, or load it "
                              "without verifying")


def _stack(params: dict, cfg: Glm4vConfig, mesh: Any) -> dict:
    """Unrolled -> scanned layout (transiently holds both copies of the layer weights)."""
    from .weights import stack_layers

    stacked = stack_layers(params)
    if mesh is not None:
        from .model import abstract_params
        from .sharding import param_shardings

        stacked = jax.device_put(stacked, param_shardings(abstract_params(cfg), mesh))
    return stacked


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "ConfigError",
    "HFCheckpoint",
    "SIDE_FILES",
    "TensorInfo",
    "VerifyReport",
    "WeightsError",
    "is_converted_dir",
    "load",
    "load_config",
    "check_files",
    "read_format",
    "read_safetensors_header",
    "refuse_pickles",
    "resolve_model_dir",
    "verify_converted",
]
