"""LLaVA-format samples for the tests' small datasets (one place for the conversation layout)."""

from __future__ import annotations

import json
from pathlib import Path

# the colours of the tests' coloured-square images
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def image_sample(sid: str, image: str, question: str, answer: str, question_type=None) -> dict:
    """One ``<image>`` question and its answer; ``question_type`` when the eval needs it."""
    sample: dict = {"id": sid, "image": image}
    if question_type is not None:
        sample["question_type"] = question_type
    sample["conversations"] = [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    return sample


def text_sample(sid: str, question: str, answer: str) -> dict:
    """One question without an image."""
    return {
        "id": sid,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
    }


def write_samples(path: Path, samples: list[dict]) -> Path:
    path.write_text(json.dumps(samples))
    return path
