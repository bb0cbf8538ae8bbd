"""``--resume`` continues the run it finds, or refuses: the job must be the one that was saved.

Three checks, all before anything is written (``config.yaml`` included):

1. :func:`check_resume_config`: the resolved recipe and job against the run's ``config.yaml``.
   Only the length of training and the number of processes may change on resume; a different
   student, teacher, method, loss, data, batch or learning rate is named with both values.
2. :func:`check_resume_shapes`: the student about to train against the checkpoint's
   ``config.json`` and tensors (sizes, layers, vocabulary, image token, the VSD adapter), so
   that a changed student never meets the checkpoint inside the trainer.
3. :func:`check_checkpoint_files`: the checkpoint's files are whole (JSON, safetensors, torch
   archives), so that a file cut short names itself instead of failing inside the trainer.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open

from edgekd.distill.trainer import DistillError
from edgekd.models.checkpoint import read_json

# Settings a resumed run may change: how long it trains and how many processes share a batch.
RESUMABLE = {
    "name",
    "description",
    "notes",
    "training.max_steps",
    "training.num_epochs",
    "training.gradient_accumulation_steps",
    "distributed.num_processes",
    "distributed.accelerate_config",
}
_PATHS = {"teacher", "student", "data.dataset", "data.image_root"}
_JOB_KEYS = ("vsd_adapter",)
_SHAPES = {
    "text_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ),
    "vision_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
    ),
    "": ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy"),
}
_FIX = "resume with the run's settings, or start a new run (--overwrite or another --output)"


def check_resume_config(recipe_dict: dict[str, Any], job_dict: dict[str, Any], run: Path) -> None:
    """Refuse to resume ``run`` with settings other than those in its ``config.yaml``.

    Args:
        recipe_dict: The resolved recipe as plain data (``profile_to_dict``).
        job_dict: The job's fields (paths as strings).
        run: The run directory.

    Raises:
        DistillError: one line naming every differing key with the saved and the new value.
    """
    path = run / "config.yaml"
    if not path.is_file():
        return  # a run saved before config.yaml existed: the shape check still applies
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DistillError(f"--resume: cannot read '{path}': {e}") from None
    if not isinstance(saved, dict):
        raise DistillError(f"--resume: '{path}' is not a mapping; {_FIX}")
    saved_job = saved.pop("job", None) or {}
    old, new = _flat(saved), _flat(recipe_dict)
    old.update({f"job.{k}": saved_job.get(k) for k in _JOB_KEYS})
    new.update({f"job.{k}": job_dict.get(k) for k in _JOB_KEYS})
    diffs = [
        f"{key} {_show(new.get(key))} (the run has {_show(old.get(key))})"
        for key in sorted(set(old) | set(new))
        if key not in RESUMABLE and not _same(key, old.get(key), new.get(key))
    ]
    if diffs:
        raise DistillError(
            f"--resume: this job differs from the run in '{path}': {'; '.join(diffs)}; {_FIX}"
        )


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """The files a resume reads are whole: JSON parses, safetensors headers and torch archives
    (optimizer, scheduler, RNG states) open.

    Raises:
        DistillError: naming the broken file and the folder to remove to resume from the
            checkpoint before it.
    """
    ckpt = Path(checkpoint)
    for file in sorted(ckpt.iterdir()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file):  # torch.save archives: a cut file has no directory
                    pass
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistillError(
                f"--resume: '{file}' is truncated or corrupt ({reason}); remove '{ckpt}' to "
                "resume from the checkpoint before it"
            ) from None


def check_resume_shapes(student, checkpoint: str | os.PathLike) -> None:
    """Refuse a student whose shapes differ from the checkpoint it would resume from.

    Raises:
        DistillError: naming the first differing setting with both values, or the adapter.
    """
    ckpt = Path(checkpoint)
    saved = read_json(ckpt / "config.json", what="a checkpoint")
    now = student.config.to_dict()
    for block, keys in _SHAPES.items():
        before, after = (saved.get(block) or {}, now.get(block) or {}) if block else (saved, now)
        for key in keys:
            if before.get(key) != after.get(key):
                name = f"{block}.{key}" if block else key
                raise DistillError(
                    f"--resume: the checkpoint '{ckpt}' has {name} {before.get(key)} but the "
                    f"student has {after.get(key)}; {_FIX}"
                )
    has_adapter = hasattr(student.model, "vsd_adapter")
    if has_adapter != _checkpoint_has_adapter(ckpt):
        state = "no" if has_adapter else "a"
        raise DistillError(
            f"--resume: the checkpoint '{ckpt}' has {state} VSD adapter but this job "
            f"{'builds one' if has_adapter else 'does not'} (--vsd-adapter); {_FIX}"
        )


def _checkpoint_has_adapter(ckpt: Path) -> bool:
    for file in ckpt.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if any(k.startswith("vsd_adapter.") for k in f.keys()):
                return True
    return False


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if key in _PATHS and isinstance(old, str) and isinstance(new, str):
        return _normal(old) == _normal(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return float(old) == float(new)
    return old == new


def _normal(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
