"""Helpers shared by the export tests (tests/export is on sys.path; import by this name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llava_samples import COLOURS, image_sample, text_sample, write_samples
from PIL import Image


def write_eval_set(root: Path, n: int = 6) -> Path:
    """A small LLaVA eval set: coloured squares with a colour question, one text-only sample."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = COLOURS
    samples = []
    for i in range(n):
        name = list(colors)[i % 3]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        pixels[8 + i : 40 + i, 10:42] = colors[name]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(
            image_sample(f"e{i}", f"images/{i}.png", "What color is it?", name, "color")
        )
    samples.append(text_sample("text", "Say yes.", "yes"))
    return write_samples(root / "eval.json", samples)
