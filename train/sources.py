"""The records of SFT data files: grain random-access sources (`__len__` + `__getitem__`, picklable for worker
processes). A record is one non-blank line of a JSONL file; the TFDS builder (tfds_builder.py) uses the same notion,
so example i of a TFDS dataset built from a file is record i of that file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .packing import DataConfigError

MAX_RECORD_BYTES = 64 << 20  # a JSONL line longer than this is a bad record, not read (media are separate files)


class JsonlSource:
    """The non-blank lines of JSONL files, in file order. Record i -> {"where": "file:line", "data": bytes,
    "root": media root}. Lines are read with os.pread (no shared file position: safe across reader threads)."""

    def __init__(self, paths: str | Sequence[str], media_root: str | None = None) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._paths = [os.path.abspath(os.fspath(p)) for p in paths]
        for p in self._paths:
            if os.path.isdir(p):
                raise DataConfigError(f"{p}: is a directory, expected a JSONL file")
        self._roots = [os.path.abspath(media_root) if media_root else os.path.dirname(p) for p in self._paths]
        files, lines, offsets, lengths = [], [], [], []
        for fi, path in enumerate(self._paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"JSONL file not found: {path}")
            pos = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        files.append(fi)
                        lines.append(lineno)
                        offsets.append(pos)
                        lengths.append(len(line))
                    pos += len(line)
        self._file = np.asarray(files, np.int32)
        self._line = np.asarray(lines, np.int64)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fi = int(self._file[index])
        fd = self._fds.get(fi)
        if fd is None:
            with self._lock:
                fd = self._fds.get(fi)
                if fd is None:
                    fd = self._fds[fi] = os.open(self._paths[fi], os.O_RDONLY)
        where = f"{self._paths[fi]}:{int(self._line[index])}"
        if int(self._length[index]) > MAX_RECORD_BYTES:
            return {"where": where, "error": f"the line is {int(self._length[index])} bytes long, over the "
                                             f"{MAX_RECORD_BYTES >> 20} MiB limit of a record", "root": self._roots[fi]}
        data = os.pread(fd, int(self._length[index]), int(self._offset[index]))
        return {"where": where, "data": data, "root": self._roots[fi]}

    def __getstate__(self) -> dict[str, Any]:  # file descriptors and locks do not cross processes
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _fds={}, _lock=threading.Lock())

    def __del__(self) -> None:
        for fd in self.__dict__.get("_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self._paths}, {len(self)} records)"
