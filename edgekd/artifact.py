"""An artifact directory and its ``manifest.json``: the contract between export and runtime.

``edgekd export`` writes the manifest last (:func:`write`); every reader opens an artifact
through :func:`load` (structure checked) or :func:`verify` (structure, then every file's size
and sha256, and nothing on disk that the manifest does not list)::

    {
      "format": "edgekd-artifact", "version": 2,
      "target": "onnx", "precision": "int8",
      "source": {"checkpoint": "...", "sha256": "<hash of the source weights and config>"},
      "files": {"decoder_model_merged.onnx": {"sha256": "...", "bytes": 123}, ...},
      "components": {"vision": {"files": [...], "precision": "fp32"}, ...},
      "preprocessing": {"image_size": [384, 384], "image_mean": [...], "image_std": [...],
                        "rescale_factor": 0.0039, "image_token": "<image>",
                        "image_token_id": 151646, "image_tokens_per_image": 728,
                        "chat_template": "...", "eos_token_ids": [...], "pad_token_id": 0},
      "text_dims": {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, ...},
      "parity": {"checks": {...}, "passed": true, ...},
      "options": {...}, "environment": {...}
    }

An artifact is exactly its manifest: a file the manifest does not list is refused (a stray
``chat_template.json`` would change every prompt), and so is a listed path that leaves the
directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgekd import targets
from edgekd.chat import stop_token_ids
from edgekd.envinfo import snapshot
from edgekd.errors import EdgeKDError
from edgekd.io import HUB_ID, atomic_write_json, checkpoint_dir, sha256_file
from edgekd.models.dims import TextDims

MANIFEST = "manifest.json"
FORMAT, VERSION = "edgekd-artifact", 2
CHECKPOINT = "torch"  # kind_of() for a PyTorch checkpoint (not an artifact)


class ArtifactError(EdgeKDError, ValueError):
    """An artifact directory is missing, malformed, incomplete or tampered with."""


@dataclass(frozen=True)
class Artifact:
    """A loaded manifest: what an artifact directory holds and how to drive it.

    Attributes:
        root: The artifact directory.
        target: Registered target name (``onnx``, ``gguf``, ``tensorrt``, ...).
        precision: One of the target's precisions.
        files: Relative POSIX path -> ``{"sha256", "bytes"}``.
        components: Component -> ``{"files": [...], "precision": ..., ...}``.
        preprocessing: Tokenizer, chat template and image preprocessing (see the module doc).
        text: The language model's dimensions.
        parity: The export's parity report.
        options: Target options the export used.
        source: The checkpoint it came from and its hash.
        manifest: The whole manifest as read.
    """

    root: Path
    target: str
    precision: str
    files: dict[str, dict[str, Any]]
    components: dict[str, Any]
    preprocessing: dict[str, Any]
    text: TextDims
    parity: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def path(self, name: str) -> Path:
        """The listed file ``name`` inside the artifact (an unlisted name is refused)."""
        if name not in self.files:
            raise ArtifactError(f"{self.root}: '{name}' is not listed in its {MANIFEST}")
        return self.root / name

    @property
    def bytes(self) -> int:
        """Size of every listed file together."""
        return sum(int(f["bytes"]) for f in self.files.values())

    @classmethod
    def from_manifest(cls, root: str | Path, raw: dict[str, Any]) -> Artifact:
        """An ``Artifact`` of a manifest dict that :func:`load` has checked."""
        return cls(
            root=Path(root),
            target=raw["target"],
            precision=raw["precision"],
            files=raw["files"],
            components=raw["components"],
            preprocessing=raw["preprocessing"],
            text=TextDims.from_dict(raw["text_dims"]),
            parity=raw["parity"],
            options=raw.get("options") or {},
            source=raw["source"],
            manifest=raw,
        )


# ---- writing ------------------------------------------------------------------------------
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


def image_size(ip) -> tuple[int, int, int | None]:
    """``(height, width, shortest)`` of the images an image processor hands the tower;
    ``shortest``: the edge it resizes to before a centre crop (CLIP), else None."""
    size, shortest = ip.size, None
    if "height" in size:
        height, width = size["height"], size["width"]
    elif getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None):
        # CLIP: the shortest edge resized to this, then a centre crop of crop_size
        shortest, crop = int(size["shortest_edge"]), ip.crop_size
        height, width = crop["height"], crop["width"]
    else:
        height = width = size["shortest_edge"]
    return int(height), int(width), shortest


def preprocessing(vlm) -> dict[str, Any]:
    """Tokenizer, chat template and image preprocessing a runtime needs to drive the artifact."""
    ip = vlm.processor.image_processor
    height, width, shortest = image_size(ip)
    template = getattr(vlm.processor, "chat_template", None) or vlm.tokenizer.chat_template
    return {
        "image_size": [int(height), int(width)],
        "resize_shortest_edge": shortest,
        # LLaVA's pad (TinyLLaVA/LLaVA-1.5 "pad"): to a centred square of the mean colour first
        "pad_to_square": bool(getattr(ip, "do_pad", False)) and hasattr(ip, "pad_to_square"),
        "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std],
        "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)),
        "image_token": vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id),
        "image_token_id": vlm.image_token_id,
        "image_tokens_per_image": vlm.num_image_tokens(),
        "chat_template": template,
        "eos_token_ids": stop_token_ids(vlm.tokenizer, vlm.model.generation_config),
        "pad_token_id": vlm.tokenizer.pad_token_id,
    }


def write(
    out: Path,
    *,
    target: str,
    precision: str,
    checkpoint: str,
    components: dict[str, Any],
    vlm,
    parity: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file under ``out`` and write ``manifest.json`` (atomically, last)."""
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
        "text_dims": TextDims.from_config(vlm.config.text_config).to_dict(),
        "parity": parity,
        "options": dict(options or {}),
        "environment": snapshot(),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


# ---- reading ------------------------------------------------------------------------------
def load(artifact: str | Path, expect: str | None = None) -> Artifact:
    """Read and check ``manifest.json`` of an artifact directory (no hashing; see :func:`verify`).

    Args:
        artifact: The artifact directory.
        expect: The target the caller runs; an artifact of another target is refused first.

    Raises:
        ArtifactError: no manifest, invalid JSON, or a manifest that is not a valid edgekd
            manifest (every problem named in one line).
    """
    root = Path(artifact)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"'{artifact}' is not an edgekd artifact: {MANIFEST} is missing; "
            "create it with edgekd export"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a 5000-digit number
        raise ArtifactError(f"{path}: cannot read it ({e})") from None
    if expect is not None and isinstance(raw, dict) and raw.get("target") != expect:
        raise ArtifactError(
            f"'{artifact}' is a {raw.get('target')} artifact; the {expect} backend runs "
            f"{expect} artifacts (edgekd export --target {expect})"
        )
    problems = _manifest_problems(raw)
    if problems:
        raise ArtifactError(f"{path}: not a valid edgekd manifest: {'; '.join(problems)}")
    return Artifact.from_manifest(root, raw)


def verify(artifact: str | Path, expect: str | None = None) -> Artifact:
    """:func:`load`, then check that the directory holds exactly the listed files, intact.

    Raises:
        ArtifactError: naming the first unlisted, missing, truncated or modified file.
    """
    loaded = load(artifact, expect)
    root = loaded.root
    on_disk = {  # every entry but folders: files, links, pipes, sockets, devices
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_symlink() or not p.is_dir()) and p.relative_to(root).as_posix() != MANIFEST
    }
    unlisted = sorted(on_disk - set(loaded.files))
    if unlisted:
        raise ArtifactError(
            f"{root}: '{unlisted[0]}' is not listed in {MANIFEST}"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
            + "; an artifact holds exactly its manifest's files: remove it or re-export"
        )
    for name, info in loaded.files.items():
        f = root / name
        if f.is_symlink() or not f.is_file():
            what = "a link" if f.is_symlink() else "missing"
            raise ArtifactError(f"{root}: file '{name}' listed in the manifest is {what}")
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
    return loaded


def listed(root: str | Path, name: str, loaded: Artifact | None) -> Path:
    """A file a runtime config (``edgekd_onnx.json``, ``engines.json``) names: listed in the
    manifest when there is one, and inside the artifact directory either way."""
    root = Path(root)
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts:
        raise ArtifactError(f"{root}: '{name}' leaves the artifact directory")
    return loaded.path(name) if loaded is not None else root / name


def kind_of(path: str | Path) -> str:
    """The target of an artifact directory, or :data:`CHECKPOINT` (``"torch"``) for a
    checkpoint: a directory with ``config.json``, an ``edgekd distill`` run, or a hub id.

    Raises:
        ArtifactError: an unreadable manifest, or a path that is neither.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        return load(p).target
    if checkpoint_dir(p) is not None:
        return CHECKPOINT
    if not p.exists() and HUB_ID.fullmatch(str(path)) and "/" in str(path):
        return CHECKPOINT  # a hub id (org/name)
    raise ArtifactError(
        f"'{path}' is neither an artifact directory (edgekd export) nor a checkpoint "
        "(a directory with config.json, or a hub id)"
    )


# ---- structure checks ---------------------------------------------------------------------
_REQUIRED = {
    "format": str,
    "version": int,
    "target": str,
    "precision": str,
    "source": dict,
    "files": dict,
    "components": dict,
    "preprocessing": dict,
    "text_dims": dict,
    "parity": dict,
}
_PREPROCESSING = {
    "image_size": list,
    "image_mean": list,
    "image_std": list,
    "rescale_factor": (int, float),
    "image_token": str,
    "image_token_id": int,
    "image_tokens_per_image": int,
    "chat_template": str,
    "eos_token_ids": list,
}


def _manifest_problems(raw: Any) -> list[str]:
    """Everything wrong with a parsed manifest, each naming its key."""
    if not isinstance(raw, dict):
        return [f"expected a JSON object, got {type(raw).__name__}"]
    if raw.get("format") != FORMAT:
        return [f"format is {raw.get('format')!r}, expected {FORMAT!r}"]
    problems = _typed(raw, _REQUIRED, "")
    if problems:
        return problems
    if raw["version"] != VERSION:
        return [f"version {raw['version']} (this edgekd reads {VERSION}); re-export the artifact"]
    if raw["target"] not in targets.TARGETS:
        return [f"target '{raw['target']}' is not one of {', '.join(targets.names())}"]
    target = targets.TARGETS[raw["target"]]
    if raw["precision"] not in target.precisions:
        problems.append(
            f"precision '{raw['precision']}' is not a {target.name} precision "
            f"({', '.join(target.precisions)})"
        )
    problems += _file_problems(raw["files"], target)
    problems += _typed(raw["preprocessing"], _PREPROCESSING, "preprocessing.")
    if not problems:
        problems += _preprocessing_problems(raw["preprocessing"], raw["text_dims"])
    for key, spec in TextDims.__dataclass_fields__.items():
        value = raw["text_dims"].get(key)
        if value is None and spec.default is None:
            continue  # optional (older manifests lack it)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"text_dims.{key} must be a positive integer, got {value!r}")
    for name, comp in raw["components"].items():
        files = comp.get("files", []) if isinstance(comp, dict) else None
        if not isinstance(files, list):
            problems.append(f"components.{name} must hold a list of files")
            continue
        problems += [
            f"components.{name} names '{f}', which files does not list"
            for f in files
            if f not in raw["files"]
        ]
    return problems


def _preprocessing_problems(pre: dict, dims: dict) -> list[str]:
    """Values a runtime would trip over: sizes, statistics, ids, the chat template."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def count(x, low: int = 0) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    vocab = dims.get("vocab") if count(dims.get("vocab"), 1) else None
    problems = []
    if len(pre["image_size"]) != 2 or not all(count(x, 1) for x in pre["image_size"]):
        problems.append("preprocessing.image_size must be [height, width], positive integers")
    shortest = pre.get("resize_shortest_edge")
    if shortest is not None and not (count(shortest, 1) and shortest >= max(pre["image_size"])):
        problems.append(
            "preprocessing.resize_shortest_edge must be null or an integer >= the crop size"
        )
    for key in ("image_mean", "image_std"):
        if not pre[key] or not all(number(x) for x in pre[key]):
            problems.append(f"preprocessing.{key} must be a list of finite numbers")
    if not all(number(x) and x > 0 for x in pre["image_std"]):
        problems.append("preprocessing.image_std must be > 0")
    if not number(pre["rescale_factor"]) or pre["rescale_factor"] <= 0:
        problems.append("preprocessing.rescale_factor must be a finite number > 0")
    ids = [pre["image_token_id"], *pre["eos_token_ids"]]
    if not all(count(i) and (vocab is None or i < vocab) for i in ids):
        problems.append(
            "preprocessing.image_token_id and eos_token_ids must be token ids below "
            f"text_dims.vocab ({vocab})"
        )
    if not count(pre["image_tokens_per_image"]):
        problems.append("preprocessing.image_tokens_per_image must be an integer >= 0")
    problems += _template_problems(pre["chat_template"])
    return problems


def _template_problems(template: str) -> list[str]:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        return [f"preprocessing.chat_template is not a valid Jinja template ({e.message})"]
    return []


def _typed(data: dict, spec: dict[str, Any], prefix: str) -> list[str]:
    problems = []
    for key, kind in spec.items():
        if key not in data:
            problems.append(f"'{prefix}{key}' is missing")
        elif not isinstance(data[key], kind) or isinstance(data[key], bool):
            problems.append(f"'{prefix}{key}' has the wrong type ({type(data[key]).__name__})")
    return problems


def _file_problems(files: dict, target) -> list[str]:
    problems = []
    for name, info in files.items():
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ".." in parts or name == MANIFEST:
            problems.append(f"file name '{name}' leaves the artifact directory")
        elif not isinstance(info, dict) or not _valid_entry(info):
            problems.append(f"files['{name}'] needs a 64-hex 'sha256' and an integer 'bytes'")
    for f in target.files:
        if f in files:
            continue
        old = target.older_names.get(f)
        hint = f" (written by an older edgekd as '{old}': re-export it)" if old in files else ""
        problems.append(f"a {target.name} artifact holds '{f}', which files does not list{hint}")
    return problems


def _valid_entry(info: dict) -> bool:
    digest, size = info.get("sha256"), info.get("bytes")
    return (
        isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
        and isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 0
    )
