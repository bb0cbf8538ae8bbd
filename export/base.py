"""The exporter protocol, the registry, and the export driver shared by every target.

An exporter turns a LLaVA-family checkpoint into one artifact directory in three phases:

    check(vlm, config)            refuse early: unsupported precision, architecture, missing extra
    export(vlm, config, out)      write the files into ``out`` (a temporary directory)
    validate(vlm, config, out)    run the artifact against PyTorch; return the parity numbers

:func:`export` runs the phases inside :func:`edgekd.outputs.guarded_dir`, so the output appears
only when complete and proven; a parity failure raises :class:`ParityError` with the numbers and
leaves nothing behind. Every artifact directory carries ``manifest.json`` (see
:mod:`edgekd.artifact`). Targets are registered in :mod:`edgekd.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekd import targets
from edgekd.errors import EdgeKDError


class ExportError(EdgeKDError, ValueError):
    """The export cannot be done as asked (target, precision, architecture, missing package)."""


class ParityError(EdgeKDError, RuntimeError):
    """The artifact does not match the PyTorch model within tolerance.

    The message names every failed check with its numbers; ``report`` is the whole parity
    report (:func:`edgekd.export.parity.report`) when the failure came from the checks.
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportConfig:
    """What to export and how to prove it.

    Attributes:
        checkpoint: Source checkpoint (directory or hub id).
        target: Registered exporter name (``onnx``, ``gguf``, ``tensorrt``).
        precision: One of the exporter's ``precisions``.
        output: Artifact directory to create.
        profile: Device profile name (TensorRT shapes, workspace).
        overwrite: Replace an existing ``output``.
        n_parity_prompts: Sample prompts for greedy-decode agreement.
        max_new_tokens: Tokens decoded per parity prompt.
        eval_data: LLaVA JSON for the accuracy delta of quantized variants (optional).
        eval_limit: Samples of ``eval_data`` used.
        options: Target-specific settings (e.g. ``int4_block_size``), validated by the exporter.
    """

    checkpoint: str
    target: str
    precision: str
    output: Path
    profile: str | None = None
    overwrite: bool = False
    n_parity_prompts: int = 4
    max_new_tokens: int = 8
    eval_data: Path | None = None
    eval_limit: int = 200
    options: dict[str, Any] = field(default_factory=dict)


class Exporter(Protocol):
    """One export target's code; its name and precisions come from its registration
    (:mod:`edgekd.targets`)."""

    name: str
    precisions: tuple[str, ...]

    def check(self, vlm, config: ExportConfig) -> None:
        """Refuse early: unsupported architecture or option, missing package (all at once)."""
        ...

    def export(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Write the artifact; return ``{component: {"files": [...], "precision": p}}``."""
        ...

    def validate(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Compare with PyTorch (:mod:`edgekd.export.parity`); raise ParityError past tolerance."""
        ...


class Registered:
    """Base of the built-in exporters: ``name`` and ``precisions`` read from the registry."""

    target: str

    @property
    def name(self) -> str:
        return self.target

    @property
    def precisions(self) -> tuple[str, ...]:
        return targets.get(self.target).precisions


def get_exporter(target: str) -> Exporter:
    """The registered exporter for ``target``; an unknown name lists the valid ones."""
    if target not in targets.TARGETS:
        raise ExportError(f"unknown export target '{target}'; valid: {', '.join(targets.names())}")
    return targets.get(target).make_exporter()
