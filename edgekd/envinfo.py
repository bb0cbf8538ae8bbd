"""An environment snapshot written next to every benchmark and bench result."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
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
    llama = _llama_cpp()
    if llama:
        info["llama_cpp"] = llama
    if extra:
        info.update(extra)
    return info


def _llama_cpp() -> dict[str, Any] | None:
    """llama.cpp's CPU variant and features, when this process has loaded it."""
    import sys

    if "llama_cpp" not in sys.modules:
        return None
    from edgekd.errors import EdgeKDError
    from edgekd.runtime.llamacpp import cpu_variant, import_llama_cpp

    try:
        llama_cpp = import_llama_cpp()
    except EdgeKDError as e:  # a llama-cpp-python edgekd cannot drive: say so, do not stop
        return {"error": str(e)}
    return {
        "cpu_variant": cpu_variant(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
