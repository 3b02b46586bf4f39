"""The files around the params of a converted checkpoint, and its atomic completion.

Both writers of the converted format use these: the converter (`glm41v_convert`) and the trainer's final weights
(`glm41v_train.checkpoint`). A converted directory is built in a temporary folder; `finish_converted` records the
params/ file sizes and the side files' CRC-32 in the format file, writes the completion marker last, and renames the
folder to its destination without ever replacing anything there (renameat2 RENAME_NOREPLACE where the filesystem has
it). Loading refuses a directory without the marker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import zlib
from typing import Any

from .checkpoint_format import (
    COMPLETE_MARKER,
    FORMAT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PARAMS_SUBDIR,
    SIDE_FILES,
    CheckpointError,
)
from .integrity import file_sizes


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing an (empty) directory at dst."""
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2  # noqa: B018  (glibc >= 2.28)
    if libc is not None:
        at_fdcwd, noreplace_flag = -100, 1  # AT_FDCWD, RENAME_NOREPLACE
        if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace_flag) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here: plain rename below
            raise OSError(err, os.strerror(err), src)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def copy_side_files(src_dir: str, tmp: str) -> list[str]:
    """Copy the checkpoint's side files (config, tokenizer, processor, chat template) that exist in `src_dir` into
    `tmp`; returns their names."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(tmp, name))
            copied.append(name)
    return copied


def side_file_sums(tmp: str) -> dict[str, str]:
    """{name: CRC-32} of the side files in `tmp` (every plain file but the format file and the marker)."""
    out = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if name not in (FORMAT_FILE, COMPLETE_MARKER) and os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f"{zlib.crc32(f.read()):08x}"
    return out


def finish_converted(tmp: str, dst: str, fmt: dict[str, Any]) -> None:
    """Record the params/ file sizes and the side files' CRC-32 in the format file, write it and the marker, and
    rename tmp to dst (never replacing dst). On failure tmp is left for the caller to remove."""
    fmt = dict(fmt)
    fmt.setdefault("files", file_sizes(os.path.join(tmp, PARAMS_SUBDIR)))
    fmt.setdefault("side_files", side_file_sums(tmp))
    with open(os.path.join(tmp, FORMAT_FILE), "w", encoding="utf-8") as f:
        json.dump(fmt, f, indent=2)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        f.write(f"{FORMAT_NAME} v{FORMAT_VERSION} complete\n")
    try:
        rename_noreplace(tmp, dst)
    except FileExistsError:
        raise CheckpointError(f"{dst}: the destination was created by another program while converting; it was left "
                              "untouched and this conversion's output was discarded") from None


__all__ = ["copy_side_files", "finish_converted", "rename_noreplace", "side_file_sums"]
