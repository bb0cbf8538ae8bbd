"""Question-type subsets of a LLaVA file: written once beside it, refused when empty."""

from __future__ import annotations

import json

import pytest

from edgekd.data import load_llava_json, subset_by_type
from edgekd.errors import DataError


def _sample(i: int, qtype: str) -> dict:
    return {
        "id": f"q{i}",
        "question_type": qtype,
        "conversations": [
            {"from": "human", "value": "Question?"},
            {"from": "gpt", "value": "answer"},
        ],
    }


def test_subset_is_written_once_and_keeps_only_the_types(tmp_path):
    src = tmp_path / "test.json"
    src.write_text(json.dumps([_sample(0, "color"), _sample(1, "yes/no"), _sample(2, "shape")]))
    out = subset_by_type(src, ["color", "shape"])
    assert out == tmp_path / "test.color-shape.json"
    assert [s["id"] for s in load_llava_json(out)] == ["q0", "q2"]
    stamp = out.stat().st_mtime_ns
    assert subset_by_type(src, ["color", "shape"]) == out and out.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="no sample has question_type"):
        subset_by_type(src, ["count"])
