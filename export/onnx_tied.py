"""The tied int8 table, stored once, and the int8 lm_head.

Tied tables at int8/int4: :func:`write_shared_table` stores the int8 table and its scales once
(``shared_embedding.data``); :func:`share_tied_embedding` and :func:`share_tied_lm_head` point
the embedding graph's Gather and the decoder's lm_head at that one file through ONNX external
data (same location, offset and length in both graphs). An untied lm_head gets its own int8
table (:func:`quantize_head_int8`); both quantize the head's input per token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.onnx_graph import FLOAT_TYPES, _initializers, prune, quantize_rows_int8

# ---- the tied table, stored once -----------------------------------------------------------
# With tied embeddings (int8/int4) the embedding graph and the decoder's lm_head read one int8
# table and one fp32 scale vector from one external data file. Layout [hidden, vocab] int8 (the
# MatMulInteger B layout, K x N) with one scale per vocab entry (per row of the embedding = per
# output channel of the lm_head): the lm_head is exactly the dynamic-int8 subgraph
# ``quantize_dynamic`` writes (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, fused to
# DynamicQuantizeMatMul by onnxruntime), so decode speed is that of an untied int8 head; the
# embedding gathers columns (axis 1) and transposes, a strided read that costs ~25 ms per 600
# prefill tokens on the 0.5B table and microseconds per decoded token.
SHARED_DATA = "shared_embedding.data"
SHARED_TABLE = "shared.embed_tokens.int8_T"  # [hidden, vocab] int8
SHARED_SCALE = "shared.embed_tokens.scale"  # [vocab] fp32
_ALIGN = 4096


def write_shared_table(path: str | Path, q_t: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """Write ``q_t`` ([hidden, vocab] int8) and ``scale`` ([vocab] fp32) to one data file.

    Returns:
        ``{initializer name: TensorProto}`` of external references to the file (no bytes in
        them), for :func:`share_tied_embedding` and :func:`share_tied_lm_head` to add to
        either graph.
    """
    from onnx import TensorProto

    path = Path(path)
    refs: dict[str, Any] = {}
    offset = 0
    with open(path, "wb") as f:
        for name, array, dtype in (
            (SHARED_TABLE, np.ascontiguousarray(q_t, dtype=np.int8), TensorProto.INT8),
            (SHARED_SCALE, np.ascontiguousarray(scale, dtype=np.float32), TensorProto.FLOAT),
        ):
            pad = -offset % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = array.tobytes()
            f.write(data)
            t = TensorProto(name=name, data_type=dtype, dims=list(array.shape))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", offset), ("length", len(data))):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            refs[name] = t
            offset += len(data)
    return refs


def _add_refs(model, refs: dict[str, Any]) -> None:
    for t in refs.values():
        model.graph.initializer.add().CopyFrom(t)


def share_tied_embedding(model, refs: dict[str, Any]) -> str:
    """Make the embedding Gather read the shared [hidden, vocab] int8 table.

    ``Gather(W, ids)`` becomes ``Cast(Transpose(Gather(W_q_T, ids, axis=1))) *
    Unsqueeze(Gather(scale, ids), -1)``.

    Returns:
        The name of the float table replaced.

    Raises:
        ValueError: the graph has not exactly one Gather on a float 2-D initializer.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    gathers = [
        n
        for n in model.graph.node
        if n.op_type == "Gather"
        and n.input[0] in inits
        and inits[n.input[0]].data_type in FLOAT_TYPES
        and len(inits[n.input[0]].dims) == 2
    ]
    if len(gathers) != 1:
        raise ValueError(f"expected one embedding Gather, found {len(gathers)}")
    node = gathers[0]
    table, ids, out, name = node.input[0], node.input[1], node.output[0], node.name
    rank = _rank(model, ids)
    axes = f"{name}.axes"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    _add_refs(model, refs)
    new = [
        helper.make_node("Gather", [SHARED_TABLE, ids], [f"{out}.qT"], name=f"{name}_q", axis=1),
        helper.make_node(
            "Transpose",
            [f"{out}.qT"],
            [f"{out}.q"],
            name=f"{name}_t",
            perm=[*range(1, rank + 1), 0],
        ),
        helper.make_node(
            "Cast", [f"{out}.q"], [f"{out}.f"], name=f"{name}_cast", to=TensorProto.FLOAT
        ),
        helper.make_node("Gather", [SHARED_SCALE, ids], [f"{out}.s1"], name=f"{name}_s"),
        helper.make_node("Unsqueeze", [f"{out}.s1", axes], [f"{out}.s"], name=f"{name}_s_u"),
        helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{name}_deq"),
    ]
    i = list(model.graph.node).index(node)
    nodes = list(model.graph.node)
    nodes[i : i + 1] = new
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    prune(model)
    return table


def _rank(model, name: str) -> int:
    for value in list(model.graph.input) + list(model.graph.value_info):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return 2


def head_weight(model, head: str) -> np.ndarray:
    """The float weight ([hidden, vocab]) of the MatMul node ``head``."""
    from onnx import numpy_helper

    node = next(n for n in model.graph.node if n.name == head)
    return numpy_helper.to_array(_initializers(model)[node.input[1]])


def share_tied_lm_head(model, head: str, refs: dict[str, Any]) -> None:
    """Replace the float lm_head MatMul ``head`` by per-token int8 on the shared table."""
    _add_refs(model, refs)
    _int8_head(model, head, SHARED_TABLE, SHARED_SCALE)
    prune(model)


def quantize_head_int8(model, head: str) -> None:
    """The float lm_head MatMul ``head`` to per-channel int8 weights (its own table) with
    per-token int8 activations."""
    from onnx import numpy_helper

    q, scale = quantize_rows_int8(head_weight(model, head).T)  # per vocab row
    table, scales = f"{head}.int8_T", f"{head}.scale"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(q.T), table),
            numpy_helper.from_array(scale, scales),
        ]
    )
    _int8_head(model, head, table, scales)
    prune(model)


def _int8_head(model, head: str, table: str, scales: str) -> None:
    """``MatMul(x, W)`` -> int8 ``x`` with one scale per token (symmetric, max|x|/127) times
    the int8 ``table`` ([hidden, vocab]) with one scale per vocab column.

    Per-token scales, not the one scale per tensor of onnxruntime's dynamic quantization: a real
    language model's final hidden states differ in size between positions, and one scale for
    all of them rounds the smaller ones away (measured on SmolLM2-135M, docs/performance.md).
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(model.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == head)
    x, out = nodes[i].input[0], nodes[i].output[0]
    p = f"{head}_pt"
    consts = {
        f"{p}.qmax": np.array(127.0, np.float32),
        f"{p}.offset": np.array(128.0, np.float32),
        f"{p}.zp": np.array(128, np.uint8),
        f"{p}.tiny": np.array(1e-30, np.float32),
        f"{p}.axes": np.array([-1], np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    reduce = (
        helper.make_node("ReduceMax", [f"{p}.abs", f"{p}.axes"], [f"{p}.max"], name=f"{p}_max")
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{p}.abs"], [f"{p}.max"], name=f"{p}_max", axes=[-1])
    )
    nodes[i : i + 1] = [
        helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}_abs"),
        reduce,
        helper.make_node("Div", [f"{p}.max", f"{p}.qmax"], [f"{p}.s0"], name=f"{p}_s0"),
        helper.make_node("Max", [f"{p}.s0", f"{p}.tiny"], [f"{p}.s"], name=f"{p}_s"),
        helper.make_node("Div", [x, f"{p}.s"], [f"{p}.xs"], name=f"{p}_div"),
        helper.make_node("Round", [f"{p}.xs"], [f"{p}.xr"], name=f"{p}_round"),
        # stored as uint8 around 128 (u8 x s8 is onnxruntime's fast MatMulInteger path)
        helper.make_node("Add", [f"{p}.xr", f"{p}.offset"], [f"{p}.xu"], name=f"{p}_offset"),
        helper.make_node("Cast", [f"{p}.xu"], [f"{p}.xq"], name=f"{p}_q", to=TensorProto.UINT8),
        helper.make_node(
            "MatMulInteger", [f"{p}.xq", table, f"{p}.zp"], [f"{p}.acc"], name=f"{head}_quant"
        ),
        helper.make_node("Cast", [f"{p}.acc"], [f"{p}.f"], name=f"{p}_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}.f", f"{p}.s"], [f"{p}.fs"], name=f"{p}_mul_x"),
        helper.make_node("Mul", [f"{p}.fs", scales], [out], name=f"{head}_deq"),
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
