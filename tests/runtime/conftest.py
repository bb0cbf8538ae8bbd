"""Runtime fixtures: the tiny model's fp32 ONNX artifact, exported once per test session.

Shares the directory, lock and naming of ``tests/export/conftest.py``, so under xdist the
export and runtime tests reuse one artifact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def onnx_fp32_artifact(tmp_path_factory, tiny_vlm) -> Path:
    from edgekd.export import ExportConfig, export
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-shared"
    root.mkdir(exist_ok=True)
    out = root / "tiny-fp32"
    with FileLock(str(root / "lock")):
        checkpoint = root / "checkpoint"
        if not checkpoint.exists():
            tiny_vlm.save_pretrained(checkpoint)
        if not (out / "manifest.json").exists():
            export(
                ExportConfig(
                    str(checkpoint), "onnx", "fp32", out, n_parity_prompts=3, max_new_tokens=6
                )
            )
    return out
