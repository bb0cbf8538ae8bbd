"""What the tensorrt target needs of parity beyond :mod:`edgekd.export.parity`: its sample
prompts as tensors (calibration, the vision fallback decision) and the visual-token parity of one
vision engine file, checked while building (fp16 first, fp32 norms when it falls short)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgekd.export.parity import cases, compare
from edgekd.runtime.tensorrt import EngineRunner, load_engines


def sample_inputs(vlm, config, n: int | None = None, offset: int = 0) -> list[dict]:
    """The parity cases as tensors; ``offset`` > 0 draws synthetic images with other seeds
    (calibration data apart from the parity prompts).

    Returns:
        Dicts with ``input_ids`` (LongTensor (L,), image tokens expanded) and ``pixel_values``
        ((3, H, W) float, or ``None`` for a text-only case).
    """
    import torch

    out = []
    for case in cases(vlm, config, n, seed=offset):
        pixels = case.pixel_values
        out.append(
            {
                "input_ids": torch.from_numpy(case.input_ids[0]),
                "pixel_values": None if pixels is None else torch.from_numpy(pixels[0]),
            }
        )
    return out


def vision_engine_parity(vlm, engine_path: Path, samples: Sequence[dict]) -> dict[str, float]:
    """Worst visual-token parity of one vision engine file over the samples' images."""
    import torch

    (engine,), keep = load_engines([engine_path])
    runner = EngineRunner(engine, label=engine_path.name)
    worst: dict[str, float] = {}
    for s in samples:
        if s["pixel_values"] is not None:
            (got,) = runner({"pixel_values": s["pixel_values"][None]}).values()
            with torch.no_grad():
                pv = s["pixel_values"][None].to(vlm.device)
                ref = vlm.project(vlm.vision_features(pv))
            r = compare(got, ref)
            worst = {
                "max_abs": max(worst.get("max_abs", 0.0), r["max_abs"]),
                "cosine_min": min(worst.get("cosine_min", 1.0), r["cosine_min"]),
            }
    del runner, engine, keep  # free the engine before the next build
    return worst
