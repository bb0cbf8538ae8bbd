"""Helpers shared by the export tests (tests/export is on sys.path; import by this name)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
