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
    from filelock import FileLock

    from edgekd.export import ExportConfig, export

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


@pytest.fixture(scope="session")
def contrast_vlm(tokenizer):
    """The tiny VLM with its weight matrices scaled x4: unscaled, a random tiny model answers
    one repeated token whatever it sees; scaled, answers depend on the image and the prompt."""
    import torch

    from edgekd.models import build_vlm

    vlm = build_vlm("tiny", tokenizer=tokenizer, seed=0)
    with torch.no_grad():
        for p in vlm.model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return vlm


@pytest.fixture(scope="session")
def gguf_f32_artifact(contrast_vlm, tmp_path_factory) -> Path:
    """``contrast_vlm`` as an f32 gguf artifact with its manifest (the exporter's own tests
    validate parity; these tests use it as a fixed artifact)."""
    pytest.importorskip("llama_cpp")
    from edgekd import artifact as manifest
    from edgekd.export.base import ExportConfig
    from edgekd.export.gguf import GgufExporter

    out = tmp_path_factory.mktemp("llamacpp") / "f32"
    config = ExportConfig(checkpoint="contrast-tiny", target="gguf", precision="f32", output=out)
    exporter = GgufExporter()
    exporter.check(contrast_vlm, config)
    components = exporter.export(contrast_vlm, config, out)
    manifest.write(
        out,
        target="gguf",
        precision="f32",
        checkpoint="contrast-tiny",
        components=components,
        vlm=contrast_vlm,
        parity={},
    )
    return out


@pytest.fixture(scope="session")
def contrast_checkpoint(contrast_vlm, tmp_path_factory) -> Path:
    """``contrast_vlm`` saved as an ``edgekd distill`` run directory (the student in model/)."""
    run = tmp_path_factory.mktemp("contrast") / "run"
    contrast_vlm.save_pretrained(run / "model")
    return run


@pytest.fixture(scope="session")
def contrast_onnx_artifact(contrast_checkpoint, tmp_path_factory) -> Path:
    """``contrast_vlm`` exported to fp32 ONNX (parity checked by the export)."""
    from edgekd.export import ExportConfig, export

    out = tmp_path_factory.mktemp("contrast-onnx") / "fp32"
    export(
        ExportConfig(
            str(contrast_checkpoint), "onnx", "fp32", out, n_parity_prompts=2, max_new_tokens=6
        )
    )
    return out
