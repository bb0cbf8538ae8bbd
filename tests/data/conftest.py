"""Fixtures for the data layer: one tiny VLM per session, small image folders per test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def data_vlm():
    """This folder's own tiny VLM (64 px images, 16 visual tokens, ChatML), which its tests pin."""
    from edgekd.models import build_vlm

    return build_vlm("tiny", seed=0)


@pytest.fixture(scope="session")
def processor(data_vlm):
    return data_vlm.processor


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """``tmp_path/root``: a.png, b.png (64x64), sub/c.png (40x30) and a corrupt bad.png."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (64, 64), "b.png": (64, 64), "sub/c.png": (30, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return root


@pytest.fixture
def write_json(tmp_path: Path):
    """Write an object (or raw text) as ``tmp_path/<name>`` and return the path."""

    def write(obj, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
        return path

    return write
