"""Distillation fixtures: a small LLaVA dataset on disk and tiny teacher/student checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")


def write_dataset(root: Path, n: int = 24, text_only: int = 4, seed: int = 0) -> Path:
    """``n`` image questions (coloured squares) plus ``text_only`` questions without an image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        color = COLORS[i % 3]
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[color]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        x, y = rng.integers(4, 30, size=2)
        pixels[y : y + 24, x : x + 24] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(
            {
                "id": f"s{i}",
                "image": f"images/{i}.png",
                "question_type": "color",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    for i in range(text_only):
        samples.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": "Is red a color?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(samples))
    return path


@pytest.fixture(scope="session")
def distill_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("distill-data"))


@pytest.fixture(scope="session")
def teacher_ckpt(small_vlm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "small"
    small_vlm.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def student_ckpt(tiny_vlm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student") / "tiny"
    tiny_vlm.save_pretrained(path)
    return path


FAST = {
    "training.max_steps": 3,
    "training.global_batch_size": 4,
    "training.per_device_batch_size": 4,
    "training.max_length": 64,
    "training.learning_rate": 1e-3,
    "loss.top_n": 32,
    "loss.k_max": 8,
}


@pytest.fixture
def job_factory(tmp_path, teacher_ckpt, student_ckpt, distill_data):
    """A ``DistillJob`` for a 3-step run on the tiny data, with keyword overrides."""
    from edgekd.distill.run import DistillJob

    def make(method: str = "switch-kd", **kwargs) -> DistillJob:
        overrides = {**FAST, **kwargs.pop("overrides", {})}
        fields = dict(
            output=tmp_path / f"run-{method}",
            recipe="easyvqa-cpu",
            method=method,
            teacher=None if method == "sft" else str(teacher_ckpt),
            student=str(student_ckpt),
            data=distill_data,
            overrides=overrides,
            logging_steps=1,
            save_steps=2,
            device="cpu",
        )
        fields.update(kwargs)
        return DistillJob(**fields)

    return make
