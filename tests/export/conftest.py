"""Export fixtures: the tiny checkpoint exported once per precision, shared by xdist workers.

Artifacts live in a directory every worker of the session sees (the parent of the per-worker
base temp under xdist) behind a file lock, so each precision is traced and validated once per
test session however the tests are distributed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_eval_set(root: Path, n: int = 6) -> Path:
    """A small LLaVA eval set: coloured squares with a colour question, one text-only sample."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    samples = []
    for i in range(n):
        name = list(colors)[i % 3]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        pixels[8 + i : 40 + i, 10:42] = colors[name]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(
            {
                "id": f"e{i}",
                "image": f"images/{i}.png",
                "question_type": "color",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    samples.append(
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "Say yes."},
                {"from": "gpt", "value": "yes"},
            ],
        }
    )
    path = root / "eval.json"
    path.write_text(json.dumps(samples))
    return path


def shared_dir(tmp_path_factory) -> Path:
    """A directory all xdist workers of this session share (the base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory, tiny_vlm):
    """``onnx_artifact(precision) -> Path``: the tiny model exported (int8 with an eval set)."""
    from edgekd.export import ExportConfig, export
    from filelock import FileLock

    root = shared_dir(tmp_path_factory)

    def get(precision: str) -> Path:
        out = root / f"tiny-{precision}"
        with FileLock(str(root / "lock")):
            checkpoint = root / "checkpoint"
            if not checkpoint.exists():
                tiny_vlm.save_pretrained(checkpoint)
            eval_data = root / "eval" / "eval.json"
            if not eval_data.exists():
                write_eval_set(root / "eval")
            if not (out / "manifest.json").exists():
                export(
                    ExportConfig(
                        str(checkpoint),
                        "onnx",
                        precision,
                        out,
                        n_parity_prompts=3,
                        max_new_tokens=6,
                        eval_data=eval_data if precision == "int8" else None,
                    )
                )
        return out

    return get
