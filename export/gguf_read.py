"""Reading a written GGUF back: its tensor table, the types the weights actually got (and why
some are not the precision's), and a guard against silently empty or partial files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.base import ExportError
from edgekd.export.gguf_write import LM_HEAD, PRECISIONS, import_gguf


def tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """Per tensor: GGML type name, shape (ggml order: row size first) and bytes."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: {
            "type": gguf.GGMLQuantizationType(int(t.tensor_type)).name,
            "shape": [int(x) for x in t.shape],
            "bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    }


def quant_report(table: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    """Type counts, the share of weights per type, and the weight matrices not of the
    precision's intended types: those whose rows its blocks cannot divide (``fallbacks``) and
    those llama.cpp's quantizer keeps at a higher type by its own rules (``kept_higher``)."""
    counts: dict[str, int] = {}
    for info in table.values():
        counts[info["type"]] = counts.get(info["type"], 0) + 1
    q = PRECISIONS[precision]
    # edgekd-written precisions keep the embedding (and an untied output) at Q8_0 by design
    tables = ("token_embd.weight", LM_HEAD["weight"]) if q is not None and q.grid else ()
    fallbacks, kept, unquantized = {}, {}, []
    for name, info in table.items():
        if len(info["shape"]) < 2 or q is None:
            continue
        if info["type"] not in q.types and name not in tables:
            entry = {"type": info["type"], "row_size": info["shape"][0]}
            # rows the intended types cannot block fall back; others are llama.cpp's mixture
            # (its quantizer keeps some tensors, e.g. the output matrix, at a higher type)
            (fallbacks if info["shape"][0] % q.block else kept)[name] = entry
        if info["type"] in ("F32", "F16", "BF16") and "BF16" not in q.types:
            unquantized.append(name)
    sizes = _matrix_sizes(table)
    report = {
        "tensor_types": {n: i["type"] for n, i in table.items()},
        "type_counts": counts,
        "weight_share": weight_share(table),
    }
    if q is not None:
        report["fallbacks"] = {
            "count": len(fallbacks),
            "reason": f"row size not a multiple of {q.block} (the block of "
            f"{'/'.join(sorted(q.types))}); llama.cpp picked the type shown",
            "tensors": fallbacks,
        }
        report["unquantized_matrices"] = unquantized
        report["kept_higher"] = kept
        # the weights not in a fallback (edgekd's own Q8_0 tables count as asked)
        fell = sum(sizes[n] for n in fallbacks)
        report["share_as_asked"] = round(1 - fell / (sum(sizes.values()) or 1), 4)
    if tables:
        report["q8_0_tables"] = [n for n in tables if n in table]
    return report


def _matrix_sizes(table: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Elements of each weight matrix (tensors of 2 dimensions or more)."""
    return {n: int(np.prod(i["shape"])) for n, i in table.items() if len(i["shape"]) >= 2}


def weight_share(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The share of the weight matrices' elements stored in each type, largest first."""
    by_type: dict[str, int] = {}
    for name, n in _matrix_sizes(table).items():
        by_type[table[name]["type"]] = by_type.get(table[name]["type"], 0) + n
    total = sum(by_type.values()) or 1
    return {t: round(n / total, 4) for t, n in sorted(by_type.items(), key=lambda kv: -kv[1])}


def check_written(path: Path, expected: dict[str, np.ndarray], what: str) -> dict[str, Any]:
    """Guard against silently empty or partial files (the known 1 KB mmproj failure)."""
    table = tensor_table(path)
    missing = sorted(set(expected) - set(table))
    if missing:
        raise ExportError(
            f"{path.name}: {len(missing)} {what} tensor(s) missing, e.g. {missing[:3]}"
        )
    payload = sum(i["bytes"] for i in table.values())
    size = path.stat().st_size
    expected_min = sum(a.size for a in expected.values()) // 8  # >= 1 bit per weight even at q4
    if size < payload or payload < expected_min:
        raise ExportError(
            f"{path.name} is {size} bytes for {payload} bytes of tensor data (expected at least "
            f"{expected_min}); the file is truncated or lost its tensors"
        )
    return table
