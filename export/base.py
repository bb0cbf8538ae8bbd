"""The exporter protocol, the registry, and the export driver shared by every target.

An exporter turns a LLaVA-family checkpoint into one artifact directory in three phases:

    check(vlm, config)            refuse early: unsupported precision, architecture, missing extra
    export(vlm, config, out)      write the files into ``out`` (a temporary directory)
    validate(vlm, config, out)    run the artifact against PyTorch; return the parity numbers

:func:`export` runs the phases inside :func:`edgekd.io.atomic_dir`, so the output appears only
when complete and proven; a parity failure raises :class:`ParityError` with the numbers and
leaves nothing behind. Every artifact directory carries ``manifest.json`` (see
:mod:`edgekd.export.manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekd.errors import EdgeKDError


class ExportError(EdgeKDError, ValueError):
    """The export cannot be done as asked (target, precision, architecture, missing package)."""


class ParityError(EdgeKDError, RuntimeError):
    """The artifact does not match the PyTorch model within tolerance (numbers in the message)."""


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
    """One export target."""

    name: str
    precisions: tuple[str, ...]

    def check(self, vlm, config: ExportConfig) -> None: ...

    def export(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Write the artifact; return ``{component: {"files": [...], "precision": p}}``."""
        ...

    def validate(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Compare with PyTorch; return parity results; raise ParityError past tolerance."""
        ...


EXPORTERS: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    """Add an exporter instance to the registry under its ``name``."""
    EXPORTERS[exporter.name] = exporter
    return exporter


def get_exporter(target: str) -> Exporter:
    """The registered exporter for ``target``; an unknown name lists the valid ones."""
    _load_builtin_exporters()
    if target not in EXPORTERS:
        raise ExportError(
            f"unknown export target '{target}'; valid: {', '.join(sorted(EXPORTERS))}"
        )
    return EXPORTERS[target]


def _load_builtin_exporters() -> None:
    # Importing a target module registers it; heavy imports stay inside its methods.
    import importlib

    for module in ("onnx", "gguf", "tensorrt"):
        try:
            importlib.import_module(f"edgekd.export.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"edgekd.export.{module}":
                raise
