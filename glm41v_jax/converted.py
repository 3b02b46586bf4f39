"""Reading a converted directory (the output of `glm41v convert`): its Orbax params restored into the target
shapes, dtypes and shardings the caller gives, and `verify_converted`, which reads every array back against the
CRC-32 recorded at conversion.

The shardings stored in the files are ignored: the caller's targets come from `jax.eval_shape` (see loading.py).
Every restore first stats the params/ files recorded at conversion (a deleted or truncated file is named before any
read); a TensorStore read failure becomes one CheckpointError naming the checkpoint and the array.
Orbax (`orbax.checkpoint.experimental.v1`) is imported inside the functions that read: its import is slow
(BENCHMARKS.md, "Measurements behind design choices"), and most runs (an HF directory, the tiny demo, every CLI's
start-up) never read a converted directory.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from typing import Any

import jax
import numpy as np

from .checkpoint_format import FORMAT_FILE, PARAMS_SUBDIR, CheckpointError, check_files, is_converted_dir, read_format
from .integrity import abs_path, array_crc32, damaged_files, quiet_storage_threads, storage_error
from .weights import WeightsError, set_path

Path = tuple[str, ...]


def paths_and_leaves(tree: Any) -> dict[Path, Any]:
    """A nested tree as {path of key names: leaf}."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


@dataclasses.dataclass
class NumpyAbstract:
    """Orbax v1 abstract leaf restored as np.ndarray (shape + dtype, no sharding)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def stored_metadata(params_dir: str) -> dict:
    """Orbax's metadata tree of params/ (names, shapes, dtypes), or a CheckpointError naming the directory."""
    import orbax.checkpoint.experimental.v1 as ocp  # (slow import: see the module docstring)

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



def open_converted(directory: str) -> tuple[str, dict[Path, Any]]:
    """(params_dir, {path: stored array metadata}) of a complete, undamaged-looking converted directory (its format
    file checked, every recorded params/ file present with its size); CheckpointError otherwise."""
    fmt = read_format(directory)
    params_dir = os.path.join(directory, PARAMS_SUBDIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing or not a directory; the converted checkpoint is damaged, "
                              "convert again")
    check_files(directory, fmt)
    return params_dir, paths_and_leaves(stored_metadata(params_dir))


def check_arrays(params_dir: str, on_disk: dict[Path, Any], expected: dict[Path, Any]) -> None:
    """The stored arrays are exactly the `expected` ones (names and shapes); WeightsError naming the difference."""
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


def restore(directory: str, targets: dict[Path, Any], *, partial: bool = False) -> dict:
    """Orbax-restore params/ into `targets` ({path: jax.ShapeDtypeStruct with its sharding, or NumpyAbstract});
    a storage failure is one CheckpointError naming the array. `partial`: `targets` may name only some of the
    stored arrays (the others are not read)."""
    import orbax.checkpoint.experimental.v1 as ocp  # (slow import: see the module docstring)

    abstract: dict = {}
    for p, target in targets.items():
        set_path(abstract, p, target)
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = partial
    try:
        with ctx, quiet_storage_threads():
            return ocp.load(os.path.join(directory, PARAMS_SUBDIR), abstract)
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


def _read_group(params_dir: str, group: list[tuple[Path, Any]]) -> dict[Path, np.ndarray]:
    import orbax.checkpoint.experimental.v1 as ocp  # (slow import: see the module docstring)

    abstract: dict = {}
    for p, meta in group:
        set_path(abstract, p, NumpyAbstract(tuple(meta.shape), np.dtype(meta.dtype)))
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx, quiet_storage_threads():
        return paths_and_leaves(ocp.load(params_dir, abstract))



def _check_side_files(directory: str, recorded: dict[str, str], report: VerifyReport) -> None:
    """Each side file recorded at conversion is readable and has its recorded CRC-32."""
    for name, want in recorded.items():
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                got = f"{zlib.crc32(f.read()):08x}"
        except OSError as e:
            report.damaged[name] = f"unreadable: {e.strerror or e}"
            continue
        if got != want:
            report.damaged[name] = f"checksum mismatch: crc32 {got}, {want} recorded"


def _groups(stored: dict[Path, Any], group_bytes: int) -> list[list[tuple[Path, Any]]]:
    """The stored arrays in read order, cut into groups of about `group_bytes` (an array larger alone)."""

    def nbytes(meta: Any) -> int:
        return int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize

    groups: list[list[tuple[Path, Any]]] = [[]]
    size = 0
    for p, meta in stored.items():
        if groups[-1] and size + nbytes(meta) > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append((p, meta))
        size += nbytes(meta)
    return groups


def _check_arrays(params_dir: str, stored: dict[Path, Any], sums: dict[str, str] | None, group_bytes: int,
                  report: VerifyReport) -> None:
    """Read every stored array back, a group at a time, and compare its shape and CRC-32; when a group cannot be
    read, its arrays are read one by one to name the unreadable ones."""

    def check(path: Path, arr: np.ndarray) -> None:
        name = "/".join(path)
        report.arrays += 1
        report.bytes += arr.nbytes
        if tuple(arr.shape) != tuple(stored[path].shape):
            report.damaged[name] = f"read back as shape {tuple(arr.shape)}, metadata says {tuple(stored[path].shape)}"
        elif sums is not None and name in sums and array_crc32(arr) != sums[name]:
            report.damaged[name] = f"checksum mismatch: crc32 {array_crc32(arr)}, {sums[name]} recorded"

    for group in _groups(stored, group_bytes):
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
    _check_side_files(directory, fmt.get("side_files") or {}, report)
    params_dir = os.path.join(directory, PARAMS_SUBDIR)
    try:
        stored = paths_and_leaves(stored_metadata(params_dir))
    except CheckpointError as e:
        report.damaged[PARAMS_SUBDIR] = str(e).split(": ", 1)[1]
        report.seconds = time.perf_counter() - t0
        return report
    names = {"/".join(p): p for p in stored}
    for name in sorted(set(sums or {}) - set(names)):
        report.damaged[name] = "recorded at conversion, missing from params/"
    for name in sorted(set(names) - set(sums or names)):
        report.damaged[name] = "in params/ but no checksum was recorded for it"
    _check_arrays(params_dir, stored, sums, group_bytes, report)
    report.seconds = time.perf_counter() - t0
    return report
