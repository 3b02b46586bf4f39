"""HF safetensors checkpoint -> Orbax checkpoint of the unrolled Flax tree, streamed with bounded host memory.

What is special here:
  * Streaming: tensors are read one at a time (`glm41v_jax.hf_checkpoint.HFCheckpoint`, its own short-lived `safe_open`
    per tensor), mapped through the strict `weights.build_rules` table, and buffered only until about
    `flush_bytes` (default 512 MiB) are pending. Each buffer is written as one Orbax *partial save*
    (`orbax.checkpoint.experimental.v1.partial.save_async`: each call adds new leaves to a pending checkpoint)
    and then dropped, with one write in flight while the next group is read; `partial.finalize` merges the pieces
    into ONE ordinary Orbax checkpoint. The whole tree is never in host memory: peak is a small multiple of
    `flush_bytes` plus the largest tensor (the 1.2 GB bf16 embedding of the 9B model), whatever the layer count.
  * dtype: bf16 sources stay bit-exact unless `dtype` differs; fp32 -> bf16 uses ml_dtypes' cast, which rounds to
    nearest-even exactly like torch's `.to(torch.bfloat16)` (tested bit for bit).
  * Atomic: everything is written into `DST.tmp-<pid>`; the completion marker is written last and the directory is
    then renamed to DST without replacing anything (renameat2 RENAME_NOREPLACE where the filesystem has it). On any
    error, Ctrl-C or SIGTERM the temporary directory is removed, so DST either does not exist or is complete.
    Loading refuses a converted directory without the marker.
  * One writer per destination: `DST.lock` (flock, released by the kernel even after kill -9) is held from start
    to rename; a second run to the same DST stops at once and names the pid holding it. While holding it, a run
    removes the `DST.tmp-<pid>` folders of runs that died (SIGKILL, power loss: their pid no longer runs) and says
    so on stderr. If DST appears anyway (another program made it), this run's output is discarded, DST untouched.
  * Quantization (`quantize="int8"|"int4"`): each kernel that the scheme quantizes becomes its integer codes (int8,
    or JAX's int4, which Orbax stores and restores bit for bit) plus an fp32 `scale`, computed from the tensor as
    stored (`glm41v_jax.quant_checkpoint.LeafQuantizer`, in ~64 MiB slices: the host bound is unchanged); the scheme
    is recorded in the format file. A converted (float or quantized) source is refused.
  * Integrity: the CRC-32 of every array is computed as it streams past (zlib, GIL released, overlapped with the
    write in flight) and stored in the format file with the size of every file under params/ and the CRC-32 of the
    side files; `glm41v verify DST` and `load(..., verify=True)` check them (glm41v_jax.integrity).
  * Failures of the storage layer (disk full, quota, I/O errors) become one CheckpointError naming DST and the
    cause; Orbax's background threads do not print their tracebacks meanwhile.

Output layout:
  DST/config.json (+ generation/tokenizer/chat-template/processor files copied when present)
  DST/glm41v_jax.json          format name + version, dtype, layout, source, tensor count and bytes, per-array
                               CRC-32 ("checksums"), params/ file sizes ("files"), side-file CRC-32 ("side_files");
                               with --quantize also "quantization" ({"scheme", "group_size", "skip"}) and
                               "num_arrays" (codes and scales: more arrays than source tensors)
  DST/params/                  the Orbax checkpoint (restore with glm41v_jax.loading.load, any mesh or NumPy)
  DST/CONVERSION_COMPLETE      written last
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from orbax.checkpoint.experimental.v1 import partial as ocp_partial
from tqdm import tqdm

from glm41v_jax.checkpoint_files import copy_side_files, finish_converted
from glm41v_jax.checkpoint_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PARAMS_SUBDIR,
    QUANT_FIELD,
    CheckpointError,
    is_converted_dir,
    quant_record,
)
from glm41v_jax.config import QUANT_SCHEMES, Glm4vConfig
from glm41v_jax.errors import Glm41vError
from glm41v_jax.hf_checkpoint import HFCheckpoint, to_flax_layout
from glm41v_jax.integrity import (
    CHECKSUM_ALGORITHM,
    abs_path,
    array_crc32,
    is_no_space,
    quiet_storage_threads,
    storage_error,
)
from glm41v_jax.model_dir import resolve_model_dir
from glm41v_jax.quant import scheme_of
from glm41v_jax.quant_checkpoint import LeafQuantizer, QuantizedCheckpointError, checkpoint_quantization
from glm41v_jax.weights import iter_leaves, set_path, unstack_layers

DTYPES = ("bfloat16", "float32")
DEFAULT_FLUSH_BYTES = 512 << 20
CHUNK_BYTES = 64 << 20  # storage chunk: parallel writes, and sub-shard reads when restoring onto a mesh
TMP_INFIX = ".tmp-"
LOCK_SUFFIX = ".lock"



class ConversionTerminated(KeyboardInterrupt):
    """SIGTERM arrived while converting: the partial output was removed (the CLI exits 143)."""


def _orbax_context(compress: bool) -> Any:
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


class _PartialWriter:
    """Arrays buffered into groups of about `flush_bytes`, each written as one Orbax partial save, with one write in
    flight while the next group is read and transposed (IO || CPU)."""

    def __init__(self, params_dir: str, flush_bytes: int) -> None:
        self.params_dir, self.flush_bytes = params_dir, flush_bytes
        self.inflight: Any = None
        self.pending: dict = {}
        self.pending_bytes = 0
        self.saves = 0

    def settle(self) -> None:
        """Wait for the write in flight."""
        self.inflight = _settle(self.inflight)

    def flush(self) -> None:
        """Start writing what is pending (after the previous write has landed)."""
        if not self.pending:
            return
        self.settle()
        self.inflight = ocp_partial.save_async(self.params_dir, self.pending)
        self.saves += 1
        self.pending, self.pending_bytes = {}, 0

    def make_room(self, nbytes: int) -> None:
        """Before reading a tensor as large as the whole buffer (embeddings, lm_head): write what is pending and let
        every write land first, so at most one big tensor (and its copies) is in memory."""
        if nbytes >= self.flush_bytes:
            self.flush()
            self.settle()

    def add(self, path: tuple[str, ...], arr: np.ndarray, last: bool) -> None:
        set_path(self.pending, path, arr)
        self.pending_bytes += arr.nbytes
        if self.pending_bytes >= self.flush_bytes or last:
            self.flush()

    def finalize(self) -> None:
        """Merge the partial saves into one ordinary Orbax checkpoint."""
        self.settle()
        ocp_partial.finalize(self.params_dir)

    def abandon(self) -> None:
        """On a failure: let the background write stop touching the folder before it is removed."""
        if self.inflight is not None:
            with contextlib.suppress(BaseException), quiet_storage_threads():
                self.inflight.result()


# ---------------------------------------------------------------------------------------------------------------
# The destination: lock, stale temporary folders, SIGTERM, the final rename.


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class _DstLock:
    """An exclusive flock on `DST.lock` for one run. The kernel drops it when the process dies (even kill -9), so a
    lock file left behind is never stale. Filesystems without flock: no lock (the final rename still never
    replaces DST)."""

    def __init__(self, dst: str) -> None:
        self.path = dst + LOCK_SUFFIX
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (True), or return False on a filesystem without file locks."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{self.path[:-len(LOCK_SUFFIX)]}: another conversion to this destination is "
                                      f"running (pid {holder} holds {self.path}); wait for it or choose another "
                                      "path") from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    _note(f"{self.path}: this filesystem has no file locks; not guarding against a concurrent "
                          "conversion to the same destination")
                    return False
                raise
            try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: a waiter re-checks the inode and starts over
            os.close(self.fd)
            self.fd = None


def _note(text: str) -> None:
    """One `note: ...` line on stderr (not a logging record: no 'WARNING:logger:' prefix)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def _clear_stale_tmps(dst: str, locked: bool) -> None:
    """Remove `DST.tmp-<pid>` folders whose pid no longer runs (killed runs); say what was removed or left. Without
    the lock (a filesystem without flock, maybe shared by several hosts) they are only reported."""
    parent, base = os.path.split(dst)
    for name in sorted(os.listdir(parent)):
        pid_text = name[len(base) + len(TMP_INFIX):]
        if not (name.startswith(base + TMP_INFIX) and pid_text.isdigit()):
            continue
        path, pid = os.path.join(parent, name), int(pid_text)
        if pid != os.getpid() and _pid_running(pid):
            _note(f"{path} belongs to process {pid}, which is still running; left in place")
            continue
        if not locked and pid != os.getpid():
            _note(f"{path} looks like the partial output of an interrupted conversion (pid {pid} is not running "
                  f"here); remove it unless another host is converting to {dst}")
            continue
        shutil.rmtree(path, ignore_errors=True)
        if pid != os.getpid():
            _note(f"removed {path}, the partial output of an interrupted conversion (pid {pid} is no longer "
                  "running)")


@contextlib.contextmanager
def _on_sigterm_raise() -> Iterator[None]:
    """While active, SIGTERM raises ConversionTerminated in the main thread (so the cleanup below runs) when nobody
    else handles SIGTERM; a training loop's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:  # a second SIGTERM during the cleanup is ignored
            fired.append(signum)
            raise ConversionTerminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _staging(dst: str) -> Iterator[str]:
    """Lock DST, clear dead runs' folders, create `DST.tmp-<pid>` and yield it; remove it on any failure."""
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: destination already exists; remove it or choose another path")
    parent = os.path.dirname(dst)
    created = []  # the missing parent folders this run makes, deepest first: removed again if it fails
    p = parent
    while not os.path.lexists(p):
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        raise CheckpointError(f"{dst}: cannot create it: {parent} is not a directory") from None
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: cannot create it: {parent} is not a directory")
    try:
        lock = _DstLock(dst)
        locked = lock.acquire()
        try:
            if os.path.lexists(dst):  # finished by the run that held the lock before us
                raise CheckpointError(f"{dst}: destination already exists; remove it or choose another path")
            _clear_stale_tmps(dst, locked)
            tmp = dst + f"{TMP_INFIX}{os.getpid()}"
            with _on_sigterm_raise():
                os.makedirs(tmp)
                try:
                    yield tmp
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        finally:
            lock.release()
    except BaseException:
        for d in created:
            try:
                os.rmdir(d)
            except OSError:  # not empty (someone else's files) or gone: leave it
                break
        raise


def _write_failure(e: BaseException, dst: str, out_bytes: int | None) -> CheckpointError | None:
    """One CheckpointError for a failed write (disk full, I/O error), or None when `e` is not a storage failure (or
    already a user-facing error)."""
    if isinstance(e, Glm41vError):
        return None
    if is_no_space(e):
        need = f" (the output needs about {out_bytes / 2**30:.2f} GiB)" if out_bytes else ""
        return CheckpointError(f"{dst}: no space left on device while writing the converted checkpoint{need}; the "
                               "partial output was removed")
    err = storage_error(e) if not isinstance(e, OSError) else None  # a plain OSError names its file already
    if err is None:
        return None
    return CheckpointError(f"{dst}: could not write the converted checkpoint ({err[1]}); the partial output was "
                           "removed")


def _checksums(sums: dict[str, str]) -> dict[str, Any]:
    return {"algorithm": CHECKSUM_ALGORITHM, "arrays": sums}


# ---------------------------------------------------------------------------------------------------------------


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    progress: bool | None = None,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
    compress: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    quantize: str | None = None,
    quant_group_size: int = 128,
    quant_skip: tuple[str, ...] | str = ("vision",),
) -> str:
    """Convert an HF checkpoint (directory or hub id) to a converted directory at `dst`. Returns `dst` (absolute).

    dtype: 'bfloat16' | 'float32' | None (keep the stored dtype). progress: tqdm bar (None = only on a TTY).
    flush_bytes: host bytes buffered per Orbax partial save. compress: zstd chunks (off: ~same size for bf16
    weights, and CPU time matters more on small hosts).
    on_tensor: called with each HF name after it is read (tests use it to interrupt a conversion).
    quantize: 'int8' | 'int4' | None (float): each quantized kernel becomes its integer codes plus an fp32 `scale`
      (`quant_checkpoint.LeafQuantizer`, from the tensor as stored; `dtype` applies to the float leaves), with
      `quant_group_size` (int4) and `quant_skip` (parts left in float) as `RuntimeConfig` takes them; the scheme is
      recorded in the format file, so loading needs no flag.
    """
    out_dtype = parse_dtype(dtype)
    if not isinstance(flush_bytes, int) or isinstance(flush_bytes, bool) or flush_bytes <= 0:
        raise CheckpointError(f"flush_bytes must be a positive number of bytes, got {flush_bytes!r}")
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise CheckpointError(f"--quantize must be one of {', '.join(s for s in QUANT_SCHEMES if s != 'none')}, got "
                              f"{str(quantize)[:40]!r}")
    if not os.fspath(dst).strip():
        raise CheckpointError("the destination path is empty")
    dst = abs_path(dst)  # orbax and tensorstore take absolute paths only
    src_dir = resolve_model_dir(src)
    if is_converted_dir(src_dir):
        stored_q = checkpoint_quantization(src_dir)
        if quantize not in (None, "none") and stored_q:
            raise QuantizedCheckpointError(f"{src_dir}: is already quantized ({stored_q['quantize']}); quantize the "
                                           "float checkpoint it was converted from")
        raise CheckpointError(f"{src_dir}: is already a converted directory; load it directly"
                              + (" (`glm41v generate --quantize` quantizes it at load)" if quantize else ""))
    cfg = Glm4vConfig.from_file(os.path.join(src_dir, "config.json"))
    quantizer = None
    if quantize not in (None, "none"):
        cfg = cfg.with_runtime(quantize=quantize, quant_group_size=quant_group_size, quant_skip=quant_skip,
                               kernel_layout="in_out", scan_layers=False)
        quantizer = LeafQuantizer(cfg)  # every layer checked against the scheme before anything is read
    ckpt = HFCheckpoint(src_dir, cfg)  # validates every header, name and shape before anything is written
    n_tensors = len(ckpt.rules)
    quantized = set(quantizer.plans) if quantizer is not None else set()

    def nbytes(name: str) -> int:
        rule = ckpt.rules[name]
        if rule.path in quantized:
            plan = quantizer.plans[rule.path]
            return sum(int(np.prod(quantizer.leaves[p].shape)) * np.dtype(quantizer.leaves[p].dtype).itemsize
                       for p in (rule.path, plan.scale_path))
        return int(np.prod(ckpt.infos[name].shape)) * (out_dtype or np.dtype(ckpt.infos[name].dtype)).itemsize

    out_bytes = sum(nbytes(n) for n in ckpt.rules)
    stored = sorted({ckpt.infos[n].dtype for n in ckpt.rules if ckpt.rules[n].path not in quantized})

    with _staging(dst) as tmp:
        writer = _PartialWriter(os.path.join(tmp, PARAMS_SUBDIR), flush_bytes)
        t0 = time.perf_counter()
        sums: dict[str, str] = {}
        crc_s = 0.0
        try:
            copied = copy_side_files(src_dir, tmp)
            with quiet_storage_threads(), _orbax_context(compress), tqdm(
                    total=out_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                    disable=(None if progress is None else not progress), dynamic_ncols=True) as bar:
                for i, (name, rule) in enumerate(ckpt.rules.items()):
                    info = ckpt.infos[name]
                    writer.make_room(info.nbytes)
                    quant = rule.path in quantized  # quantized from the tensor as stored, never from a cast copy
                    arr = to_flax_layout(name, ckpt.read(name), rule, None if quant else out_dtype, info.file)
                    if on_tensor is not None:
                        on_tensor(name)
                    outs = quantizer(rule.path, arr) if quant else [(rule.path, arr)]
                    del arr
                    for j, (path, out) in enumerate(outs):
                        tc = time.perf_counter()
                        sums["/".join(path)] = array_crc32(out)  # overlaps the write in flight (GIL released)
                        crc_s += time.perf_counter() - tc
                        bar.update(out.nbytes)
                        writer.add(path, out, last=i + 1 == n_tensors and j + 1 == len(outs))
                    bar.set_postfix_str(f"{i + 1}/{n_tensors} tensors", refresh=False)
                    del outs, out
                writer.finalize()
            fmt = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "layout": "unrolled",
                "dtype": out_dtype.name if out_dtype is not None else (stored[0] if len(stored) == 1 else "mixed"),
                "source": src_dir,
                "num_tensors": n_tensors,
                "num_bytes": out_bytes,
                "partial_saves": writer.saves,
                "copied_files": copied,
                "seconds": round(time.perf_counter() - t0, 3),
                "checksum_seconds": round(crc_s, 3),
                "checksums": _checksums(sums),
            }
            if quantizer is not None:
                rt = cfg.runtime
                fmt[QUANT_FIELD] = quant_record(rt.quantize, rt.quant_group_size, rt.quant_skip)
                fmt["num_arrays"] = len(sums)
            finish_converted(tmp, dst, fmt)
        except BaseException as e:
            writer.abandon()
            failure = _write_failure(e, dst, out_bytes) if isinstance(e, Exception) else None
            if failure is not None:
                raise failure from None
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
    from `cfg`. Per-array checksums are recorded when every array is addressable from this process. A quantized tree
    (`quant.quantize_params`) records `cfg.runtime`'s scheme, which must be the tree's.
    """
    dst = abs_path(dst)
    if any(k in params.get("language_model", {}) for k in ("layers",)):
        params = unstack_layers(params)
    leaves = list(iter_leaves(params))
    found = scheme_of(params)
    if found != cfg.runtime.quantize:
        raise QuantizedCheckpointError(f"save_converted: the params hold {found} weights, the config says "
                                       f"quantize={cfg.runtime.quantize!r}")
    dtypes = sorted({str(np.dtype(leaf.dtype)) for _, leaf in leaves if np.dtype(leaf.dtype).kind == "f"
                     or found == "none"})
    addressable = all(getattr(leaf, "is_fully_addressable", True) for _, leaf in leaves)
    with _staging(dst) as tmp:
        try:
            copied = copy_side_files(abs_path(source_dir), tmp) if source_dir is not None else []
            if "config.json" not in copied:
                with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(cfg.to_hf(), f, indent=2)
            with quiet_storage_threads(), _orbax_context(False):
                ocp.save(os.path.join(tmp, PARAMS_SUBDIR), params)
            fmt = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "layout": "unrolled",
                "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
                "source": abs_path(source_dir) if source_dir is not None else "in-memory",
                "num_tensors": len(leaves),
                "num_bytes": int(sum(leaf.size * np.dtype(leaf.dtype).itemsize for _, leaf in leaves)),
                "copied_files": copied,
            }
            if found != "none":
                rt = cfg.runtime
                fmt[QUANT_FIELD] = quant_record(rt.quantize, rt.quant_group_size, rt.quant_skip)
            if addressable:
                fmt["checksums"] = _checksums({"/".join(p): array_crc32(leaf) for p, leaf in leaves})
            finish_converted(tmp, dst, fmt)
        except Exception as e:
            failure = _write_failure(e, dst, None)
            if failure is not None:
                raise failure from None
            raise
    return dst
