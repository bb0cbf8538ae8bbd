"""``edgekd bench``: latency, memory, power and accuracy of exported models against the teacher.

    from edgekd.runtime.bench import BenchConfig, run_bench
    report = run_bench(BenchConfig(models=["out/onnx-int8", "out/gguf-q4_k_m"],
                                   teacher="runs/teacher/model", data="eval.json", device="cpu",
                                   output="bench/"))

For the teacher and every model (an artifact directory or a checkpoint), in its own process so
that peak memory is its own:

1. **Latency.** One eval question with its image, ``warmup`` untimed runs, then ``runs`` timed
   runs decoding exactly ``speed_tokens`` tokens (end of turn ignored): vision-encode ms,
   prefill ms, time to first token (vision + prefill), decode tokens/s, end-to-end ms;
   p50 / p90 / p99.
2. **Memory and power** while the timed runs go: peak RSS (and GPU memory where NVML reads it),
   board power from tegrastats on Jetson, NVML on a GPU, RAPL on a CPU when readable; energy per
   generated token = energy of the timed runs (vision and prefill included) / tokens generated.
3. **Accuracy** on the eval set (``limit`` questions): greedy answers (``max_new_tokens``),
   exact and VQA-normalised match, per question type; then, in this process, the share of
   answers identical to the teacher's.
4. **Rooflines.** Prefill (CPU): the prompt's FLOPs over this machine's GEMM throughput at the
   model's shape (:func:`edgekd.plan.roofline.prefill_flops`, ``measure_gemm``), and the
   measured prefill's multiple of it. Decode: bytes one decode step reads (weights + KV
   cache at the benchmark's context, :mod:`edgekd.plan.roofline`) over the memory
   bandwidth (the device profile's, or measured here on a CPU without a profile): the decode
   bound in tokens/s and the fraction achieved.

Finished models are kept in ``.<output>.partial/`` as they complete, so a crash loses only the
model that was running and a re-run of the same command reuses them. The report (JSON with an
environment snapshot, Markdown, PNG) appears in ``output`` when everything is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from edgekd import artifact
from edgekd.envinfo import snapshot
from edgekd.io import atomic_write_json, checkpoint_dir
from edgekd.models.checkpoint import check_weights, load_config, require_chat_template
from edgekd.outputs import DataRoot, output_guard
from edgekd.runtime.bench_config import (  # noqa: F401 - the bench's API lives here
    BenchConfig,
    BenchConfigError,
    BenchError,
    load_items,
)
from edgekd.runtime.bench_host import check_fit, prefill_roofline, resolve_host, roofline
from edgekd.runtime.bench_measure import bench_model, jsonable
from edgekd.runtime.report import print_table, write_report


def model_specs(config: BenchConfig) -> list[dict[str, Any]]:
    """Name, path, kind and precision of the teacher (first) and every model."""
    specs = []
    names = config.names or [_label(m) for m in config.models]
    seen: dict[str, int] = {}
    pairs = ([("teacher", config.teacher, "teacher")] if config.teacher else []) + [
        (n, m, "model") for n, m in zip(names, config.models, strict=True)
    ]
    for name, path, role in pairs:
        if name in seen:  # two models of the same directory name
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        seen.setdefault(name, 1)
        kind = artifact.kind_of(path)
        precision = None if kind == artifact.CHECKPOINT else artifact.load(path).precision
        specs.append(
            {"name": name, "path": str(path), "kind": kind, "precision": precision, "role": role}
        )
    return specs


def _label(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "model" else p.name


def verify_artifacts(specs: list[dict]) -> None:
    """Every artifact's manifest checksums, before anything runs (names the bad file)."""
    for spec in specs:
        if spec["kind"] != artifact.CHECKPOINT:
            artifact.verify(spec["path"])


def check_checkpoints(specs: list[dict]) -> None:
    """Every local checkpoint loads and renders prompts, before anything runs.

    Raises:
        ModelError: a missing chat template, a malformed config.json, unreadable weights or a
            config that does not fit them (see :mod:`edgekd.models.checkpoint`).
    """
    for spec in specs:
        folder = checkpoint_dir(spec["path"]) if spec["kind"] == "torch" else None
        if folder is not None:
            require_chat_template(folder)
            check_weights(folder, load_config(str(folder)))


def _run_isolated(spec, settings, items) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(bench_model, spec, settings, items).result()
        except BrokenProcessPool:
            raise BenchError(
                f"the run of '{spec['name']}' died (killed, out of memory, or a crash in "
                "its runtime); the models measured before it are kept for a re-run"
            ) from None


def agreement(predictions: list[dict], teacher: list[dict]) -> float:
    """Share of questions answered with exactly the teacher's text."""
    ref = {p["id"]: p["prediction"].strip() for p in teacher}
    same = [p["prediction"].strip() == ref[p["id"]] for p in predictions if p["id"] in ref]
    return sum(same) / max(len(same), 1)


def _fingerprint(spec: dict, settings: dict, items: list[dict]) -> str:
    h = hashlib.sha256()
    p = Path(spec["path"])
    source = (
        artifact.load(p).files
        if spec["kind"] != artifact.CHECKPOINT
        else artifact.checkpoint_hash(checkpoint_dir(p) or p)
    )
    h.update(json.dumps([spec, settings, items, source], sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_bench(config: BenchConfig, console=None, show_table: bool = True) -> dict[str, Any]:
    """Run the bench and write its report; returns the report (also ``bench.json``).

    ``show_table=False`` leaves the closing table to the caller (the demo prints it last).
    The output is checked against every input and locked for the whole run
    (:func:`edgekd.outputs.output_guard`); an old report is replaced only by a complete one.

    Raises:
        BenchConfigError, DataError, ArtifactError, BackendError, BenchError: one-line problems with
        the input (before anything runs) or with a model run.
        OutputError, OutputExistsError: the output cannot be written (see the guard).
    """
    console = console or Console()
    config.validate()
    items = load_items(config.data, config.image_root, config.limit)

    roots = {str(Path(it["image"]).parent) for it in items if it["image"]}
    roots |= {str(config.image_root)} if config.image_root else set()
    inputs = [*config.models, config.teacher, config.data, config.profile]
    inputs += [DataRoot(r) for r in sorted(roots)]
    with output_guard(config.output, overwrite=config.overwrite, inputs=inputs) as guard:
        partial = _partial_dir(guard.path)
        try:
            report = _measure(config, items, guard.path, console)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.rmdir()  # kept for a re-run only when it holds finished models
            raise
        with guard.build() as tmp:
            write_report(report, tmp)
    shutil.rmtree(partial, ignore_errors=True)
    if show_table:
        print_table(report, console)
    console.print(f"report: {guard.path / 'bench.md'} (JSON: bench.json, plot: bench.png)")
    return report


def _partial_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def _measure(config: BenchConfig, items: list[dict], output: Path, console) -> dict[str, Any]:
    """Every model measured (finished ones kept in the partial folder), as the report's data."""
    specs = model_specs(config)
    verify_artifacts(specs)
    check_checkpoints(specs)
    host = resolve_host(config)
    fit = check_fit(specs, host, context=config.context)
    settings = {
        "device": config.device,
        "threads": config.threads,
        "ort_provider": config.ort_provider,
        "runs": config.runs,
        "warmup": config.warmup,
        "speed_tokens": config.speed_tokens,
        "max_new_tokens": config.max_new_tokens,
        "idle_s": config.idle_s,
        "isolate": config.isolate,
    }
    partial = _partial_dir(output)
    partial.mkdir(parents=True, exist_ok=True)
    results = []
    for i, spec in enumerate(specs, 1):
        key = _fingerprint(spec, settings, items)
        saved = partial / f"{key[:16]}.json"
        if saved.is_file():
            console.print(f"[{i}/{len(specs)}] {spec['name']}: [dim]reused[/dim] {saved}")
            results.append(json.loads(saved.read_text()))
            continue
        console.print(f"[{i}/{len(specs)}] {spec['name']}: {spec['kind']} on {config.device} ...")
        start = time.perf_counter()
        if config.isolate:
            result = _run_isolated(spec, settings, items)
        else:
            result = bench_model(spec, settings, items)
        result["roofline"] = roofline(spec, result, host)
        result["prefill_roofline"] = prefill_roofline(spec, result, host, config.threads)
        atomic_write_json(saved, result)
        results.append(result)
        console.print(
            f"[{i}/{len(specs)}] {spec['name']}: [green]done[/green] in "
            f"{time.perf_counter() - start:.1f}s"
        )
    teacher = next((r for r in results if r["role"] == "teacher"), None)
    for r in results:
        r["agreement_with_teacher"] = (
            agreement(r["accuracy"]["predictions"], teacher["accuracy"]["predictions"])
            if teacher is not None
            else None
        )
    report = {
        "format": "edgekd-bench",
        "version": 1,
        "config": jsonable({**asdict(config), "data": str(config.data)}),
        "environment": snapshot(
            {
                "device": config.device,
                "profile": host.profile.name if host.profile is not None else None,
                "power_mode": host.power_mode,
                "jetson": host.jetson,
                "bandwidth_gbps": host.bandwidth_gbps,
                "bandwidth_source": host.bandwidth_source,
            }
        ),
        "eval": {"data": str(config.data), "questions": len(items)},
        "fit": fit,
        "results": results,
    }
    return report
