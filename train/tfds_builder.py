"""The SFT conversations as a TFDS dataset (ArrayRecord files, read by grain; TensorFlow is not needed).

`Glm41vSft` is a registered TFDS builder ("glm41v_sft") that turns JSONL conversations into a dataset with the same
fields, one example per non-blank line, in line order (shuffling is grain's job, with the same seed as JSONL):
    messages     Text                 the record's "messages" value as JSON (the HF messages format; TFDS cannot
                                      type a content that is either a string or a list of items)
    source       Text                 "file:line" of the JSONL record, for error messages
    media_paths  Sequence(Text)       media paths as written in the messages (normalised), relative to the root
    media_bytes  Sequence(bytes)      the files' bytes (embed_media=True), so the dataset is self-contained
Media that is missing or outside the root at build time is not embedded; reading the record then reports it under
the bad-data policy (missing_media / path_escape), like the JSONL reader.

    build_tfds(["train.jsonl"], data_dir="/data/tfds", name="mydata")  # -> the prepared dataset folder
    DataConfig(tfds_dir=that_folder)  or  DataConfig(tfds_name="glm41v_sft/mydata", tfds_data_dir="/data/tfds")
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from .sources import JsonlSource  # the same notion of a record (non-blank line) as the JSONL reader


@dataclasses.dataclass(eq=False)
class SftConfig(tfds.core.BuilderConfig):
    jsonl: tuple[str, ...] = ()  # source files, concatenated in this order
    media_root: str | None = None  # default: each file's folder
    embed_media: bool = True
    split: str = "train"


class Glm41vSft(tfds.core.GeneratorBasedBuilder):
    """JSONL conversations (+ media files) -> TFDS. Pass `config=SftConfig(name=..., jsonl=(...))`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial format."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="GLM-4.1V SFT conversations in the HF messages format, with embedded media files.",
            features=tfds.features.FeaturesDict({
                "messages": tfds.features.Text(),
                "source": tfds.features.Text(),
                "media_paths": tfds.features.Sequence(tfds.features.Text()),
                "media_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            }),
            disable_shuffling=True,  # keep line order: example i is record i of the JSONL files
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        cfg = self.builder_config
        if not isinstance(cfg, SftConfig) or not cfg.jsonl:
            raise ValueError("Glm41vSft needs config=SftConfig(name=..., jsonl=(files...))")
        return {cfg.split: self._generate_examples(cfg)}

    def _generate_examples(self, cfg: SftConfig):
        src = JsonlSource(cfg.jsonl, cfg.media_root)
        for i in range(len(src)):
            rec = src[i]
            try:
                obj = json.loads(rec["data"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{rec['where']}: malformed JSON line: {e}") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise ValueError(f"{rec['where']}: expected a JSON object with a 'messages' field")
            paths, blobs = [], []
            if cfg.embed_media:
                for rel in _media_paths(obj["messages"]):
                    full = os.path.join(rec["root"], rel)
                    if rel not in paths and os.path.isfile(full):
                        with open(full, "rb") as f:
                            paths.append(rel)
                            blobs.append(f.read())
            yield i, {"messages": json.dumps(obj["messages"], ensure_ascii=False), "source": rec["where"],
                      "media_paths": paths, "media_bytes": blobs}


def _media_paths(messages: Any) -> list[str]:
    """Normalised relative paths of the image/video items of user turns that stay inside the root."""
    out = []
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        for item in content if isinstance(content, list) else []:
            if not isinstance(item, dict):
                continue
            kind = "video" if item.get("type") == "video" or "video" in item else "image"
            value = item.get(kind, item.get("path"))
            if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
                rel = os.path.normpath(value)
                if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
                    out.append(rel)
    return out


def build_tfds(jsonl: str | Sequence[str], data_dir: str, name: str = "default", media_root: str | None = None,
               embed_media: bool = True, split: str = "train") -> str:
    """Prepare the TFDS dataset of these JSONL files under `data_dir`; returns the dataset folder (for tfds_dir)."""
    files = (jsonl,) if isinstance(jsonl, (str, os.PathLike)) else tuple(jsonl)
    cfg = SftConfig(name=name, jsonl=tuple(os.path.abspath(os.fspath(f)) for f in files), media_root=media_root,
                    embed_media=embed_media, split=split)
    builder = Glm41vSft(config=cfg, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


class TfdsSource:
    """grain RandomAccessDataSource over a prepared TFDS dataset: record i -> {"where", "messages", "root", "media"}.

    `builder_dir`: a prepared dataset folder (no builder class needed), or `name` (+ `data_dir`) of a registered
    one. Other datasets work if they have a "messages" feature holding the messages JSON; media then comes from
    "media_paths"/"media_bytes" when present, else from files under `media_root`."""

    def __init__(self, builder_dir: str | None = None, name: str | None = None, data_dir: str | None = None,
                 split: str = "train", media_root: str | None = None) -> None:
        if bool(builder_dir) == bool(name):
            raise ValueError("TfdsSource: give exactly one of builder_dir or name")
        self._builder_dir, self._name, self._data_dir, self._split = builder_dir, name, data_dir, split
        self._root = os.path.abspath(media_root) if media_root else ""
        self._ds = None
        self._len = len(self._source())

    def _source(self):
        if self._ds is None:
            builder = (tfds.builder_from_directory(self._builder_dir) if self._builder_dir
                       else tfds.builder(self._name, data_dir=self._data_dir))
            self._label = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}"
            self._ds = builder.as_data_source(split=self._split)
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._source()[index]
        src = ex.get("source", b"")
        src = src.decode("utf-8") if isinstance(src, bytes) else str(src)
        where = f"{src} (tfds {self._label} {self._split}[{index}])" if src else \
            f"tfds {self._label} {self._split}[{index}]"
        names = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in ex.get("media_paths", [])]
        return {"where": where, "messages": ex["messages"], "root": self._root,
                "media": dict(zip(names, [bytes(b) for b in ex.get("media_bytes", [])], strict=True))}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}

    def __repr__(self) -> str:
        return f"TfdsSource({self._builder_dir or self._name}, split={self._split!r}, {self._len} records)"
