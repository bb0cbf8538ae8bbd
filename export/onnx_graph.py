"""Passes over exported ONNX graphs: saving, the tied-head bake, fp16 and int8/int4 weights.

Every pass takes and returns an ``onnx.ModelProto`` whose weights are in memory, so a pass
never depends on where the graph came from (torch.onnx, a quantizer, a file on disk). Saving
chooses one file, or one file plus one ``<file>.data`` when the weights pass the protobuf
limit.

The tied lm_head trap: with tied embeddings torch.onnx keeps one shared weight and a runtime
``Transpose`` in front of the lm_head ``MatMul`` when the embedding is in the same graph, and
both onnxruntime quantizers only take ``MatMul`` weights that are initializers, so they leave
the (vocab x hidden) output matrix in fp32 without a word. :func:`bake_transposed_weights`
turns every ``MatMul(x, Transpose(W))`` into ``MatMul(x, W_T)`` with ``W_T`` an initializer of
its own before any quantizer runs; :func:`float_weights` is the check that none is left. (In
edgekd's layout the embedding is its own graph, so torch.onnx's optimizer usually folds the
head's Transpose already and the bake finds nothing; it stays as the guard, and the manifest
records what it baked.)

The tied int8 table shared by the embedding and the lm_head, and the int8 lm_head itself, are
in :mod:`edgekd.export.onnx_tied`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.gptq import take

# Above this many bytes of weights a graph is saved with external data (protobuf stops at 2 GiB;
# the graph structure and small constants need room too).
EXTERNAL_DATA_BYTES = 1_800_000_000
FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
# RMSNorm/LayerNorm pieces and softmax stay fp32 in fp16 graphs: x**2 of Qwen2's outlier
# activations overflows fp16 (max 65504), as PyTorch's own fp16 RMSNorm upcasts to avoid.
FP16_KEEP_FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LayerNormalization")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.onnx's progress lines and the quantizers' root-logger warnings.

    The library prints nothing; the CLI layer renders.
    """
    names = (
        "",
        "torch.onnx",
        "torch.export",
        "torch._dynamo",
        "torch.__trace",
        "onnxscript",
        "onnx_ir",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load(path: str | Path):
    """Load a graph with its external data, if any, into memory."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def weight_bytes(model) -> int:
    """Bytes of all initializers (raw or typed fields)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else _typed_nbytes(t)
    return total


def save(model, path: str | Path) -> list[str]:
    """Save ``model`` as ``path`` (plus ``path.data`` past :data:`EXTERNAL_DATA_BYTES`).

    Returns:
        The file names written, relative to ``path``'s directory.
    """
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if weight_bytes(model) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return [path.name]
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [path.name, data.name]


# ---- structure ----------------------------------------------------------------------------
def _initializers(model) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _producers(model) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _uses(model) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def name_nodes(model) -> None:
    """Give every unnamed node a unique name (quantizers address nodes by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def prune(model) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses (repeat to a fixpoint)."""
    graph = model.graph
    while True:
        uses = _uses(model)
        dead = [n for n in graph.node if not any(uses.get(o, 0) for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    uses = _uses(model)
    for t in [t for t in graph.initializer if not uses.get(t.name, 0)]:
        graph.initializer.remove(t)


def head_matmul(model, output: str = "logits") -> str:
    """Name of the MatMul that produces ``output`` (through reshapes, casts or a bias add).

    Raises:
        ValueError: ``output`` does not come from a MatMul with a constant weight.
    """
    inits, producers = _initializers(model), _producers(model)
    node = producers.get(output)
    while node is not None and node.op_type in ("Reshape", "Identity", "Cast", "Add"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
        found = "nothing" if node is None else f"a {node.op_type}"
        raise ValueError(f"'{output}' comes from {found}, not a MatMul with a constant weight")
    return node.name


def bake_transposed_weights(model) -> list[str]:
    """Replace ``MatMul(x, Transpose(W))`` (W an initializer) by ``MatMul(x, W_T)``.

    Returns:
        Names of the new initializers (one per baked MatMul; empty when there was nothing to do).
    """
    from onnx import numpy_helper

    inits, producers = _initializers(model), _producers(model)
    baked: list[str] = []
    for node in model.graph.node:
        src = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in src.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(inits[src.input[0]])
        if weight.ndim != 2 or (perm and perm[0] != [1, 0]):
            continue
        name = f"{src.input[0]}.T"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            model.graph.initializer.append(inits[name])
        node.input[1] = name
        baked.append(name)
    prune(model)
    return baked


def float_weights(model, min_elements: int) -> list[tuple[str, tuple[int, ...]]]:
    """Float matrices of >= ``min_elements`` that a MatMul/Gemm multiplies by or a Gather reads,
    directly or through Transpose/Cast/Reshape/Identity (the tied-head path).

    Quantized weights (int8/int4 with their fp32 scales) are not reported.
    """
    inits, producers = _initializers(model), _producers(model)
    found: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        slot = {"MatMul": 1, "Gemm": 1, "Gather": 0}.get(node.op_type)
        if slot is None or len(node.input) <= slot:
            continue
        name = node.input[slot]
        while (
            name not in inits
            and name in producers
            and producers[name].op_type in ("Transpose", "Cast", "Reshape", "Identity")
        ):
            name = producers[name].input[0]
        t = inits.get(name)
        if t is None or t.data_type not in FLOAT_TYPES or sum(d > 1 for d in t.dims) < 2:
            continue  # quantized, or a vector of scales
        if int(np.prod(t.dims)) >= min_elements:
            found[name] = tuple(int(d) for d in t.dims)
    return sorted(found.items())


def strip_metadata(model) -> None:
    """Drop per-node stack traces and doc strings torch.onnx records (local paths, bulk)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


# ---- precisions ---------------------------------------------------------------------------
def to_fp16(model):
    """fp16 weights and compute; graph inputs/outputs (including the KV cache) stay fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    with quiet():
        return convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS),
            disable_shape_infer=weight_bytes(model) > EXTERNAL_DATA_BYTES,
        )


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``(q (R, C) int8, scale (R,) fp32)``, ``w ~= q * scale[:, None]``.

    scale = max|row| / 127 (1 for an all-zero row), q in [-127, 127].
    """
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_gather_int8(model) -> list[str]:
    """Embedding tables (Gather on a float initializer) to int8 with one fp32 scale per row.

    ``Gather(W, ids)`` becomes ``Cast(Gather(W_q, ids)) * Gather(scale, ids)``: symmetric
    per-row int8 (:func:`quantize_rows_int8`), dequantizing only the gathered rows.

    Returns:
        Names of the quantized tables.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    done, new_nodes = [], []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type not in FLOAT_TYPES or len(table.dims) != 2:
            new_nodes.append(node)
            continue
        q, scale = quantize_rows_int8(numpy_helper.to_array(table))
        base, ids, out = table.name, node.input[1], node.output[0]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}.int8"),
                numpy_helper.from_array(scale[:, None], f"{base}.scale"),
            ]
        )
        new_nodes += [
            helper.make_node("Gather", [f"{base}.int8", ids], [f"{out}.q"], name=f"{node.name}_q"),
            helper.make_node(
                "Cast", [f"{out}.q"], [f"{out}.f"], name=f"{node.name}_cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [f"{base}.scale", ids], [f"{out}.s"], name=f"{node.name}_s"),
            helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{node.name}_deq"),
        ]
        done.append(base)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    prune(model)
    return done


def quantize_int8(model, *, nodes: list[str] | None = None, exclude: list[str] | None = None):
    """Dynamic int8: MatMul weights to per-channel int8, activations quantized at run time.

    Args:
        model: The fp32 graph.
        nodes: Quantize only these MatMul nodes (all with constant weights when ``None``).
        exclude: Never quantize these nodes.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgekd-int8-") as tmp, quiet():
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save(model, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            nodes_to_exclude=exclude,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
        return load(dst)


def quantize_nbits(
    model, *, bits: int, block_size: int, accuracy_level: int | None, exclude: list[str]
):
    """Weight-only int4 or int8 (MatMulNBits, symmetric, ``block_size`` weights per fp32
    scale along the input dimension); ``accuracy_level`` 4 quantizes activations to int8 per
    block at run time, 0 or None computes in fp32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
    )
    with quiet():
        quantizer.process()
    return quantizer.model.model


def pack_nbits(q: np.ndarray, zero: np.ndarray, bits: int, group: int):
    """``MatMulNBits``' ``B`` ``[N, blocks, group * bits / 8]`` and ``zero_points`` from
    levels ``q`` ``[N, K_padded]`` and ``zero`` ``[N, blocks]`` (4 bits: two per byte, low
    nibble first)."""
    n, k = q.shape
    q = q.reshape(n, k // group, group).astype(np.uint8)
    zero = zero.astype(np.uint8)
    if bits == 8:
        return q, zero
    if zero.shape[1] % 2:
        zero = np.pad(zero, ((0, 0), (0, 1)))
    return q[..., 0::2] | (q[..., 1::2] << 4), zero[:, 0::2] | (zero[:, 1::2] << 4)


def write_nbits(model, weights: dict[str, list[Any]], *, accuracy_level: int | None, exclude):
    """Replace every ``MatMul`` with a 2-D constant weight (but ``exclude``) by ``MatMulNBits``
    holding the precomputed blocks of that weight (:class:`edgekd.export.gptq.BlockQuantized`,
    looked up by :func:`edgekd.export.gptq.weight_key` of the ``[out, in]`` weight).

    Raises:
        ValueError: a weight has no precomputed blocks (the graph is not of that model).
    """
    from onnx import helper, numpy_helper

    name_nodes(model)
    inits = _initializers(model)
    pending = {key: list(blocks) for key, blocks in weights.items()}
    replaced = 0
    for i, node in enumerate(list(model.graph.node)):
        if node.op_type != "MatMul" or node.name in exclude or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2:
            continue
        block = take(pending, w.T)
        if block is None:
            raise ValueError(f"no quantized blocks for {node.name}'s weight {tuple(w.shape)}")
        packed, zero = pack_nbits(block.q, block.zero, block.bits, block.group)
        base = f"{node.input[1]}_nbits{block.bits}"
        tensors = (
            numpy_helper.from_array(packed, f"{base}_B"),
            numpy_helper.from_array(block.scale.astype(np.float32), f"{base}_scales"),
            numpy_helper.from_array(zero, f"{base}_zero_points"),
        )
        model.graph.initializer.extend(tensors)
        attrs = {"K": int(w.shape[0]), "N": int(w.shape[1]), "bits": block.bits}
        attrs["block_size"] = block.group
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        new = helper.make_node(
            "MatMulNBits",
            [node.input[0], *(t.name for t in tensors)],
            list(node.output),
            name=f"{node.name}_Q{block.bits}",
            domain="com.microsoft",
            **attrs,
        )
        model.graph.node.remove(node)
        model.graph.node.insert(i, new)
        replaced += 1
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    prune(model)
    return replaced


def count_ops(model, *op_types: str) -> int:
    return sum(n.op_type in op_types for n in model.graph.node)


def _typed_nbytes(t) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * {1: 4, 10: 2, 11: 8, 16: 2, 3: 1, 2: 1, 6: 4, 7: 8, 9: 1}.get(t.data_type, 4)
