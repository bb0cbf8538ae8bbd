"""One model of ``edgekd bench`` measured, in its own process when isolated: latency and the
power drawn meanwhile (:func:`measure_latency`), memory (peak RSS, GPU peak), and accuracy
(:func:`measure_accuracy`), composed by :func:`bench_model`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

from edgekd import artifact
from edgekd.images import open_rgb
from edgekd.runtime import load_backend
from edgekd.runtime import power as power_meters


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``); False where the kernel does not allow it.

    (``getrusage``'s ``ru_maxrss`` is no use here: it survives ``exec``, so a spawned worker
    would report its parent's peak.)
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since start or :func:`reset_peak_rss` (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
    }


def bench_model(spec: dict[str, Any], settings: dict[str, Any], items: list[dict]) -> dict:
    """Measure one model (see :mod:`edgekd.runtime.bench`); returns its JSON-ready result."""
    if settings.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(settings["threads"]))

    device = settings["device"]
    peak_is_own = reset_peak_rss() or settings["isolate"]  # a fresh process: its own mark
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    backend = load_backend(
        spec["path"],
        device=device,
        threads=settings.get("threads"),
        kind=spec["kind"],
        ort_provider=settings.get("ort_provider", "cuda"),
    )
    load_s = time.perf_counter() - t0
    try:
        latency, power, trace = measure_latency(backend, items, settings)
        memory = {
            "rss_before_load_mb": rss0,
            "peak_rss_mb": peak_rss_mb() if peak_is_own else None,
            "rss_after_mb": _rss_mb(),
            "gpu_peak_mb": _gpu_peak_mb(device, spec["kind"], trace),
        }
        accuracy = measure_accuracy(backend, items, settings, f"{spec['name']}: answering")
        info = backend.info()
    finally:
        backend.close()
    return {
        "name": spec["name"],
        "path": spec["path"],
        "kind": spec["kind"],
        "precision": spec.get("precision"),
        "role": spec.get("role", "model"),
        "backend": jsonable(info),
        "load_s": load_s,
        "latency": latency,
        "memory": memory,
        "power": power,
        "accuracy": accuracy,
    }


def measure_latency(backend, items: list[dict], settings: dict[str, Any]):
    """Latency percentiles of ``settings["runs"]`` answers to the first question with an image
    (after ``warmup`` untimed ones), each exactly ``speed_tokens`` long, with the power drawn
    meanwhile; returns ``(latency, power, trace)`` (``trace``: the meter's samples, or None)."""
    device = settings["device"]
    item = next((it for it in items if it["image"]), items[0])
    image = open_rgb(item["image"]) if item["image"] else None

    def once():
        return backend.generate(image, item["prompt"], settings["speed_tokens"], ignore_eos=True)

    for _ in range(settings["warmup"]):
        once()
    meter, why = power_meters.power_meter(device)
    idle = (0.0, 0.0)
    if meter is not None:
        meter.start()
        idle = (time.perf_counter(), time.perf_counter() + settings["idle_s"])
        time.sleep(settings["idle_s"])
    gens, e2e = [], []
    _reset_gpu_peak(device)
    r0 = time.perf_counter()
    for _ in range(settings["runs"]):
        s = time.perf_counter()
        gens.append(once())
        e2e.append((time.perf_counter() - s) * 1e3)
    r1 = time.perf_counter()
    trace = meter.stop() if meter is not None else None
    tokens = sum(len(g.token_ids) for g in gens)
    power: dict[str, Any] = {"source": None, "why": why}
    if trace is not None:
        energy = trace.energy_j(r0, r1)
        power = {
            **trace.to_dict(),
            "mean_w": trace.mean_w(r0, r1),
            "idle_w": trace.mean_w(*idle),  # None without an idle window
            "energy_j": energy,
            "energy_per_token_j": None if energy is None else energy / tokens,
        }
    latency = {
        "runs": settings["runs"],
        "warmup": settings["warmup"],
        "prompt_tokens": gens[0].prompt_tokens,
        "new_tokens": settings["speed_tokens"],
        "vision_ms": percentiles([g.vision_ms for g in gens]),
        "prefill_ms": percentiles([g.prefill_ms for g in gens]),
        "ttft_ms": percentiles([g.ttft_ms for g in gens]),
        "decode_tok_s": percentiles([g.decode_tokens_per_s for g in gens]),
        "e2e_ms": percentiles(e2e),
    }
    return latency, power, trace


def measure_accuracy(backend, items: list[dict], settings: dict[str, Any], label: str) -> dict:
    """Greedy answers (``max_new_tokens``) to every question, scored (exact and VQA-normalised
    match, per question type), with the predictions."""
    from edgekd.evaluate import score

    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(items))
        for it in items:
            img = open_rgb(it["image"]) if it["image"] else None
            gen = backend.generate(img, it["prompt"], settings["max_new_tokens"])
            rows.append({**it, "prediction": gen.text})
            progress.advance(task)
    accuracy = score(rows)
    accuracy["predictions"] = [
        {k: r[k] for k in ("id", "question_type", "reference", "prediction")} for r in rows
    ]
    return accuracy


def _reset_gpu_peak(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(device: str, kind: str, trace) -> float | None:
    if device == "cpu":
        return None
    if trace is not None and trace.source == "nvml" and trace.peak_memory_mb is not None:
        return trace.peak_memory_mb  # device-wide memory in use, every process
    if kind == artifact.CHECKPOINT:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return None


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
