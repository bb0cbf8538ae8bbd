"""``manifest.json``: what an artifact directory holds and the proof that it matches PyTorch.

Written last by :func:`edgekd.export.export`, read first by every runtime backend::

    {
      "format": "edgekd-artifact", "version": 1,
      "target": "onnx", "precision": "int8",
      "source": {"checkpoint": "...", "sha256": "<hash of the source weights and config>"},
      "files": {"decoder_model_merged.onnx": {"sha256": "...", "bytes": 123}, ...},
      "components": {"vision": {"files": [...], "precision": "fp32"}, ...},
      "preprocessing": {"image_size": [384, 384], "image_mean": [...], "image_std": [...],
                        "image_token": "<image>", "image_token_id": 151646,
                        "image_tokens_per_image": 728, "chat_template": "...",
                        "tokenizer_files": ["tokenizer.json", ...]},
      "parity": {...exporter's numbers...},
      "environment": {...edgekd.envinfo.snapshot()...}
    }

:func:`verify` re-hashes every listed file, so a tampered or truncated file is caught before
it is loaded, and names the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.io import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT, VERSION = "edgekd-artifact", 1


class ArtifactError(EdgeKDError, ValueError):
    """An artifact directory is missing, incomplete or tampered with."""


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a checkpoint's config and weight files (sorted by name), or of a hub id."""
    root = Path(path)
    if not root.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.suffix in (".safetensors", ".json", ".bin") and f.is_file():
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def preprocessing(vlm) -> dict[str, Any]:
    """Tokenizer, chat template and image preprocessing a runtime needs to drive the artifact."""
    ip = vlm.processor.image_processor
    size = ip.size
    height, width = (
        (size["height"], size["width"])
        if "height" in size
        else (size["shortest_edge"], size["shortest_edge"])
    )
    template = getattr(vlm.processor, "chat_template", None) or vlm.tokenizer.chat_template
    return {
        "image_size": [int(height), int(width)],
        "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std],
        "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)),
        "image_token": vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id),
        "image_token_id": vlm.image_token_id,
        "image_tokens_per_image": vlm.num_image_tokens(),
        "chat_template": template,
        "eos_token_ids": _eos_ids(vlm),
        "pad_token_id": vlm.tokenizer.pad_token_id,
    }


def _eos_ids(vlm) -> list[int]:
    from edgekd.evaluate import stop_token_ids

    return stop_token_ids(vlm.tokenizer, vlm.model.generation_config)


def write(
    out: Path,
    *,
    target: str,
    precision: str,
    checkpoint: str,
    components: dict[str, Any],
    vlm,
    parity: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file under ``out`` and write ``manifest.json`` (atomically, last)."""
    from edgekd.envinfo import snapshot

    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(out).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "target": target,
        "precision": precision,
        "source": {"checkpoint": str(checkpoint), "sha256": checkpoint_hash(checkpoint)},
        "files": files,
        "components": components,
        "preprocessing": preprocessing(vlm),
        "parity": parity,
        "environment": snapshot(),
        **(extra or {}),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def load(artifact: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of an artifact directory (no hashing; see :func:`verify`)."""
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"'{artifact}' is not an edgekd artifact: {MANIFEST} is missing; "
            "create it with edgekd export"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an edgekd manifest (format {manifest.get('format')!r})")
    return manifest


def verify(artifact: str | Path) -> dict[str, Any]:
    """Load the manifest and check every file's size and sha256.

    Raises:
        ArtifactError: naming the first missing, truncated or modified file.
    """
    root = Path(artifact)
    manifest = load(root)
    for name, info in manifest["files"].items():
        f = root / name
        if not f.is_file():
            raise ArtifactError(f"{root}: file '{name}' listed in the manifest is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(
                f"{root}: file '{name}' has {size} bytes, the manifest says "
                f"{info['bytes']} (truncated or replaced); re-export it"
            )
        if sha256_file(f) != info["sha256"]:
            raise ArtifactError(
                f"{root}: file '{name}' fails its sha256 check (modified since "
                "export); re-export it"
            )
    return manifest
