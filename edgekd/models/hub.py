"""Checkpoint sources for converters: a local directory, or a hub id fetched with huggingface_hub.

A converter reads plain files (config, weights, tokenizer), so it needs a directory: a hub id is
turned into the local snapshot huggingface_hub keeps in its cache (downloaded where the hub is
reachable, read from the cache when offline). Only data files are fetched, never code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgekd.errors import ModelError
from edgekd.io import is_hub_id

# What a snapshot needs (never *.py: no remote code); *.bin only when there is no safetensors.
HUB_FILES = ("*.json", "*.jinja", "*.safetensors", "*.txt", "*.model")
HUB_BIN_FILES = ("*.bin",)


@dataclass
class Source:
    """Where a checkpoint was read from: a local directory, fetched from the hub or not."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None  # the hub commit of the snapshot


def resolve_source(src: str | os.PathLike, what: str = "checkpoint") -> Source:
    """A local checkpoint directory for ``src``: itself, or the hub snapshot of a hub id.

    A path that exists must be a directory. One that does not exist and looks like a path
    (absolute, starting with ``.`` or ``~``, a backslash, more or fewer than one ``/``) fails at
    once; ``org/name`` is fetched from the hub, or found in its local cache.

    Args:
        src: A directory or a hub id.
        what: What ``src`` is, for the messages (``TinyLLaVA checkpoint``).

    Raises:
        ModelError: one line naming ``src``, what was tried and what to do.
    """
    text = str(src)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{what} '{text}' is not a directory")
        return Source(path)
    if not is_hub_id(text):
        raise ModelError(f"{what} '{text}' not found: no such directory (a hub id is org/name)")
    return _download(text, what)


def _download(repo_id: str, what: str) -> Source:
    """The hub snapshot of ``repo_id`` (config, tokenizer and weight files; no code)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
        if not any(folder.rglob("*.safetensors")):  # older checkpoints: pytorch_model.bin only
            patterns = list(HUB_FILES + HUB_BIN_FILES)
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise ModelError(
            f"cannot get {what} '{repo_id}': there is no such local directory; {hub_reason(e)}; "
            f"check the id, or download it where the hub is reachable "
            f"(hf download {repo_id} --local-dir DIR) and pass DIR"
        ) from None
    return Source(folder, hub_id=repo_id, revision=folder.name)


def hub_reason(e: BaseException) -> str:
    """What went wrong with a hub download, in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "the repository is gated (accept its terms on the hub, then hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return "the hub has no such repository (or it is private: hf auth login)"
    if isinstance(e, RevisionNotFoundError):
        return "the hub has no such revision"
    if isinstance(e, LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set and the hub cache has no complete snapshot of it"
        return "the hub cannot be reached and the hub cache has no complete snapshot of it"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"the hub download failed ({lines[0] if lines else type(e).__name__})"
