"""Export fixtures: the tiny checkpoint exported once per precision, shared by xdist workers.

Artifacts live in a directory every worker of the session sees (the parent of the per-worker
base temp under xdist) behind a file lock, so each precision is traced and validated once per
test session however the tests are distributed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from export_helpers import write_eval_set


def shared_dir(tmp_path_factory) -> Path:
    """A directory all xdist workers of this session share (the base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory, tiny_vlm):
    """``onnx_artifact(precision) -> Path``: the tiny model exported (int8 with an eval set)."""
    from filelock import FileLock

    from edgekd.export import ExportConfig, export

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
