"""From what a user types as the model (`--model`, `load(model)`) to a local directory: a path (relative to the
current directory, `~` expanded, made absolute) or a hub id "owner/name", downloaded with huggingface_hub.

A hub id is fetched with `huggingface_hub.snapshot_download` (only *.json, *.safetensors, *.jinja and tokenizer
files) when huggingface_hub is installed and the hub is reachable; offline or without it, one CheckpointError says
that no such local directory exists, why the hub was not reached, and how to download the directory elsewhere and
pass it instead.
"""

from __future__ import annotations

import os
import re

from .checkpoint_format import PICKLE_SUFFIXES, CheckpointError
from .integrity import abs_path

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        from huggingface_hub import snapshot_download  # optional (the `hub` extra): imported only to download
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

