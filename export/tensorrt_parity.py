"""Parity of TensorRT engines with the PyTorch model: sample prompts, numbers, verdicts.

Used by :mod:`edgekd.export.tensorrt` while building (the fp16 vision check that decides the
fp32 fallback) and in ``validate``. PyTorch runs where the model is; comparisons run in float32
on the CPU. Visual tokens and logits are compared per row (token / position) by cosine
similarity and max abs difference; greedy decoding by the common prefix of the token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd.export.base import ParityError

LOGIT_POSITIONS = 16  # prefill logits compared at the last positions (full vocab rows are big)


def sample_inputs(vlm, config, n: int | None = None, offset: int = 0) -> list[dict]:
    """Encoded prompts with images: the onnx exporter's parity cases, or fresh synthetic ones.

    Cases come from ``config.eval_data`` when given, else from deterministic synthetic images
    (:func:`edgekd.export.onnx_parity.parity_cases`); ``offset`` > 0 draws synthetic images
    with other seeds (calibration data apart from the parity prompts). Prompts are encoded by
    the backends' own :func:`edgekd.runtime.onnxruntime.encode_prompt`.

    Returns:
        Dicts with ``input_ids`` (LongTensor (L,), image tokens expanded) and ``pixel_values``
        ((3, H, W) float, or ``None`` for a text-only case).
    """
    import dataclasses

    import torch
    from edgekd.export.onnx_parity import QUESTIONS, parity_cases, synthetic_image
    from edgekd.runtime.onnxruntime import encode_prompt

    n = n or config.n_parity_prompts
    if config.eval_data is not None or offset == 0:
        cases = parity_cases(vlm, dataclasses.replace(config, n_parity_prompts=n))
    else:
        size = vlm.processor.image_processor.size
        wh = (size["width"], size["height"])
        cases = [(synthetic_image(offset + i, wh), QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    out = []
    for image, question in cases:
        ids, pixels = encode_prompt(vlm.processor, image, question)
        out.append(
            {
                "input_ids": torch.from_numpy(ids[0]),
                "pixel_values": None if pixels is None else torch.from_numpy(pixels[0]),
            }
        )
    return out


def compare(reference, actual) -> dict[str, float]:
    """Max abs difference and per-row cosine similarity (rows: all but the last dimension).

    Raises:
        ParityError: the shapes differ.
    """
    import torch

    ref, act = reference.detach().float().cpu(), actual.detach().float().cpu()
    if ref.shape != act.shape:
        raise ParityError(f"shape {tuple(act.shape)} differs from PyTorch's {tuple(ref.shape)}")
    cos = torch.nn.functional.cosine_similarity(
        ref.reshape(-1, ref.shape[-1]), act.reshape(-1, act.shape[-1]), dim=-1, eps=1e-12
    )
    return {
        "max_abs": float((ref - act).abs().max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
    }


def token_agreement(reference: Sequence[int], actual: Sequence[int]) -> float:
    """Length of the common prefix of two greedy outputs over the reference's length."""
    n = 0
    for a, b in zip(reference, actual):
        if a != b:
            break
        n += 1
    return n / max(len(reference), 1)


def worst(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """The worst of several :func:`compare` results (largest diff, smallest cosine)."""
    if not results:
        return {}
    return {
        "max_abs": max(r["max_abs"] for r in results),
        "cosine_min": min(r["cosine_min"] for r in results),
        "cosine_mean": sum(r["cosine_mean"] for r in results) / len(results),
    }


def engine_parity(vlm, backend, samples: Sequence[dict], max_new_tokens: int) -> dict[str, Any]:
    """Visual tokens, prefill logits and greedy tokens of a TensorRT backend against PyTorch."""
    vision, logits, agreement = [], [], []
    for s in samples:
        ids, pv = s["input_ids"], s["pixel_values"]
        if pv is not None:
            vision.append(compare(reference_visual(vlm, pv), backend.visual_tokens(pv[None])))
        ref, got = reference_logits(vlm, ids, pv), backend.prefill_logits(ids, pv)
        logits.append(compare(ref[:, -LOGIT_POSITIONS:], got[:, -LOGIT_POSITIONS:]))
        ref_ids = reference_greedy(vlm, ids, pv, max_new_tokens, backend.eos_ids)
        got_ids = backend.generate_ids(ids, pv, max_new_tokens).token_ids
        agreement.append(token_agreement(ref_ids, got_ids))
    return {
        "vision": worst(vision),
        "logits": worst(logits),
        "token_agreement": sum(agreement) / max(len(agreement), 1),
        "n_prompts": len(samples),
    }


def vision_engine_parity(vlm, engine_path: Path, samples: Sequence[dict]) -> dict[str, float]:
    """Worst visual-token parity of one vision engine file over the samples' images."""
    from edgekd.runtime.tensorrt import EngineRunner, load_engines

    (engine,), keep = load_engines([engine_path])
    runner = EngineRunner(engine, label=engine_path.name)
    results = []
    for s in samples:
        if s["pixel_values"] is not None:
            (got,) = runner({"pixel_values": s["pixel_values"][None]}).values()
            results.append(compare(reference_visual(vlm, s["pixel_values"]), got))
    del runner, engine, keep  # free the engine before the next build
    return worst(results)


def failures(parity: dict[str, Any], tol) -> list[str]:
    """Each tolerance the parity numbers miss, with the numbers (empty when all pass)."""
    out = []
    for key, limit in (("vision", tol.vision_cosine), ("logits", tol.logits_cosine)):
        got = parity[key].get("cosine_min")
        if got is not None and got < limit:
            out.append(
                f"{key} cosine {got:.5f} < {limit} (max |diff| {parity[key]['max_abs']:.4g})"
            )
    if parity["token_agreement"] < tol.token_agreement:
        out.append(
            f"greedy agreement {parity['token_agreement']:.3f} < {tol.token_agreement} over "
            f"{parity['n_prompts']} prompts"
        )
    return out


def checklist(parity: dict[str, Any], tol) -> list[str]:
    """One ✓/✗ line per checked quantity, for the export log."""
    lines = []
    for key, limit in (("vision", tol.vision_cosine), ("logits", tol.logits_cosine)):
        if parity[key]:
            mark = "✓" if parity[key]["cosine_min"] >= limit else "✗"
            lines.append(
                f"{mark} {key}: cosine {parity[key]['cosine_min']:.5f} (>= {limit}), "
                f"max |diff| {parity[key]['max_abs']:.4g}"
            )
    ok = parity["token_agreement"] >= tol.token_agreement
    lines.append(
        f"{'✓' if ok else '✗'} greedy agreement {parity['token_agreement']:.3f} "
        f"(>= {tol.token_agreement})"
    )
    return lines


def reference_visual(vlm, pixel_values):
    """PyTorch visual tokens (1, N, D) of one (3, H, W) image, float32 on the CPU."""
    import torch

    with torch.no_grad():
        pv = pixel_values[None].to(vlm.device)
        return vlm.project(vlm.vision_features(pv)).float().cpu()


def reference_logits(vlm, input_ids, pixel_values):
    """PyTorch logits (1, L, V) of one prompt, float32 on the CPU."""
    import torch

    with torch.no_grad():
        pv = None if pixel_values is None else pixel_values[None].to(vlm.device)
        return vlm.forward_stages(input_ids[None].to(vlm.device), None, pv).float().cpu()


def reference_greedy(
    vlm, input_ids, pixel_values, max_new_tokens: int, eos: Sequence[int]
) -> list[int]:
    """PyTorch greedy token ids after the prompt (the stop token included when reached)."""
    from edgekd.evaluate import greedy_reference

    return greedy_reference(vlm, input_ids, pixel_values, max_new_tokens, stop_ids=list(eos))
