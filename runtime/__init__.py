"""Run edgekd artifacts and checkpoints through one API, and measure them.

    from edgekd.runtime import load_backend
    backend = load_backend("artifacts/student-int8", device="cpu", threads=2)
    gen = backend.generate(image, "What color is the shape?", max_new_tokens=16)

What lives here:

* ``base.py``: the ``Backend`` protocol, ``Generation`` (text, tokens, stage timings) and the
  greedy loop every backend shares.
* ``torch.py``, ``onnxruntime.py``, ``llamacpp.py``, ``tensorrt.py``: one backend per target.
* ``bench.py``: ``edgekd bench`` (latency, memory, power, accuracy against the teacher), with
  its options and eval items (``bench_config.py``), one model's measurement in its own process
  (``bench_measure.py``), the host, fit and rooflines (``bench_host.py``), and its JSON /
  Markdown / PNG report (``report.py``); ``power.py``: tegrastats, NVML and RAPL meters.
* ``devices.py``: Jetson detection. Planning and rooflines live in :mod:`edgekd.plan`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.runtime.base import BackendError

if TYPE_CHECKING:
    from edgekd.runtime.base import Backend

from edgekd import artifact, targets
from edgekd.targets import DEVICES


def load_backend(
    path: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    kind: str | None = None,
    **options: Any,
) -> Backend:
    """Open an artifact directory or a checkpoint as a backend for ``device``.

    The artifact's target (:func:`edgekd.artifact.kind_of`) picks its registered backend
    (:mod:`edgekd.targets`); a checkpoint runs on PyTorch.

    Args:
        path: ``edgekd export`` output (manifest checksums verified first) or a checkpoint.
        device: ``cpu``; ``cuda`` or ``jetson`` run on the NVIDIA GPU (onnxruntime's CUDA
            provider, llama.cpp with every layer offloaded, TensorRT engines, torch on cuda).
        threads: CPU threads (torch, onnxruntime intra-op, llama.cpp); None keeps each default.
        kind: Skip detection (``torch`` or a target name).
        options: Backend options; each target takes those it declares (``ort_provider`` for
            onnx: ``cuda`` or ``tensorrt``) and ignores the others'.

    Raises:
        BackendError: an unknown device or option, a backend not installed (naming the extra),
            a target that cannot run on ``device``.
        ArtifactError: a missing, malformed, truncated, modified or unlisted artifact file.
    """
    if device not in DEVICES:
        raise BackendError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    known = {o for t in targets.TARGETS.values() for o in t.backend_options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendError(
            f"unknown backend option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    kind = kind or artifact.kind_of(path)
    if kind == artifact.CHECKPOINT:
        from edgekd.runtime.torch import open_backend

        return open_backend(path, device=device, threads=threads)
    target = targets.get(kind)
    if device not in target.devices:
        raise BackendError(
            f"'{path}' is a {kind} artifact, which runs on {', '.join(target.devices)}: use "
            + " or ".join(f"--device {d}" for d in target.devices)
        )
    mine = {k: v for k, v in options.items() if k in target.backend_options}
    return target.open_backend(path, device=device, threads=threads, **mine)
