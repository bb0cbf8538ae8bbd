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
    """llama.cpp's CPU variant, why better-ranked ones were skipped, and its features, when
    this process has loaded it."""
    import sys

    llama_cpp = sys.modules.get("llama_cpp")
    if llama_cpp is None or not hasattr(llama_cpp, "llama_print_system_info"):
        return None
    from edgekd.runtime import ggml_cpu

    info: dict[str, Any] = {"cpu_variant": ggml_cpu.loaded_variant()}
    chosen = ggml_cpu.selection()
    if chosen:
        info["cpu_variants"] = chosen["variants"]
        info["cpu_probe"] = {
            "checks": len(chosen["checks"]),
            "seconds": chosen.get("probe_s"),
            "cached": chosen["cached"],
        }
    info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return info
