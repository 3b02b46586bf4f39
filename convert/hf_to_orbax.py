"""HF safetensors checkpoint -> Orbax checkpoint of the unrolled Flax tree, streamed with bounded host memory.

What is special here:
  * Streaming: tensors are read one at a time (`glm41v_jax.loading.HFCheckpoint`, its own short-lived `safe_open`
    per tensor), mapped through the strict `weights.build_rules` table, and buffered only until about
    `flush_bytes` (default 512 MiB) are pending. Each buffer is written as one Orbax *partial save*
    (`orbax.checkpoint.experimental.v1.partial.save_async`: each call adds new leaves to a pending checkpoint)
    and then dropped, with one write in flight while the next group is read; `partial.finalize` merges the pieces
    into ONE ordinary Orbax checkpoint. The whole tree is never in host memory: peak is a small multiple of
    `flush_bytes` plus the largest tensor (the 1.2 GB bf16 embedding of the 9B model), whatever the layer count.
  * dtype: bf16 sources stay bit-exact unless `dtype` differs; fp32 -> bf16 uses ml_dtypes' cast, which rounds to
    nearest-even exactly like torch's `.to(torch.bfloat16)` (tested bit for bit).
  * Atomic: everything is written into `DST.tmp-<pid>`; the completion marker is written last and the directory is
    then renamed to DST. On any error or KeyboardInterrupt the temporary directory is removed, so DST either does
    not exist or is complete. Loading refuses a converted directory without the marker.

Output layout:
  DST/config.json (+ generation/tokenizer/chat-template/processor files copied when present)
  DST/glm41v_jax.json          format name + version, dtype, layout, source, tensor count and bytes
  DST/params/                  the Orbax checkpoint (restore with glm41v_jax.loading.load, any mesh or NumPy)
  DST/CONVERSION_COMPLETE      written last
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from glm41v_jax.config import Glm4vConfig
from glm41v_jax.loading import (
    COMPLETE_MARKER,
    FORMAT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PARAMS_SUBDIR,
    SIDE_FILES,
    CheckpointError,
    HFCheckpoint,
    is_converted_dir,
    resolve_model_dir,
    to_flax_layout,
)
from glm41v_jax.weights import iter_leaves, set_path, unstack_layers

DTYPES = ("bfloat16", "float32")
DEFAULT_FLUSH_BYTES = 512 << 20
CHUNK_BYTES = 64 << 20  # storage chunk: parallel writes, and sub-shard reads when restoring onto a mesh


def _orbax_context(compress: bool) -> Any:
    import orbax.checkpoint.experimental.v1 as ocp

    ctx = ocp.Context()
    ctx.array.saving.use_compression = compress
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    return ctx


def parse_dtype(dtype: str | None) -> np.dtype | None:
    """'bfloat16' | 'float32' | None (keep the stored dtype) -> numpy dtype."""
    if dtype is None:
        return None
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return np.dtype(name)


def _settle(inflight: Any) -> None:
    """Wait for an in-flight partial save, then hand freed heap back to the OS (glibc keeps it otherwise, and RSS
    would creep up with the number of saves)."""
    if inflight is not None:
        inflight.result()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _prepare_dst(dst: str) -> str:
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: destination already exists; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.abspath(dst).rstrip(os.sep) + f".tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _copy_side_files(src_dir: str, tmp: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(tmp, name))
            copied.append(name)
    return copied


def _finish(tmp: str, dst: str, fmt: dict[str, Any]) -> None:
    with open(os.path.join(tmp, FORMAT_FILE), "w", encoding="utf-8") as f:
        json.dump(fmt, f, indent=2)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        f.write(f"{FORMAT_NAME} v{FORMAT_VERSION} complete\n")
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: destination appeared while converting; the result is left in {tmp}")
    os.rename(tmp, dst)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    progress: bool | None = None,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
    compress: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> str:
    """Convert an HF checkpoint (directory or hub id) to a converted directory at `dst`. Returns `dst`.

    dtype: 'bfloat16' | 'float32' | None (keep the stored dtype). progress: tqdm bar (None = only on a TTY).
    flush_bytes: host bytes buffered per Orbax partial save. compress: zstd chunks (off: ~same size for bf16
    weights, and CPU time matters more on small hosts).
    on_tensor: called with each HF name after it is read (tests use it to interrupt a conversion).
    """
    from orbax.checkpoint.experimental.v1 import partial
    from tqdm import tqdm

    out_dtype = parse_dtype(dtype)
    dst = os.fspath(dst)
    src_dir = resolve_model_dir(src)
    if is_converted_dir(src_dir):
        raise CheckpointError(f"{src_dir}: is already a converted directory; load it directly")
    cfg = Glm4vConfig.from_file(os.path.join(src_dir, "config.json"))
    ckpt = HFCheckpoint(src_dir, cfg)  # validates every header, name and shape before anything is written
    n_tensors = len(ckpt.rules)
    out_bytes = sum(
        int(np.prod(ckpt.infos[n].shape)) * (out_dtype or np.dtype(ckpt.infos[n].dtype)).itemsize for n in ckpt.rules
    )
    stored = sorted({ckpt.infos[n].dtype for n in ckpt.rules})

    tmp = _prepare_dst(dst)
    params_dir = os.path.join(tmp, PARAMS_SUBDIR)
    t0 = time.perf_counter()
    inflight = None
    try:
        copied = _copy_side_files(src_dir, tmp)
        pending: dict = {}
        pending_bytes = 0
        n_saves = 0
        with _orbax_context(compress), tqdm(total=out_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc="convert", disable=(None if progress is None else not progress),
                                            dynamic_ncols=True) as bar:
            for i, (name, rule) in enumerate(ckpt.rules.items()):
                info = ckpt.infos[name]
                if info.nbytes >= flush_bytes:
                    # A tensor as large as the whole buffer (embeddings, lm_head): write what is pending and let
                    # every write land first, so at most one big tensor (and its copies) is in memory.
                    if pending:
                        inflight = _settle(inflight)
                        inflight = partial.save_async(params_dir, pending)
                        n_saves += 1
                        pending, pending_bytes = {}, 0
                    inflight = _settle(inflight)
                arr = to_flax_layout(name, ckpt.read(name), rule, out_dtype, info.file)
                if on_tensor is not None:
                    on_tensor(name)
                set_path(pending, rule.path, arr)
                pending_bytes += arr.nbytes
                bar.update(arr.nbytes)
                bar.set_postfix_str(f"{i + 1}/{n_tensors} tensors", refresh=False)
                del arr
                if pending_bytes >= flush_bytes or i + 1 == n_tensors:
                    # One write in flight while the next group is read and transposed (IO || CPU).
                    inflight = _settle(inflight)
                    inflight = partial.save_async(params_dir, pending)
                    n_saves += 1
                    pending, pending_bytes = {}, 0
            inflight = _settle(inflight)
            partial.finalize(params_dir)
        fmt = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": "unrolled",
            "dtype": out_dtype.name if out_dtype is not None else (stored[0] if len(stored) == 1 else "mixed"),
            "source": os.path.abspath(src_dir),
            "num_tensors": n_tensors,
            "num_bytes": out_bytes,
            "partial_saves": n_saves,
            "copied_files": copied,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        _finish(tmp, dst, fmt)
    except BaseException:
        if inflight is not None:  # let the background write stop touching tmp before it is removed
            with contextlib.suppress(BaseException):
                inflight.result()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_converted(
    params: Any,
    cfg: Glm4vConfig,
    dst: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
) -> str:
    """Write an in-memory params tree (NumPy or jax arrays, sharded or not) as a converted directory.

    For trees that already fit in memory (after fine-tuning, tests). The scanned layout is unstacked first.
    config.json and the processor files are copied from `source_dir` when given; otherwise config.json is written
    from `cfg`.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    dst = os.fspath(dst)
    if any(k in params.get("language_model", {}) for k in ("layers",)):
        params = unstack_layers(params)
    dtypes = sorted({str(np.dtype(leaf.dtype)) for _, leaf in iter_leaves(params)})
    tmp = _prepare_dst(dst)
    try:
        copied = _copy_side_files(os.fspath(source_dir), tmp) if source_dir is not None else []
        if "config.json" not in copied:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg.to_hf(), f, indent=2)
        with _orbax_context(False):
            ocp.save(os.path.join(tmp, PARAMS_SUBDIR), params)
        n = sum(1 for _ in iter_leaves(params))
        fmt = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": "unrolled",
            "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
            "source": os.path.abspath(os.fspath(source_dir)) if source_dir is not None else "in-memory",
            "num_tensors": n,
            "num_bytes": int(sum(leaf.size * np.dtype(leaf.dtype).itemsize for _, leaf in iter_leaves(params))),
            "copied_files": copied,
        }
        _finish(tmp, dst, fmt)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

