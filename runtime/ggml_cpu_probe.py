"""The probe of one llama.cpp CPU variant, run in a child process by :mod:`ggml_cpu` (edgekd's
``runtime/ggml_cpu.py``, shipped in llama-cpp-python as ``llama_cpp/_cpu_variant.py``, with this
file beside it as ``_cpu_variant_probe.py``).

    python ggml_cpu_probe.py probe REGISTRY_LIBRARY VARIANT_LIBRARY...

It scores the variants with ggml's own ``ggml_backend_score``, then probes them best first:
quantized matrix products of every weight type llama.cpp's quantizer writes, at 1 and 32 rows,
through every buffer type the variant would put weights in (the default one and its extra ones:
AMX, repacked), each checked against numpy on the dequantized weights. Every step is reported
on stdout (one JSON object a line) before it is taken, so that a crash names its variant and
its product. Standard library and ctypes; numpy, which llama-cpp-python requires.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

# The weight types llama.cpp's quantizer writes without an importance matrix, as ggml numbers
# them (ggml.h, enum ggml_type). Each has its own dot-product kernels, and the extra buffer
# types (AMX, repacked) take different subsets of them.
PROBE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10,
    "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23, "bf16": 30,
    "mxfp4": 39,
}  # fmt: skip
PROBE_K, PROBE_N, PROBE_ROWS = 256, 64, (1, 32)  # K: a multiple of every block size (QK_K)
PROBE_TOLERANCE = 0.05  # relative L2 error; the activations are quantized to 8 bits in the dot


def _bind(ggml: ctypes.CDLL) -> None:
    """ctypes signatures of the ggml functions the probe calls (ggml.h, ggml-backend.h,
    ggml-alloc.h)."""
    p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "ggml_backend_load": (p, [ctypes.c_char_p]),
        "ggml_backend_unload": (None, [p]),
        "ggml_backend_reg_dev_get": (p, [p, sz]),
        "ggml_backend_reg_get_proc_address": (p, [p, ctypes.c_char_p]),
        "ggml_backend_dev_init": (p, [p, ctypes.c_char_p]),
        "ggml_backend_dev_buffer_type": (p, [p]),
        "ggml_backend_dev_supports_op": (ctypes.c_bool, [p, p]),
        "ggml_backend_buft_name": (ctypes.c_char_p, [p]),
        "ggml_backend_alloc_ctx_tensors_from_buft": (p, [p, p]),
        "ggml_backend_buffer_free": (None, [p]),
        "ggml_backend_tensor_set": (None, [p, p, sz, sz]),
        "ggml_backend_tensor_get": (None, [p, p, sz, sz]),
        "ggml_backend_graph_compute": (ctypes.c_int, [p, p]),
        "ggml_backend_free": (None, [p]),
        "ggml_init": (p, [_InitParams]),
        "ggml_free": (None, [p]),
        "ggml_tensor_overhead": (sz, []),
        "ggml_graph_overhead": (sz, []),
        "ggml_new_tensor_2d": (p, [p, ctypes.c_int, i64, i64]),
        "ggml_mul_mat": (p, [p, p, p]),
        "ggml_new_graph": (p, [p]),
        "ggml_build_forward_expand": (None, [p, p]),
        "ggml_row_size": (sz, [ctypes.c_int, i64]),
        "ggml_quantize_chunk": (sz, [ctypes.c_int, p, p, i64, i64, i64, p]),
        "ggml_get_type_traits": (ctypes.POINTER(_TypeTraits), [ctypes.c_int]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(ggml, name)
        fn.restype, fn.argtypes = restype, argtypes


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]  # fmt: skip


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]  # fmt: skip


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _probe_main(registry: str, candidates: list[str]) -> int:
    """The child: score ``candidates`` with ggml's own score function, then probe them best
    first; report each step on stdout before taking it, so that a crash names its variant."""
    # first: the variants find libggml-base through it (they carry no run path of their own)
    ggml = ctypes.CDLL(registry, mode=ctypes.RTLD_GLOBAL)
    _bind(ggml)
    scores = {}
    for path in candidates:
        _emit(probing=path)  # loading a library can fault too
        try:
            score = getattr(ctypes.CDLL(path), "ggml_backend_score", None)
        except OSError as e:  # as ggml's own loader does: a library that cannot load is skipped
            _emit(failed=path, why=f"cannot be loaded ({e})")
            continue
        scores[path] = int(score()) if score is not None else 0
    _emit(scores=scores)
    import numpy as np

    for path in sorted((p for p in scores if scores[p] > 0), key=lambda p: -scores[p]):
        _emit(probing=path)
        reg = ggml.ggml_backend_load(path.encode())
        if not reg:
            _emit(failed=path, why="ggml could not load it")
            continue
        try:
            checks = _probe_matmuls(ggml, reg, np)
        except Exception as e:  # noqa: BLE001 - wrong numbers, or the variant's own failure
            ggml.ggml_backend_unload(reg)
            why = str(e) if isinstance(e, _WrongResult) else f"{type(e).__name__} in the probe: {e}"
            _emit(failed=path, why=why)
            continue
        _emit(passed=path, checks=checks)
        return 0
    return 0


class _WrongResult(Exception):
    pass


def _probe_matmuls(ggml, reg, np) -> list[str]:
    """Every probe type through every weight buffer type of the variant, at 1 and 32 rows,
    against numpy; returns the ``type/buffer/rows`` checks that ran."""
    dev = ggml.ggml_backend_reg_dev_get(reg, 0)
    backend = ggml.ggml_backend_dev_init(dev, None)
    host = ggml.ggml_backend_dev_buffer_type(dev)
    set_threads = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if set_threads:  # more than one thread: per-thread state (AMX tile configs) is exercised
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)(set_threads)(
            backend, max(2, min(4, os.cpu_count() or 2))
        )
    bufts = [host]
    extra = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if extra:
        found = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(extra)(dev)
        i = 0
        while found and found[i]:
            bufts.append(found[i])
            i += 1
    rng = np.random.default_rng(0)
    checks = []
    for type_name, ggml_type in PROBE_TYPES.items():
        weights = rng.standard_normal((PROBE_N, PROBE_K)).astype(np.float32)
        row = ggml.ggml_row_size(ggml_type, PROBE_K)
        packed = np.zeros(row * PROBE_N, dtype=np.uint8)
        ggml.ggml_quantize_chunk(ggml_type, weights.ctypes.data, packed.ctypes.data, 0,
                                 PROBE_N, PROBE_K, None)  # fmt: skip
        reference = weights.copy()  # f32 has no conversion
        traits = ggml.ggml_get_type_traits(ggml_type).contents
        if traits.to_float:
            _TO_FLOAT(traits.to_float)(packed.ctypes.data, reference.ctypes.data, weights.size)
        for buft in bufts:
            buft_name = ggml.ggml_backend_buft_name(buft).decode()
            for rows in PROBE_ROWS:
                check = f"{type_name}/{buft_name}/{rows}"
                _emit(check=check)  # names the product a crash happens in
                x = rng.standard_normal((rows, PROBE_K)).astype(np.float32)
                y = _matmul(ggml, dev, backend, buft, host, ggml_type, packed, x, np)
                if y is None:  # this buffer type does not take this type: llama.cpp neither
                    continue
                want = x.astype(np.float64) @ reference.T.astype(np.float64)
                err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
                if not err <= PROBE_TOLERANCE:
                    raise _WrongResult(
                        f"wrong results in the probe ({type_name} weights in {buft_name}, "
                        f"{rows} rows: relative error {err:.3g})"
                    )
                checks.append(check)
    ggml.ggml_backend_free(backend)  # (a failed probe leaves it to the child's exit)
    return checks


def _matmul(ggml, dev, backend, buft, host, ggml_type, packed, x, np):
    """``x @ W.T`` with the packed weights ``W`` in buffer type ``buft``; ``None`` where the
    device does not run that product from that buffer type."""
    overhead = ggml.ggml_tensor_overhead() * 8 + ggml.ggml_graph_overhead()
    wctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead() * 2, None, True))
    ctx = ggml.ggml_init(_InitParams(overhead, None, True))
    wbuf = buf = None
    try:
        w = ggml.ggml_new_tensor_2d(wctx, ggml_type, PROBE_K, PROBE_N)
        wbuf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
        if not wbuf:
            return None
        xt = ggml.ggml_new_tensor_2d(ctx, 0, PROBE_K, x.shape[0])
        out = ggml.ggml_mul_mat(ctx, w, xt)
        if not ggml.ggml_backend_dev_supports_op(dev, out):
            return None
        graph = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(graph, out)
        buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, host)
        if not buf:
            raise MemoryError("the probe's activations could not be allocated")
        ggml.ggml_backend_tensor_set(w, packed.ctypes.data, 0, packed.nbytes)
        ggml.ggml_backend_tensor_set(xt, x.ctypes.data, 0, x.nbytes)
        if ggml.ggml_backend_graph_compute(backend, graph) != 0:
            raise _WrongResult("the probe's matrix product failed to compute")
        y = np.zeros((x.shape[0], PROBE_N), dtype=np.float32)
        ggml.ggml_backend_tensor_get(out, y.ctypes.data, 0, y.nbytes)
        return y
    finally:
        for b in (buf, wbuf):
            if b:
                ggml.ggml_backend_buffer_free(b)
        ggml.ggml_free(ctx)
        ggml.ggml_free(wctx)


if __name__ == "__main__":
    if sys.argv[1:2] != ["probe"] or len(sys.argv) < 3:
        sys.exit("usage: ggml_cpu_probe.py probe REGISTRY_LIBRARY VARIANT_LIBRARY...")
    sys.exit(_probe_main(sys.argv[2], sys.argv[3:]))
