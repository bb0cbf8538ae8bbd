"""The memory-bandwidth roofline of decoding: what one token must read, and how fast memory is.

Decoding one token at batch 1 multiplies every weight matrix of the language model by one
vector, so it reads every weight once and the whole KV cache once, and does about two flops per
weight: on a CPU it is bound by memory bandwidth, not by arithmetic. Its ceiling is

    roofline tok/s = bandwidth (bytes/s) / bytes read per token

    bytes per token = weights of the language model read per token      (see below)
                    + KV cache at ``context`` tokens
                      = layers x kv_heads x head_dim x 2 (K and V) x element size x context

and a runtime's *roofline fraction* is its measured decode tok/s over that ceiling.

    from edgekd.runtime.roofline import decode_bytes_per_token, measure_bandwidth, roofline_tok_s
    bw = measure_bandwidth(threads=2)
    need = decode_bytes_per_token("artifacts/student-fp32", context=512)
    roofline_tok_s(need["total"], bw["best_gbps"])

Which weights count. The input embedding table is a lookup (one row per token), so it is not
read per token, unless it is tied to the LM head: then the head reads the whole table. Each
target registers its reader (:mod:`edgekd.targets`, ``decode_weights``: the onnx, gguf and
tensorrt readers live beside their backends); the KV cache is ``text_dims`` from the manifest
at the target's cache type. PyTorch checkpoints (``config.json`` + ``*.safetensors``, or an
``edgekd distill`` run directory holding ``model/``): the language model's tensors at their
stored dtype (from the safetensors headers, no weights loaded), the embedding table only when
tied (or as ``lm_head.weight`` when untied); the KV cache at the weights' dtype.

Bandwidth is decimal: 1 GB/s = 1e9 bytes per second.
"""

from __future__ import annotations

import json
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.io import checkpoint_dir
from edgekd.models.dims import TextDims

GB = 1e9
# element sizes by dtype name (safetensors, torch, onnx-genai, TensorRT spellings)
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "float64": 8,
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
}


class RooflineError(EdgeKDError, ValueError):
    """A directory is neither an edgekd artifact nor a PyTorch checkpoint it can size."""


# ---- bandwidth ---------------------------------------------------------------------------------
def measure_bandwidth(threads: int = 2, size_mb: int = 1024, repeats: int = 7) -> dict[str, Any]:
    """STREAM-like read bandwidth: sum a ``size_mb`` MB float32 array with ``threads`` threads.

    ``GB/s = size_mb * 1e6 / seconds / 1e9`` for each of ``repeats`` timed passes (after one
    untimed pass that pages the array in). The array is far larger than any cache, so every
    pass streams it from DRAM; one pass does one add per 4 bytes, far below what two cores
    compute, so the time is the memory's. The sum runs in ``torch`` (vectorised, split over
    ``threads`` OpenMP threads); torch's previous thread count is restored afterwards.

    Returns:
        ``{"best_gbps", "median_gbps", "samples_gbps", "threads", "size_mb", "repeats",
        "method"}``; ``best`` is STREAM's convention (interference only ever slows a pass),
        ``median`` shows the noise.
    """
    import torch

    if threads < 1 or size_mb < 1 or repeats < 1:
        raise RooflineError("threads, size_mb and repeats must be >= 1")
    n = size_mb * 1_000_000 // 4
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(n, dtype=torch.float32)  # written once: the pages are real
        float(data.sum())
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            float(data.sum())
            samples.append(n * 4 / (time.perf_counter() - t0) / GB)
        del data
    finally:
        torch.set_num_threads(previous)
    return {
        "best_gbps": max(samples),
        "median_gbps": statistics.median(samples),
        "samples_gbps": samples,
        "threads": threads,
        "size_mb": size_mb,
        "repeats": repeats,
        "method": "torch float32 sum (read only)",
    }


def roofline_tok_s(bytes_per_token: float, bandwidth_gbps: float) -> float:
    """Decode tokens/s if every byte a token needs streams at the bandwidth:
    ``bandwidth_gbps * 1e9 / bytes_per_token``."""
    if bytes_per_token <= 0:
        raise RooflineError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return bandwidth_gbps * GB / bytes_per_token


# ---- bytes per token ---------------------------------------------------------------------------
def decode_bytes_per_token(model_dir: str | Path, context: int) -> dict[str, Any]:
    """Bytes one decode step reads at ``context`` tokens in the cache.

    ``total = weights + kv_cache``, with
    ``kv_cache = layers * kv_heads * head_dim * 2 * element_size * context`` and ``weights`` as
    the module docstring lists.

    Args:
        model_dir: An edgekd artifact directory or a PyTorch checkpoint / ``edgekd distill``
            run directory.
        context: Tokens in the KV cache (prompt plus generated so far).

    Returns:
        ``{"weights", "kv_cache", "total"}`` in bytes, plus ``kv_bytes_per_token`` (the KV
        cache's growth per context token), ``format`` and ``tied_embedding``.

    Raises:
        RooflineError: ``model_dir`` is neither, or ``context`` is negative.
    """
    from edgekd import artifact, targets

    if context < 0:
        raise RooflineError(f"context must be >= 0, got {context}")
    root = Path(model_dir)
    if not root.is_dir():
        raise RooflineError(f"'{root}' is not a directory")
    if (root / artifact.MANIFEST).is_file():
        loaded = artifact.load(root)
        fmt = loaded.target
        read = targets.get(fmt).read_decode_weights(loaded)
        weights, tied = read.weights, read.tied_embedding
        per_token = loaded.text.kv_bytes_per_token(read.kv_element_bytes)
    elif _checkpoint_dir(root) is not None:
        weights, per_token, tied = _torch(_checkpoint_dir(root))
        fmt = artifact.CHECKPOINT
    else:
        raise RooflineError(
            f"'{root}' is not an edgekd artifact (manifest.json) or a PyTorch checkpoint "
            "(config.json + *.safetensors)"
        )
    kv = per_token * context
    return {
        "weights": int(weights),
        "kv_cache": int(kv),
        "total": int(weights + kv),
        "kv_bytes_per_token": int(per_token),
        "context": int(context),
        "format": fmt,
        "tied_embedding": tied,
    }


def _checkpoint_dir(root: Path) -> Path | None:
    """The checkpoint directory of ``root`` when it holds safetensors weights."""
    d = checkpoint_dir(root)
    return d if d is not None and any(d.glob("*.safetensors")) else None


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _torch(root: Path) -> tuple[int, int, bool]:
    config = json.loads((root / "config.json").read_text())
    text = config.get("text_config", config)
    tensors: dict[str, tuple[str, int]] = {}
    for f in sorted(root.glob("*.safetensors")):
        for name, info in _safetensors_header(f).items():
            start, end = info["data_offsets"]
            tensors[name] = (info["dtype"], end - start)
    embed = [n for n in tensors if n.endswith("embed_tokens.weight")]
    heads = [n for n in tensors if n.endswith("lm_head.weight")]
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    tied = tied or not heads
    weights = 0
    for name, (_, nbytes) in tensors.items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue
        if name in embed and not tied:
            continue  # a lookup: one row per token
        if name in heads and tied and embed:
            continue  # the same tensor as the embedding (counted there)
        weights += nbytes
    named = (
        text.get("dtype"),
        config.get("dtype"),
        text.get("torch_dtype"),
        config.get("torch_dtype"),
    )
    dtype = next((d for d in named if d), None) or (tensors[embed[0]][0] if embed else "F32")
    element = DTYPE_BYTES.get(str(dtype), 4)
    return weights, TextDims.from_config(text).kv_bytes_per_token(element), tied
