"""Export a LLaVA-family checkpoint to an edge artifact and prove it matches PyTorch.

    from edgekd.export import ExportConfig, export
    manifest = export(ExportConfig("runs/student", target="onnx", precision="int8",
                                   output=Path("artifacts/student-int8")))

:func:`export` checks the request before loading anything heavy, loads the checkpoint in fp32,
and runs the exporter's phases (``export`` -> ``validate``) inside
:func:`edgekd.outputs.guarded_dir`, writing ``manifest.json`` last: the output directory
appears complete and proven, or not at all (a parity failure, a full disk or an interrupt
leave nothing behind).
"""

from __future__ import annotations

from typing import Any

from edgekd import artifact
from edgekd.export.base import (
    ExportConfig,
    Exporter,
    ExportError,
    ParityError,
    get_exporter,
)
from edgekd.models.checkpoint import load_config, require_chat_template, resolve_checkpoint
from edgekd.outputs import guarded_dir

__all__ = [
    "ExportConfig",
    "ExportError",
    "Exporter",
    "ParityError",
    "export",
    "get_exporter",
]


def export(config: ExportConfig) -> dict[str, Any]:
    """Export ``config.checkpoint`` to ``config.output`` and return the written manifest.

    Raises:
        ExportError: unknown target or precision (listing the valid ones), an unsupported
            architecture or option, or a missing package; all problems at once.
        OutputExistsError: ``output`` exists and ``overwrite`` is not set.
        OutputError: ``output`` is a file, overlaps the checkpoint or eval data, or another
            run is writing it.
        ModelError: the checkpoint is missing or not a LLaVA-family VLM.
        ParityError: the artifact does not match PyTorch (numbers in the message).
    """
    from edgekd.models import VLM  # torch

    exporter = get_exporter(config.target)
    problems = []
    if config.precision not in exporter.precisions:
        problems.append(
            f"unknown precision '{config.precision}' for target '{config.target}'; "
            f"valid: {', '.join(exporter.precisions)}"
        )
    if config.n_parity_prompts < 1 or config.max_new_tokens < 1:
        problems.append("n_parity_prompts and max_new_tokens must be >= 1 (parity is not optional)")
    if problems:
        raise ExportError("; ".join(problems))
    _check_inputs(config)
    inputs = (config.checkpoint, config.eval_data, config.profile)
    # checked and locked before minutes of loading and tracing; replaced only when complete
    with guarded_dir(config.output, overwrite=config.overwrite, inputs=inputs) as tmp:
        vlm = VLM.from_pretrained(config.checkpoint, dtype="float32")
        exporter.check(vlm, config)
        components = exporter.export(vlm, config, tmp)
        parity = exporter.validate(vlm, config, tmp)
        return artifact.write(
            tmp,
            target=config.target,
            precision=config.precision,
            checkpoint=config.checkpoint,
            components=components,
            vlm=vlm,
            parity=parity,
            options=config.options,
        )


def _check_inputs(config: ExportConfig) -> None:
    """Fail before minutes of export, not in the parity checks after it: the chat template
    every artifact renders prompts with, the device profile, and every eval sample's image."""
    from edgekd.data.samples import checked_samples
    from edgekd.profiles import load_device_profile

    load_config(resolve_checkpoint(config.checkpoint))  # a LLaVA-family config, first
    require_chat_template(config.checkpoint)
    if config.profile is not None:
        load_device_profile(config.profile)  # an unknown name lists the valid ones
    if config.eval_data is not None:
        limit = max(config.eval_limit, config.n_parity_prompts)
        checked_samples(config.eval_data, limit=limit)
