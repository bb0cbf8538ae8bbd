"""An environment snapshot written next to every benchmark and bench result."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "edgekd",
    "torch",
    "transformers",
    "accelerate",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "gguf",
    "llama-cpp-python",
    "tensorrt",
    "numpy",
)


# Facts a runtime adds to every snapshot taken in a process that loaded it (name -> facts or
# None): each backend module registers its own with contribute(), so this module imports none.
CONTRIBUTORS: dict[str, Callable[[], dict[str, Any] | None]] = {}


def contribute(name: str, facts: Callable[[], dict[str, Any] | None]) -> None:
    """Add ``facts()`` under ``name`` to every later :func:`snapshot` (a backend module calls
    this when it is imported)."""
    CONTRIBUTORS[name] = facts


def git_commit(path: str | None = None) -> str | None:
    """The commit of the working tree at ``path`` (with '+dirty' when modified), if any."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            text=True,
            capture_output=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            text=True,
            capture_output=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), or what the platform reports, or None:
    figures of one machine compare only with that machine's."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def snapshot(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, machine, threads, accelerator and commit, as plain JSON data."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "commit": git_commit(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    for name, facts in CONTRIBUTORS.items():
        found = facts()
        if found:
            info[name] = found
    if extra:
        info.update(extra)
    return info
