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
   model's shape (:func:`edgekd.runtime.roofline.prefill_flops`, ``measure_gemm``), and the
   measured prefill's multiple of it. Decode: bytes one decode step reads (weights + KV
   cache at the benchmark's context, :mod:`edgekd.runtime.roofline`) over the memory
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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekd import artifact
from edgekd.errors import EdgeKDError
from edgekd.io import checkpoint_dir, is_hub_id
from edgekd.targets import DEVICES

GB = 1e9


class BenchError(EdgeKDError, RuntimeError):
    """A bench cannot run as asked (a model too large for the device, a crashed model run)."""


class BenchConfigError(EdgeKDError, ValueError):
    """Invalid ``edgekd bench`` options (every problem in one line)."""


@dataclass
class BenchConfig:
    """Everything ``edgekd bench`` takes; :meth:`validate` reports every problem at once."""

    models: list[str]
    data: str | Path
    output: str | Path
    teacher: str | None = None
    device: str = "cpu"
    profile: str | None = None
    power_mode: str | None = None
    image_root: str | Path | None = None
    runs: int = 20
    warmup: int = 3
    speed_tokens: int = 32
    limit: int | None = 200
    max_new_tokens: int = 16
    context: int = 2048  # tokens of KV cache in the fit check against the profile
    threads: int | None = None
    ort_provider: str = "cuda"  # onnxruntime's provider on cuda/jetson: cuda or tensorrt
    idle_s: float = 1.0  # idle power sampled this long before the timed runs (when metered)
    isolate: bool = True  # each model in its own process (peak memory of its own)
    overwrite: bool = False
    names: list[str] = field(default_factory=list)  # labels; default: the directory names

    def validate(self) -> None:
        problems = []
        if not self.models:
            problems.append("give at least one --model")
        if self.device not in DEVICES:
            problems.append(f"--device '{self.device}' is unknown (valid: {', '.join(DEVICES)})")
        for name, value, low in (
            ("--runs", self.runs, 1),
            ("--warmup", self.warmup, 0),
            ("--speed-tokens", self.speed_tokens, 2),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--context", self.context, 1),
        ):
            if value < low:
                problems.append(f"{name} must be at least {low} (got {value})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1 (got {self.limit})")
        from edgekd.runtime.onnxruntime import GPU_PROVIDERS

        if self.ort_provider not in GPU_PROVIDERS:
            problems.append(
                f"--ort-provider '{self.ort_provider}' is unknown (valid: "
                f"{', '.join(GPU_PROVIDERS)})"
            )
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be at least 1 (got {self.threads})")
        if self.names and len(self.names) != len(self.models):
            problems.append(f"{len(self.names)} --name for {len(self.models)} --model")
        for m in [*self.models, *([self.teacher] if self.teacher else [])]:
            if not Path(m).expanduser().exists() and not is_hub_id(str(m)):
                problems.append(f"model '{m}' not found (a directory, or a hub id org/name)")
                continue
            try:
                artifact.kind_of(m)
            except artifact.ArtifactError as e:
                problems.append(str(e))
        if not Path(self.data).is_file():
            what = "is a directory, not a file" if Path(self.data).is_dir() else "not found"
            problems.append(f"eval set '{self.data}' {what}: give the LLaVA JSON file")
        if problems:
            raise BenchConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Eval items
# ---------------------------------------------------------------------------------------------
def load_items(data: str | Path, image_root=None, limit: int | None = None) -> list[dict]:
    """Single-turn questions of a LLaVA-format eval file: prompt, reference, type, image path.

    Raises:
        DataError: invalid JSON or samples, missing or unreadable images (the count and the
            first one), paths leaving the image root, a multi-turn sample, or a limit below 1.
    """
    from edgekd.errors import DataError
    from edgekd.images import checked_samples

    samples, images = checked_samples(data, image_root, limit)  # bad images fail here
    items = []
    for sample, image in zip(samples, images, strict=True):
        turns = [t for t in sample["conversations"] if t["from"] != "system"]
        users = [t for t in turns if t["from"] == "user"]
        if len(users) != 1 or turns[-1]["from"] != "assistant":
            raise DataError(
                f"sample '{sample['id']}': bench takes single-turn questions (one user turn, "
                f"then the answer); it has {len(users)} user turns"
            )
        items.append(
            {
                "id": sample["id"],
                "prompt": users[0]["value"],
                "reference": str(sample.get("answer", turns[-1]["value"])),
                "question_type": sample.get("question_type", "all"),
                "image": None if image is None else str(image),
            }
        )
    return items


# ---------------------------------------------------------------------------------------------
# One model (runs in a child process when isolated)
# ---------------------------------------------------------------------------------------------
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
    """Measure one model (see the module docstring); returns its JSON-ready result."""
    if settings.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(settings["threads"]))
    from rich.progress import Progress

    from edgekd.evaluate import score
    from edgekd.images import open_rgb
    from edgekd.runtime import load_backend
    from edgekd.runtime.power import power_meter

    device, threads = settings["device"], settings.get("threads")
    peak_is_own = reset_peak_rss() or settings["isolate"]  # a fresh process: its own mark
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    backend = load_backend(
        spec["path"],
        device=device,
        threads=threads,
        kind=spec["kind"],
        ort_provider=settings.get("ort_provider", "cuda"),
    )
    load_s = time.perf_counter() - t0
    try:
        item = next((it for it in items if it["image"]), items[0])
        image = open_rgb(item["image"]) if item["image"] else None

        def once():
            return backend.generate(
                image, item["prompt"], settings["speed_tokens"], ignore_eos=True
            )

        for _ in range(settings["warmup"]):
            once()
        meter, why = power_meter(device)
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
        memory = {
            "rss_before_load_mb": rss0,
            "peak_rss_mb": peak_rss_mb() if peak_is_own else None,
            "rss_after_mb": _rss_mb(),
            "gpu_peak_mb": _gpu_peak_mb(device, spec["kind"], trace),
        }
        rows = []
        label = f"{spec['name']}: answering"
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
        info = backend.info() if hasattr(backend, "info") else {"backend": backend.name}
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return {
        "name": spec["name"],
        "path": spec["path"],
        "kind": spec["kind"],
        "precision": spec.get("precision"),
        "role": spec.get("role", "model"),
        "backend": _jsonable(info),
        "load_s": load_s,
        "latency": latency,
        "memory": memory,
        "power": power,
        "accuracy": accuracy,
    }


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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _run_isolated(spec, settings, items) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(bench_model, spec, settings, items).result()
        except BrokenProcessPool:
            raise BenchError(
                f"the run of '{spec['name']}' died (killed, out of memory, or a crash in "
                "its runtime); the models measured before it are kept for a re-run"
            ) from None


# ---------------------------------------------------------------------------------------------
# The whole bench
# ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where the bench runs: device, profile (may be None on CPU/GPU) and bandwidth."""

    device: str
    profile: Any = None
    power_mode: str | None = None
    bandwidth_gbps: float | None = None
    bandwidth_source: str | None = None
    jetson: dict | None = None
    gemm: dict = field(default_factory=dict)  # (m, k, n) -> measure_gemm's result


def resolve_target(config: BenchConfig) -> Target:
    """Check the device is here, pick the profile (the detected board's on Jetson)."""
    from edgekd.profiles import load_device_profile

    target = Target(config.device, power_mode=config.power_mode)
    profile_name = config.profile
    if config.device == "jetson":
        from edgekd.runtime.devices import require_jetson

        board = require_jetson()
        target.jetson = board.to_dict()
        profile_name = profile_name or board.profile
        if profile_name is None:
            raise BenchError(
                f"no shipped profile matches the board '{board.model}'; pass --profile "
                "NAME or a YAML file (edgekd profiles list)"
            )
        target.power_mode = target.power_mode or board.power_mode
    elif config.device == "cuda":
        _require_gpu()
    if profile_name:
        profile = load_device_profile(profile_name)
        target.profile = profile
        mode, note = target.power_mode, ""
        if config.power_mode is not None:
            profile.power_mode(config.power_mode)  # the user's mode must exist (lists valid)
        elif mode is not None and mode not in [m.name for m in profile.power_modes]:
            # the board runs a mode the profile does not describe: its default figures
            mode, note = None, f" (board mode {target.power_mode} not in the profile: default)"
        target.bandwidth_gbps = profile.bandwidth_gbps(mode)
        target.bandwidth_source = (
            f"profile {profile.name}" + (f", mode {mode}" if mode else "") + note
        )
    elif config.power_mode is not None:
        raise BenchError("--power-mode needs a device profile: pass --profile NAME")
    elif config.device == "cpu":
        from edgekd.runtime.roofline import measure_bandwidth

        bw = measure_bandwidth(threads=config.threads or min(2, os.cpu_count() or 1))
        target.bandwidth_gbps = float(bw["best_gbps"])
        target.bandwidth_source = "measured here (STREAM-like read, best of repeats)"
    return target


def _require_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        return
    if shutil.which("nvidia-smi") is None:
        raise BenchError("--device cuda: no NVIDIA GPU here (no driver); use --device cpu")
    raise BenchError(
        "--device cuda: torch sees no CUDA GPU (a CPU-only torch build, or the driver "
        "is not usable); install torch with CUDA or use --device cpu"
    )


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
    from edgekd.models.checkpoint import check_weights, load_config, require_chat_template

    for spec in specs:
        folder = checkpoint_dir(spec["path"]) if spec["kind"] == "torch" else None
        if folder is not None:
            require_chat_template(folder)
            check_weights(folder, load_config(str(folder)))


def model_bytes(path: str, kind: str) -> int:
    """Bytes of the files a runtime loads: artifact files, or a checkpoint's weights."""
    p = Path(path)
    if kind != artifact.CHECKPOINT:
        return artifact.load(p).bytes
    return sum(f.stat().st_size for f in (checkpoint_dir(p) or p).glob("*.safetensors"))


def check_fit(specs: list[dict], target: Target, context: int) -> dict[str, dict]:
    """Each model's memory need against the profile (weights + KV cache at ``context``).

    Raises:
        BenchError: a model does not fit, saying by how much.
    """
    from edgekd.runtime.plan import reserve_gb
    from edgekd.runtime.roofline import decode_bytes_per_token

    out = {}
    if target.profile is None:
        return out
    usable = (target.profile.memory_gb - reserve_gb(target.profile)) * GB
    for spec in specs:
        if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
            continue  # a hub id: nothing local to size
        kv = decode_bytes_per_token(spec["path"], context)["kv_cache"]
        need = model_bytes(spec["path"], spec["kind"]) + kv
        out[spec["name"]] = {"need_gb": need / GB, "usable_gb": usable / GB}
        if need > usable:
            raise BenchError(
                f"'{spec['name']}' needs {need / GB:.2f} GB (files + KV cache at {context} "
                f"tokens) but {target.profile.name} has {usable / GB:.2f} GB usable: it does "
                f"not fit by {(need - usable) / GB:.2f} GB; bench a smaller precision"
            )
    return out


def roofline(spec: dict, result: dict, target: Target) -> dict[str, Any]:
    """The decode bound of ``spec`` at the benchmark's mean context and the fraction achieved."""
    from edgekd.runtime.roofline import decode_bytes_per_token, roofline_tok_s

    lat = result["latency"]
    if target.bandwidth_gbps is None:
        return {"why": "no bandwidth: pass --profile for this device"}
    if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
        return {"why": "a hub id: weights not on disk to size"}
    context = lat["prompt_tokens"] + lat["new_tokens"] // 2
    moved = decode_bytes_per_token(spec["path"], context)
    bound = roofline_tok_s(moved["total"], target.bandwidth_gbps)
    achieved = lat["decode_tok_s"]["p50"]
    return {
        "context": context,
        "bytes_per_token": moved,
        "bandwidth_gbps": target.bandwidth_gbps,
        "bandwidth_source": target.bandwidth_source,
        "tok_s": bound,
        "fraction": achieved / bound if bound else None,
    }


def prefill_roofline(spec: dict, result: dict, target: Target, threads: int | None) -> dict:
    """The prompt's compute bound: its FLOPs at this machine's GEMM throughput (measured here,
    at the model's shape, in the arithmetic its precision computes in), and the ratio of the
    measured prefill (p50) to it. CPU only: a GPU's or Jetson's GEMM is not measured."""
    from edgekd.runtime.roofline import RooflineError, measure_gemm, prefill_bound, text_dims_of

    if target.device != "cpu":
        return {"why": "the GEMM throughput is measured on CPU only"}
    if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
        return {"why": "a hub id: no config on disk to size"}
    tokens = result["latency"]["prompt_tokens"]
    try:
        dims, precision = text_dims_of(spec["path"])
        shape = (tokens, dims.hidden, dims.intermediate)
        if dims.intermediate is not None and shape not in target.gemm:  # once per shape
            target.gemm[shape] = measure_gemm(
                *shape, threads=threads or min(2, os.cpu_count() or 1)
            )
        bound = prefill_bound(
            dims,
            precision,
            tokens,
            target.gemm.get(shape, {}),
            result["latency"]["prefill_ms"]["p50"],
        )
    except RooflineError as e:  # e.g. a manifest without the MLP width
        return {"why": str(e)}
    return {**bound, "gemm": target.gemm[shape][bound["arithmetic"]]}


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
    from rich.console import Console

    from edgekd.outputs import output_guard
    from edgekd.runtime.report import print_table, write_report

    console = console or Console()
    config.validate()
    items = load_items(config.data, config.image_root, config.limit)
    from edgekd.outputs import DataRoot

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
    from edgekd.envinfo import snapshot
    from edgekd.io import atomic_write_json

    specs = model_specs(config)
    verify_artifacts(specs)
    check_checkpoints(specs)
    target = resolve_target(config)
    fit = check_fit(specs, target, context=config.context)
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
        result["roofline"] = roofline(spec, result, target)
        result["prefill_roofline"] = prefill_roofline(spec, result, target, config.threads)
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
        "config": _jsonable({**asdict(config), "data": str(config.data)}),
        "environment": snapshot(
            {
                "device": config.device,
                "profile": target.profile.name if target.profile is not None else None,
                "power_mode": target.power_mode,
                "jetson": target.jetson,
                "bandwidth_gbps": target.bandwidth_gbps,
                "bandwidth_source": target.bandwidth_source,
            }
        ),
        "eval": {"data": str(config.data), "questions": len(items)},
        "fit": fit,
        "results": results,
    }
    return report
