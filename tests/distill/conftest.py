"""Distillation fixtures: a small LLaVA dataset on disk and tiny teacher/student checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from distill_helpers import FAST, write_dataset


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
