"""Run edgekd artifacts and checkpoints through one API, and measure them.

    from edgekd.runtime import load_backend
    backend = load_backend("artifacts/student-int8", device="cpu", threads=2)
    gen = backend.generate(image, "What color is the shape?", max_new_tokens=16)

What lives here:

* ``base.py``: the ``Backend`` protocol, ``Generation`` (text, tokens, stage timings) and the
  greedy loop every backend shares.
* ``torch.py``, ``onnxruntime.py``, ``llamacpp.py``, ``tensorrt.py``: one backend per target.
* ``bench.py`` and ``report.py``: ``edgekd bench`` (latency, memory, power, accuracy against
  the teacher) and its JSON / Markdown / PNG report; ``power.py``: tegrastats, NVML and RAPL
  meters; ``roofline.py``: bytes read per decoded token and measured memory bandwidth.
* ``devices.py``: Jetson detection; ``plan.py``: ``edgekd plan`` (fit and roofline from shapes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.runtime.base import BackendError

from edgekd.io import HUB_ID, checkpoint_dir

if TYPE_CHECKING:
    from edgekd.runtime.base import Backend

DEVICES = ("cpu", "cuda", "jetson")
ORT_GPU_PROVIDERS = {"cuda": ("cuda",), "tensorrt": ("tensorrt", "cuda")}


def model_kind(path: str | Path) -> str:
    """``onnx``, ``gguf`` or ``tensorrt`` for an artifact directory, ``torch`` for a checkpoint
    (a directory with ``config.json``, an ``edgekd distill`` run, or a hub id).

    Raises:
        BackendError: the path does not exist and is not a hub id, or its manifest is unreadable.
    """
    p = Path(path)
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text())["target"])
        except (OSError, ValueError, KeyError) as e:
            raise BackendError(f"'{manifest}' is not an edgekd manifest ({e})") from None
    if checkpoint_dir(p) is not None:
        return "torch"
    if not p.exists() and HUB_ID.fullmatch(str(path)) and "/" in str(path):
        return "torch"  # a hub id (org/name)
    raise BackendError(
        f"'{path}' is neither an artifact directory (edgekd export) nor a checkpoint "
        "(a directory with config.json, or a hub id)"
    )


def load_backend(
    path: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    kind: str | None = None,
    ort_provider: str = "cuda",
) -> Backend:
    """Open an artifact directory or a checkpoint as a backend for ``device``.

    Args:
        path: ``edgekd export`` output (manifest checksums verified first) or a checkpoint.
        device: ``cpu``; ``cuda`` or ``jetson`` run on the NVIDIA GPU (onnxruntime's CUDA
            provider, llama.cpp with every layer offloaded, TensorRT engines, torch on cuda).
        threads: CPU threads (torch, onnxruntime intra-op, llama.cpp); None keeps each default.
        kind: Skip detection (``torch``, ``onnx``, ``gguf``, ``tensorrt``).
        ort_provider: onnxruntime's GPU provider on ``cuda``/``jetson``: ``cuda``, or
            ``tensorrt`` (TensorRT execution provider, CUDA for what it does not take).

    Raises:
        BackendError: an unknown device, a backend not installed (naming the extra), a
            target that cannot run on ``device``.
        ArtifactError: a missing, truncated or modified artifact file (named).
    """
    if device not in DEVICES:
        raise BackendError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    kind = kind or model_kind(path)
    gpu = device != "cpu"
    if kind == "torch":
        import torch
        from edgekd.runtime.torch import TorchBackend

        if threads:
            torch.set_num_threads(threads)
        return TorchBackend(path, device="cuda" if gpu else "cpu")
    if kind == "onnx":
        _require("onnxruntime", "onnx")
        from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

        if ort_provider not in ORT_GPU_PROVIDERS:
            raise BackendError(
                f"unknown onnxruntime GPU provider '{ort_provider}'; valid: "
                + ", ".join(ORT_GPU_PROVIDERS)
            )
        providers = ORT_GPU_PROVIDERS[ort_provider] if gpu else ("cpu",)
        return OnnxRuntimeBackend(path, providers=providers, threads=threads)
    if kind == "gguf":
        from edgekd.runtime.llamacpp import LlamaCppBackend, import_llama_cpp

        if gpu and not import_llama_cpp().llama_supports_gpu_offload():
            raise BackendError(
                "this llama-cpp-python is built without GPU support; rebuild it: "
                'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                "llama-cpp-python"
            )
        return LlamaCppBackend(path, n_threads=threads, n_gpu_layers=-1 if gpu else 0)
    if kind == "tensorrt":
        if not gpu:
            raise BackendError(
                f"'{path}' holds TensorRT engines, which run on an NVIDIA GPU: "
                "use --device cuda or --device jetson"
            )
        from edgekd.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(path)
    raise BackendError(f"'{path}' is a '{kind}' artifact, which no backend runs")


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BackendError(f"{module} is not installed: pip install 'edgekd[{extra}]'")
