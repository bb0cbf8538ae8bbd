"""The memory-bandwidth roofline of decoding: what one token must read, and how fast memory is.

Decoding one token at batch 1 multiplies every weight matrix of the language model by one
vector, so it reads every weight once and the whole KV cache once, and does about two flops per
weight: on a CPU it is bound by memory bandwidth, not by arithmetic. Its ceiling is

    roofline tok/s = bandwidth (bytes/s) / bytes read per token

    bytes per token = weights of the language model read per token      (see below)
                    + KV cache at ``context`` tokens
                      = layers x kv_heads x head_dim x 2 (K and V) x element size x context

and a runtime's *roofline fraction* is its measured decode tok/s over that ceiling.

    from edgekd.plan.roofline import decode_bytes_per_token, measure_bandwidth, roofline_tok_s
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

Prefill is the other regime: the whole prompt goes through every weight matrix at once, so it
is a matrix product with as many rows as prompt tokens, bound by arithmetic, not memory. Its
ceiling is the compute roofline

    roofline prefill ms = prefill_flops(tokens) / GEMM throughput (FLOP/s) x 1e3

with :func:`prefill_flops` counting the work a prompt needs (every linear layer for every
token, causal attention, the LM head for the last token only) and :func:`measure_gemm` timing
this machine's matrix product at the model's own shape (prompt tokens x hidden x MLP width),
in fp32 and in int8, the two arithmetics CPU runtimes compute in.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from edgekd import artifact, targets
from edgekd.errors import EdgeKDError
from edgekd.io import checkpoint_dir
from edgekd.models.dims import TextDims
from edgekd.plan import GB

# bytes per element by dtype name (safetensors, torch, onnx-genai, TensorRT spellings)
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F6_E2M3": 0.75,  # sub-byte types are stored packed
    "F6_E3M2": 0.75,
    "F4": 0.5,
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


# ---- compute: prefill ---------------------------------------------------------------------------
# the arithmetic each precision computes in on a CPU: fp32/f16 weights are multiplied in fp32
# (x86 has no f16 FMA; llama.cpp and onnxruntime widen f16), int8 and the 4-bit formats in int8
# (MLAS's int4 MatMulNBits at accuracy level 4, llama.cpp's Q8_0/K-quant dot products)
GEMM_PRECISION = {
    "fp32": "fp32",
    "f32": "fp32",
    "fp16": "fp32",
    "f16": "fp32",
    "bf16": "fp32",
    "int8": "int8",
    "q8_0": "int8",
    "int4": "int8",
    "q4_k_m": "int8",
    "q4_0": "int8",
    "iq4_nl": "int8",
}


def prefill_flops(dims: TextDims, tokens: int) -> dict[str, Any]:
    """Floating-point operations a ``tokens``-long prompt needs (multiply-add = 2 flops).

    Per layer and token, with ``q = heads x head_dim`` and ``kv = kv_heads x head_dim``:

        linear    = 2 x hidden x (q + 2 kv)          (q, k, v projections)
                  + 2 x q x hidden                   (output projection)
                  + 3 x 2 x hidden x intermediate    (gated MLP: gate, up, down)

    Causal attention over the prompt, per layer: ``4 x q x tokens (tokens + 1) / 2`` (scores
    and the weighted sum, position ``p`` attending to ``p + 1`` keys). The LM head runs for the
    last position only (what generation needs): ``2 x hidden x vocab``.

        total = layers x (linear x tokens + attention) + lm_head

    Raises:
        RooflineError: ``dims`` lacks the MLP width (a manifest written before it was
            recorded: re-export), or ``tokens`` < 1.
    """
    if dims.intermediate is None:
        raise RooflineError("the MLP width (text_dims.intermediate) is not recorded: re-export")
    if tokens < 1:
        raise RooflineError(f"tokens must be >= 1, got {tokens}")
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    linear = 2 * dims.hidden * (q + 2 * kv) + 2 * q * dims.hidden
    linear += 3 * 2 * dims.hidden * dims.intermediate
    attention = 4 * q * tokens * (tokens + 1) // 2
    lm_head = 2 * dims.hidden * dims.vocab
    layers = dims.layers * (linear * tokens + attention)
    return {
        "total": layers + lm_head,
        "linear": dims.layers * linear * tokens,
        "attention": dims.layers * attention,
        "lm_head": lm_head,
        "tokens": tokens,
    }


def measure_gemm(
    m: int, k: int, n: int, threads: int = 2, repeats: int = 5
) -> dict[str, dict[str, Any]]:
    """This machine's matrix-product throughput at ``(m x k) @ (k x n)``, in GFLOP/s.

    ``fp32``: the best of PyTorch's ``torch.mm`` (oneDNN/MKL) and onnxruntime's ``MatMul``
    (MLAS). ``int8``: onnxruntime's ``MatMulInteger`` (uint8 activations x int8 weights, what
    its dynamic int8 quantization runs; VNNI where the CPU has it), and PyTorch's
    ``torch._int_mm`` where this build has it on CPU. Each: one untimed call, then the best of
    ``repeats`` (interference only ever slows a call), ``2 m k n`` flops each.

    Returns:
        ``{"fp32": {...}, "int8": {...}}``, each ``{"gflops", "by_library": {name: gflops},
        "shape": [m, k, n], "threads", "repeats"}``.
    """
    import numpy as np
    import torch

    if min(m, k, n, threads, repeats) < 1:
        raise RooflineError("m, k, n, threads and repeats must be >= 1")
    flops = 2.0 * m * k * n

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((m, k), dtype=np.float32)
    b32 = rng.standard_normal((k, n), dtype=np.float32)
    a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    fp32: dict[str, float] = {}
    int8: dict[str, float] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
        fp32["torch.mm"] = best(lambda: torch.mm(ta, tb))
        ia = torch.from_numpy(rng.integers(-128, 128, (m, k), dtype=np.int8))
        ib = torch.from_numpy(b8)
        try:
            torch._int_mm(ia, ib)
        except (RuntimeError, NotImplementedError, AttributeError):
            pass  # no CPU int8 matmul in this torch build
        else:
            int8["torch._int_mm"] = best(lambda: torch._int_mm(ia, ib))
    finally:
        torch.set_num_threads(previous)
    with contextlib.suppress(ImportError):
        fp32["onnxruntime MatMul"] = best(_ort_matmul("MatMul", a32, b32, threads))
        int8["onnxruntime MatMulInteger"] = best(_ort_matmul("MatMulInteger", a8, b8, threads))

    def row(by: dict[str, float]) -> dict[str, Any]:
        return {
            "gflops": max(by.values()),
            "by_library": by,
            "shape": [m, k, n],
            "threads": threads,
            "repeats": repeats,
        }

    return {"fp32": row(fp32), **({"int8": row(int8)} if int8 else {})}


def _ort_matmul(op: str, a, b, threads: int):
    """A one-node onnxruntime session computing ``a @ b`` (``b`` a constant, as weights are)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    elem = {np.float32: TensorProto.FLOAT, np.uint8: TensorProto.UINT8}[a.dtype.type]
    out = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", elem, list(a.shape))],
        [helper.make_tensor_value_info("y", out, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(
        onnx.ModelProto.SerializeToString(model), options, providers=["CPUExecutionProvider"]
    )
    return lambda: session.run(None, {"a": a})


def prefill_bound(
    dims: TextDims, precision: str, tokens: int, gemm: dict[str, dict[str, Any]], measured_ms: float
) -> dict[str, Any]:
    """A measured prefill against its compute roofline.

    ``gemm`` is :func:`measure_gemm`'s result; the bound uses the arithmetic ``precision``
    computes in (:data:`GEMM_PRECISION`), fp32 where no int8 GEMM was measured.

    Returns:
        ``{"flops", "arithmetic", "gemm_gflops", "roofline_ms", "measured_ms",
        "over_roofline", "achieved_gflops"}`` (``flops`` as :func:`prefill_flops` gives it).
    """
    arithmetic = GEMM_PRECISION.get(precision, "fp32")
    if arithmetic not in gemm:
        arithmetic = "fp32"
    flops = prefill_flops(dims, tokens)
    gflops = gemm[arithmetic]["gflops"]
    bound = prefill_roofline_ms(flops["total"], gflops)
    return {
        "flops": flops,
        "arithmetic": arithmetic,
        "gemm_gflops": gflops,
        "roofline_ms": bound,
        "measured_ms": measured_ms,
        "over_roofline": measured_ms / bound,
        "achieved_gflops": flops["total"] / measured_ms / 1e6,
    }


def text_dims_of(model_dir: str | Path) -> tuple[TextDims, str]:
    """The language model's dimensions and the precision it computes in, of an edgekd artifact
    (its manifest) or a PyTorch checkpoint (its config; fp32 arithmetic).

    Raises:
        RooflineError: neither an artifact nor a checkpoint.
    """
    root = Path(model_dir)
    if (root / artifact.MANIFEST).is_file():
        loaded = artifact.load(root)
        return loaded.text, loaded.precision
    ckpt = _checkpoint_dir(root) if root.is_dir() else None
    if ckpt is None:
        raise RooflineError(f"'{root}' is neither an edgekd artifact nor a PyTorch checkpoint")
    config = json.loads((ckpt / "config.json").read_text())
    return TextDims.from_config(config.get("text_config", config)), "fp32"


def prefill_roofline_ms(flops: float, gflops: float) -> float:
    """Prefill ms if every flop ran at the GEMM throughput: ``flops / (gflops * 1e9) * 1e3``."""
    if gflops <= 0:
        raise RooflineError(f"gflops must be > 0, got {gflops}")
    return flops / (gflops * 1e9) * 1e3


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


def _torch(root: Path) -> tuple[int, int, bool]:
    config = json.loads((root / "config.json").read_text())
    text = config.get("text_config", config)
    tensors: dict[str, tuple[str, int]] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as st:  # the header only: no tensor is read
            for name in st.keys():
                view = st.get_slice(name)
                dtype = view.get_dtype()
                tensors[name] = (dtype, int(math.prod(view.get_shape()) * DTYPE_BYTES[dtype]))
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
