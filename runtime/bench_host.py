"""Where ``edgekd bench`` runs, and what bounds it there: the device and its profile
(:func:`resolve_host`), each model's fit in its memory (:func:`check_fit`), and the decode and
prefill rooflines a measured model is set against."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd import artifact
from edgekd.io import checkpoint_dir
from edgekd.plan.inference import reserve_gb
from edgekd.plan.roofline import (
    RooflineError,
    decode_bytes_per_token,
    measure_bandwidth,
    measure_gemm,
    prefill_bound,
    roofline_tok_s,
    text_dims_of,
)
from edgekd.runtime import devices
from edgekd.runtime.bench_config import BenchConfig, BenchError

GB = 1e9


@dataclass
class Host:
    """Where the bench runs: device, profile (may be None on CPU/GPU) and bandwidth."""

    device: str
    profile: Any = None
    power_mode: str | None = None
    bandwidth_gbps: float | None = None
    bandwidth_source: str | None = None
    jetson: dict | None = None
    gemm: dict = field(default_factory=dict)  # (m, k, n) -> measure_gemm's result


def resolve_host(config: BenchConfig) -> Host:
    """Check the device is here, pick the profile (the detected board's on Jetson)."""
    from edgekd.profiles import load_device_profile

    host = Host(config.device, power_mode=config.power_mode)
    profile_name = config.profile
    if config.device == "jetson":
        board = devices.require_jetson()
        host.jetson = board.to_dict()
        profile_name = profile_name or board.profile
        if profile_name is None:
            raise BenchError(
                f"no shipped profile matches the board '{board.model}'; pass --profile "
                "NAME or a YAML file (edgekd profiles list)"
            )
        host.power_mode = host.power_mode or board.power_mode
    elif config.device == "cuda":
        _require_gpu()
    if profile_name:
        profile = load_device_profile(profile_name)
        host.profile = profile
        mode, note = host.power_mode, ""
        if config.power_mode is not None:
            profile.power_mode(config.power_mode)  # the user's mode must exist (lists valid)
        elif mode is not None and mode not in [m.name for m in profile.power_modes]:
            # the board runs a mode the profile does not describe: its default figures
            mode, note = None, f" (board mode {host.power_mode} not in the profile: default)"
        host.bandwidth_gbps = profile.bandwidth_gbps(mode)
        host.bandwidth_source = (
            f"profile {profile.name}" + (f", mode {mode}" if mode else "") + note
        )
    elif config.power_mode is not None:
        raise BenchError("--power-mode needs a device profile: pass --profile NAME")
    elif config.device == "cpu":
        bw = measure_bandwidth(threads=config.threads or min(2, os.cpu_count() or 1))
        host.bandwidth_gbps = float(bw["best_gbps"])
        host.bandwidth_source = "measured here (STREAM-like read, best of repeats)"
    return host


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


def model_bytes(path: str, kind: str) -> int:
    """Bytes of the files a runtime loads: artifact files, or a checkpoint's weights."""
    p = Path(path)
    if kind != artifact.CHECKPOINT:
        return artifact.load(p).bytes
    return sum(f.stat().st_size for f in (checkpoint_dir(p) or p).glob("*.safetensors"))


def check_fit(specs: list[dict], host: Host, context: int) -> dict[str, dict]:
    """Each model's memory need against the profile (weights + KV cache at ``context``).

    Raises:
        BenchError: a model does not fit, saying by how much.
    """
    out = {}
    if host.profile is None:
        return out
    usable = (host.profile.memory_gb - reserve_gb(host.profile)) * GB
    for spec in specs:
        if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
            continue  # a hub id: nothing local to size
        kv = decode_bytes_per_token(spec["path"], context)["kv_cache"]
        need = model_bytes(spec["path"], spec["kind"]) + kv
        out[spec["name"]] = {"need_gb": need / GB, "usable_gb": usable / GB}
        if need > usable:
            raise BenchError(
                f"'{spec['name']}' needs {need / GB:.2f} GB (files + KV cache at {context} "
                f"tokens) but {host.profile.name} has {usable / GB:.2f} GB usable: it does "
                f"not fit by {(need - usable) / GB:.2f} GB; bench a smaller precision"
            )
    return out


def roofline(spec: dict, result: dict, host: Host) -> dict[str, Any]:
    """The decode bound of ``spec`` at the benchmark's mean context and the fraction achieved."""
    lat = result["latency"]
    if host.bandwidth_gbps is None:
        return {"why": "no bandwidth: pass --profile for this device"}
    if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
        return {"why": "a hub id: weights not on disk to size"}
    context = lat["prompt_tokens"] + lat["new_tokens"] // 2
    moved = decode_bytes_per_token(spec["path"], context)
    bound = roofline_tok_s(moved["total"], host.bandwidth_gbps)
    achieved = lat["decode_tok_s"]["p50"]
    return {
        "context": context,
        "bytes_per_token": moved,
        "bandwidth_gbps": host.bandwidth_gbps,
        "bandwidth_source": host.bandwidth_source,
        "tok_s": bound,
        "fraction": achieved / bound if bound else None,
    }


def prefill_roofline(spec: dict, result: dict, host: Host, threads: int | None) -> dict:
    """The prompt's compute bound: its FLOPs at this machine's GEMM throughput (measured here,
    at the model's shape, in the arithmetic its precision computes in), and the ratio of the
    measured prefill (p50) to it. CPU only: a GPU's or Jetson's GEMM is not measured."""
    if host.device != "cpu":
        return {"why": "the GEMM throughput is measured on CPU only"}
    if spec["kind"] == artifact.CHECKPOINT and not Path(spec["path"]).exists():
        return {"why": "a hub id: no config on disk to size"}
    tokens = result["latency"]["prompt_tokens"]
    try:
        dims, precision = text_dims_of(spec["path"])
        shape = (tokens, dims.hidden, dims.intermediate)
        if dims.intermediate is not None and shape not in host.gemm:  # once per shape
            host.gemm[shape] = measure_gemm(*shape, threads=threads or min(2, os.cpu_count() or 1))
        bound = prefill_bound(
            dims,
            precision,
            tokens,
            host.gemm.get(shape, {}),
            result["latency"]["prefill_ms"]["p50"],
        )
    except RooflineError as e:  # e.g. a manifest without the MLP width
        return {"why": str(e)}
    return {**bound, "gemm": host.gemm[shape][bound["arithmetic"]]}
