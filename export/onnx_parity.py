"""Parity of an ONNX artifact with the fp32 PyTorch model it came from.

Checks (each returns its numbers and a ``pass`` flag; limits come from the precision's
:class:`~edgekd.export.onnx.Tolerance`):

* ``preprocessing``: the artifact's saved processor gives the same token ids and pixel values
  as the checkpoint's processor;
* ``vision``: visual tokens (tower + projector), max-abs difference (also relative to the
  reference's max-abs value) and minimum per-token cosine, on a batch of the parity images;
* ``logits``: the same for full-prompt logits on a prompt with an image;
* ``kv_cache``: the same, for decode steps through the KV cache with forced tokens (so a cache
  or position bug shows even where greedy decoding of a random model repeats one token);
* ``greedy``: greedy decoding agrees token for token with ``model.generate`` on
  ``n_parity_prompts`` prompts (required for fp32 and fp16, reported for int8/int4);
* ``accuracy`` (int8/int4 with ``eval_data``): normalised-match accuracy of the artifact vs
  PyTorch on the first ``eval_limit`` samples; the drop must stay within the tolerance.

Parity prompts come from ``eval_data`` when given (its images and first questions), else from
deterministic synthetic images and fixed questions.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from edgekd.export.base import ExportConfig, ParityError

KV_STEPS = 6  # forced decode steps compared with a full forward
QUESTIONS = (
    "What shape is in the image?",
    "What color is the shape?",
    "Describe the image.",
    "Is there a circle in the image?",
)


def validate(vlm, config: ExportConfig, out: Path, tol) -> dict[str, Any]:
    """Run every check; return ``{"checks": {...}, "passed": bool, ...}`` or raise ParityError."""
    from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(out, verify=False)
    cases = parity_cases(vlm, config)
    encoded = [_encode(vlm, image, prompt) for image, prompt in cases]
    checks: dict[str, Any] = {"preprocessing": _check_preprocessing(backend, cases, encoded)}
    with_image = [e for e in encoded if e[1] is not None]
    if with_image:
        checks["vision"] = _check_vision(vlm, backend, with_image, tol)
    checks["logits"] = _check_logits(vlm, backend, (with_image or encoded)[0], tol)
    checks["kv_cache"] = _check_kv_cache(vlm, backend, (with_image or encoded)[0], tol)
    checks["greedy"] = _check_greedy(vlm, backend, cases, encoded, config.max_new_tokens, tol)
    if tol.max_accuracy_drop is not None and config.eval_data is not None:
        checks["accuracy"] = _check_accuracy(vlm, backend, config, tol)
    failed = [name for name, check in checks.items() if not check["pass"]]
    result = {
        "precision": config.precision,
        "tolerance": asdict(tol),
        "checks": checks,
        "passed": not failed,
    }
    if failed:
        detail = "; ".join(f"{name}: {_numbers(checks[name])}" for name in failed)
        raise ParityError(f"the onnx {config.precision} artifact does not match PyTorch: {detail}")
    return result


def _numbers(check: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in check.items()
        if k != "pass"
    )


# ---- inputs ----------------------------------------------------------------------------------
def parity_cases(vlm, config: ExportConfig) -> list[tuple[Any, str]]:
    """``(PIL image or None, question)`` pairs: from ``eval_data`` if given, else synthetic."""
    n = max(int(config.n_parity_prompts), 1)
    if config.eval_data is not None:
        return _eval_cases(Path(config.eval_data), n)
    h, w = vlm.processor.image_processor.size["height"], vlm.processor.image_processor.size["width"]
    return [(synthetic_image(i, (w, h)), QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def synthetic_image(seed: int, size: tuple[int, int]):
    """A deterministic picture: a coloured rectangle on a coloured background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def _eval_cases(path: Path, n: int) -> list[tuple[Any, str]]:
    from PIL import Image

    from edgekd.data import load_llava_json
    from edgekd.io import safe_join

    cases = []
    for sample in load_llava_json(path)[:n]:
        # normalised samples: roles are user/assistant, "<image>" marks where the image goes
        question = next(t["value"] for t in sample["conversations"] if t["from"] == "user")
        image = None
        if sample.get("image"):
            with Image.open(safe_join(path.parent, sample["image"])) as im:
                image = im.convert("RGB")
        cases.append((image, question))
    return cases


def _encode(vlm, image, prompt: str):
    from edgekd.runtime.onnxruntime import encode_prompt

    return encode_prompt(vlm.processor, image, prompt)


# ---- checks ------------------------------------------------------------------------------------
def _check_preprocessing(backend, cases, encoded) -> dict[str, Any]:
    ids_equal, pixel_max_abs = True, 0.0
    for (image, prompt), (ids, pixels) in zip(cases, encoded):
        got_ids, got_pixels = backend.encode(image, prompt)
        ids_equal &= np.array_equal(got_ids, ids)
        if pixels is not None:
            pixel_max_abs = max(pixel_max_abs, float(np.abs(got_pixels - pixels).max()))
    return {
        "ids_equal": bool(ids_equal),
        "pixel_max_abs": pixel_max_abs,
        "pass": bool(ids_equal) and pixel_max_abs <= 1e-6,
    }


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """Max-abs difference, the same relative to max|ref|, and the minimum cosine (last axis)."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    dot = (got * ref).sum(-1)
    norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    max_abs = float(np.abs(got - ref).max())
    return max_abs, max_abs / max(float(np.abs(ref).max()), 1e-30), float(cosine.min())


def _limits(max_abs: float, max_rel: float, cosine: float, rel_limit, cos_limit) -> dict:
    ok = cosine >= cos_limit and (rel_limit is None or max_rel <= rel_limit)
    return {
        "max_abs": max_abs,
        "max_rel": max_rel,
        "max_rel_limit": rel_limit,
        "min_cosine": cosine,
        "min_cosine_limit": cos_limit,
        "pass": bool(ok),
    }


def _check_vision(vlm, backend, with_image, tol) -> dict[str, Any]:
    import torch

    pixels = np.concatenate([p for _, p in with_image])
    with torch.no_grad():
        ref = vlm.project(vlm.vision_features(torch.from_numpy(pixels))).numpy()
    got = backend.visual_tokens(pixels)
    result = _limits(*compare(got, ref), tol.vision_max_rel, tol.vision_min_cosine)
    return {"batch": len(pixels), **result}


def _check_logits(vlm, backend, case, tol) -> dict[str, Any]:
    ids, pixels = case
    ref = _torch_logits(vlm, ids, pixels)
    got = backend.prefill_logits(ids, pixels)
    return {
        "positions": int(ids.shape[1]),
        **_limits(*compare(got, ref), tol.logits_max_rel, tol.logits_min_cosine),
    }


def _check_kv_cache(vlm, backend, case, tol, steps: int = KV_STEPS) -> dict[str, Any]:
    """Decode steps through the KV cache with forced tokens vs a full forward over them all."""
    ids, pixels = case
    forced = np.random.default_rng(0).integers(0, len(vlm.tokenizer), steps).tolist()
    full = np.concatenate([ids, np.asarray([forced], dtype=np.int64)], axis=1)
    ref = _torch_logits(vlm, full, pixels)[0, ids.shape[1] - 1 :]
    got = backend.incremental_logits(ids, pixels, forced)
    return {
        "steps": steps,
        **_limits(*compare(got, ref), tol.logits_max_rel, tol.logits_min_cosine),
    }


def _torch_logits(vlm, ids: np.ndarray, pixels: np.ndarray | None) -> np.ndarray:
    import torch

    input_ids = torch.from_numpy(ids)
    images = None if pixels is None else torch.from_numpy(pixels)
    with torch.no_grad():
        return vlm.forward_stages(input_ids, torch.ones_like(input_ids), images).numpy()


def torch_greedy(vlm, ids: np.ndarray, pixels: np.ndarray | None, max_new_tokens: int) -> list:
    """``model.generate`` greedy tokens (batch 1), stopping at the checkpoint's stop ids."""
    from edgekd.evaluate import greedy_reference

    return greedy_reference(vlm, ids, pixels, max_new_tokens)


def _check_greedy(vlm, backend, cases, encoded, max_new_tokens, tol) -> dict[str, Any]:
    exact, agreement = 0, []
    for (image, prompt), (ids, pixels) in zip(cases, encoded):
        ref = torch_greedy(vlm, ids, pixels, max_new_tokens)
        got = backend.generate(image, prompt, max_new_tokens).token_ids
        exact += got == ref
        prefix = next(
            (k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref))
        )
        agreement.append(prefix / max(len(got), len(ref), 1))
    n = len(cases)
    return {
        "prompts_exact": exact,
        "prompts": n,
        "token_agreement": float(np.mean(agreement)),
        "max_new_tokens": max_new_tokens,
        "required": "all" if tol.token_exact else "none",
        "pass": exact == n or not tol.token_exact,
    }


def _check_accuracy(vlm, backend, config: ExportConfig, tol) -> dict[str, Any]:
    from edgekd.data import LlavaDataset, load_llava_json
    from edgekd.evaluate import generate_answers, prompts_and_references, score

    data = Path(config.eval_data)
    samples = load_llava_json(data)[: config.eval_limit]
    context = int(getattr(vlm.config.text_config, "max_position_embeddings", 2048))
    dataset = LlavaDataset(samples, data.parent, vlm.processor, context)
    reference = score(generate_answers(vlm, dataset, max_new_tokens=config.max_new_tokens))
    rows = prompts_and_references(dataset)
    for row in rows:
        pixels = dataset.load_pixels(row["index"])
        gen = backend.generate_ids(
            np.asarray([row["input_ids"]]),
            None if pixels is None else pixels[None].numpy(),
            config.max_new_tokens,
        )
        row["prediction"] = gen.text
    artifact = score(rows)
    drop = reference["normalized_match"] - artifact["normalized_match"]
    return {
        "samples": artifact["n"],
        "pytorch_normalized_match": reference["normalized_match"],
        "onnx_normalized_match": artifact["normalized_match"],
        "pytorch_exact_match": reference["exact_match"],
        "onnx_exact_match": artifact["exact_match"],
        "drop": float(drop),
        "max_drop": tol.max_accuracy_drop,
        "pass": bool(drop <= tol.max_accuracy_drop),
    }
