"""Parity of an artifact with the fp32 PyTorch model it came from: one definition for every target.

Every exporter's ``validate`` opens its artifact as a :class:`~edgekd.runtime.base.Backend` and
calls :func:`validate` with its :class:`Tolerance` and its own extra checks (tokenizer, KV
cache, chat handler). The shared checks, on the same :func:`cases` for every target:

* ``vision``: visual tokens (tower + projector) of every case image;
* ``logits``: prompt logits of the first case at its text positions (llama.cpp inserts the
  visual tokens as embeddings and gives no logits at the image positions, so no target is
  compared there);
* ``greedy``: greedy decoding against ``model.generate`` (:func:`token_agreement`);
* ``accuracy`` (with ``eval_data``, where the tolerance has ``max_accuracy_drop``): normalised-
  match accuracy of the artifact against PyTorch on ``eval_limit`` samples.
* ``vision_accuracy`` (a target check, for a quantized vision encoder with ``eval_data``): the
  same accuracy with the artifact's visual tokens against PyTorch's (:func:`check_vision_accuracy`).

Numbers (:func:`compare`): ``max_abs``; ``max_rel = max_abs / max(1, max|ref|)`` (relative to the
reference's scale once its values exceed 1, absolute below, so one limit fits tiny random
models and trained ones); per-row cosine ``cosine_min`` / ``cosine_mean``. Each check returns its
numbers, its limits and ``pass``; the report is ``{"precision", "tolerance", "checks",
"passed"}``, logged as one ✓/✗ line per check, and a failure raises
:class:`~edgekd.export.base.ParityError` carrying it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.base import ExportConfig, ParityError
from edgekd.io import safe_join
from edgekd.models.dims import TextDims
from edgekd.runtime.prompt import encode_prompt

log = logging.getLogger(__name__)

QUESTIONS = (
    "What shape is in the image?",
    "What color is the shape?",
    "Describe the image.",
    "Is there a circle in the image?",
    "How many items are there?",
)


@dataclass(frozen=True)
class Tolerance:
    """What an artifact of one precision must reproduce of the fp32 PyTorch model.

    ``None`` limits are reported but not enforced.

    Attributes:
        vision_max_rel: Visual tokens' ``max_rel`` limit.
        vision_cosine: Visual tokens' minimum per-token cosine.
        logits_max_rel: Logits' ``max_rel`` limit.
        logits_cosine: Logits' minimum per-position cosine.
        token_exact: Greedy tokens must equal PyTorch's on every case.
        max_accuracy_drop: Largest normalised-match drop on ``eval_data`` (0.03 = 3 points).
        token_agreement: Minimum mean :func:`token_agreement` over the cases.
    """

    vision_max_rel: float | None = None
    vision_cosine: float = 0.0
    logits_max_rel: float | None = None
    logits_cosine: float = 0.0
    token_exact: bool = False
    max_accuracy_drop: float | None = None
    token_agreement: float = 0.0


def loosened(tol: Tolerance, floor: Tolerance, **overrides: Any) -> Tolerance:
    """``tol`` with ``floor``'s limits wherever those are looser (a ``None`` ``max_rel`` is no
    limit), then ``overrides``: the limits of checks whose inputs pass through a component
    stored at ``floor``'s precision (a quantized vision encoder feeds every image prompt).
    ``max_accuracy_drop`` stays ``tol``'s."""

    def rel(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else max(a, b)

    limits = {
        "vision_max_rel": rel(tol.vision_max_rel, floor.vision_max_rel),
        "vision_cosine": min(tol.vision_cosine, floor.vision_cosine),
        "logits_max_rel": rel(tol.logits_max_rel, floor.logits_max_rel),
        "logits_cosine": min(tol.logits_cosine, floor.logits_cosine),
        "token_exact": tol.token_exact and floor.token_exact,
        "token_agreement": min(tol.token_agreement, floor.token_agreement),
    }
    return replace(tol, **{**limits, **overrides})


@dataclass(frozen=True)
class Case:
    """One parity prompt: the image and question, and their encoding by the checkpoint."""

    image: Any  # PIL image or None
    question: str
    input_ids: np.ndarray  # (1, L) int64
    pixel_values: np.ndarray | None  # (1, 3, H, W) float32


Check = Callable[[], dict[str, Any]]  # a target's own check: numbers and "pass"


# ---- numbers ------------------------------------------------------------------------------
def compare(got, ref, *, centered: bool = False) -> dict[str, float]:
    """``max_abs``, ``ref_abs_max``, ``max_rel``, ``cosine_min``, ``cosine_mean`` (rows: the
    last axis). ``centered``: the cosines of the rows minus their means (see
    :func:`compare_logits`).

    Raises:
        ParityError: the shapes differ.
    """
    got, ref = _numpy(got), _numpy(ref)
    if got.shape != ref.shape:
        raise ParityError(f"shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
    got, ref = got.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cosine = _cosines(got, ref, centered)
    max_abs = float(np.abs(got - ref).max()) if got.size else 0.0
    ref_abs_max = float(np.abs(ref).max()) if ref.size else 0.0
    return {
        "max_abs": max_abs,
        "ref_abs_max": ref_abs_max,
        "max_rel": max_abs / max(ref_abs_max, 1.0),
        "cosine_min": float(cosine.min()) if cosine.size else 1.0,
        "cosine_mean": float(cosine.mean()) if cosine.size else 1.0,
    }


def compare_logits(got, ref) -> dict[str, Any]:
    """:func:`compare` for logits: the cosines are of each position's logits minus their mean.

    The softmax ignores a constant added to a position's logits, and the raw cosine does not:
    at a position whose logits average near 0 an offset alone drops it (SmolLM2, GGUF q8_0:
    raw cosine 0.976 where the centered one is 0.997), while at one averaging 20 a real change
    hides in the shared offset (raw 0.999 and 0.644 at two positions of one int4 model with
    the same centered 0.942). The raw figure stays in the report as ``cosine_raw_min``.
    """
    numbers: dict[str, Any] = compare(got, ref, centered=True)
    got, ref = _numpy(got), _numpy(ref)
    raw = _cosines(got.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1]), False)
    numbers["cosine_raw_min"] = float(raw.min()) if raw.size else 1.0
    return numbers


def check_logits_numbers(got, ref, tol: Tolerance) -> dict[str, Any]:
    """A logits check's numbers: :func:`compare_logits` against ``tol``'s logits limits, then
    :func:`next_token`'s (reported, not gated)."""
    numbers = limits(compare_logits(got, ref), tol.logits_max_rel, tol.logits_cosine)
    return {**numbers, **next_token(got, ref)}


def _cosines(got: np.ndarray, ref: np.ndarray, centered: bool) -> np.ndarray:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if centered:
        got = got - got.mean(-1, keepdims=True)
        ref = ref - ref.mean(-1, keepdims=True)
    dot = (got * ref).sum(-1)
    norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-300), 1.0)


def next_token(got, ref) -> dict[str, float]:
    """How far the next-token distributions moved (reported, not a gate): ``kl_mean`` and
    ``kl_max`` of KL(PyTorch || artifact) per position, in nats, and ``top1``, the share of
    positions whose most likely token is PyTorch's (the figures llama.cpp reports for quants)."""
    ref = _numpy(ref).astype(np.float64)
    got = _numpy(got).astype(np.float64).reshape(-1, ref.shape[-1])
    ref = ref.reshape(-1, ref.shape[-1])
    if not ref.size:
        return {"kl_mean": 0.0, "kl_max": 0.0, "top1": 1.0}

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


def token_agreement(reference: Sequence[int], actual: Sequence[int]) -> float:
    """The common prefix of two greedy outputs over the reference's length (1.0 if both empty)."""
    n = 0
    for a, b in zip(reference, actual):
        if a != b:
            break
        n += 1
    return n / max(len(reference), 1)


def limits(numbers: dict[str, float], max_rel: float | None, cosine: float) -> dict[str, Any]:
    """``numbers`` with their limits and ``pass``."""
    ok = numbers["cosine_min"] >= cosine and (max_rel is None or numbers["max_rel"] <= max_rel)
    head = {
        "max_abs": numbers["max_abs"],
        "max_rel": numbers["max_rel"],
        "max_rel_limit": max_rel,
        "cosine_min": numbers["cosine_min"],
        "cosine_min_limit": cosine,
    }
    return {**head, **numbers, "pass": bool(ok)}


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ---- cases --------------------------------------------------------------------------------
def cases(vlm, config: ExportConfig, n: int | None = None, seed: int = 0) -> list[Case]:
    """``n`` (default ``n_parity_prompts``) cases: ``eval_data``'s first samples when given,
    else :func:`synthetic_image` pictures (seeds ``seed, seed + 1, ...``) with QUESTIONS."""
    n = max(int(n or config.n_parity_prompts), 1)
    if config.eval_data is not None:
        pairs = _eval_pairs(Path(config.eval_data), n)
    else:
        h, w = _image_size(vlm)
        pairs = [
            (synthetic_image(seed + i, (w, h)), QUESTIONS[i % len(QUESTIONS)]) for i in range(n)
        ]
    return [Case(image, q, *encode_prompt(vlm.processor, image, q)) for image, q in pairs]


def synthetic_image(seed: int, size: tuple[int, int]):
    """A deterministic (width, height) picture: a coloured rectangle on a coloured background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def _image_size(vlm) -> tuple[int, int]:
    size = vlm.processor.image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


def _eval_pairs(path: Path, n: int) -> list[tuple[Any, str]]:
    from PIL import Image

    from edgekd.data import load_llava_json

    pairs = []
    for sample in load_llava_json(path)[:n]:
        # normalised samples: roles are user/assistant, "<image>" marks where the image goes
        question = next(t["value"] for t in sample["conversations"] if t["from"] == "user")
        image = None
        if sample.get("image"):
            with Image.open(safe_join(path.parent, sample["image"])) as im:
                image = im.convert("RGB")
        pairs.append((image, question))
    return pairs


# ---- the shared checks --------------------------------------------------------------------
def check_vision(vlm, backend, parity_cases: Sequence[Case], tol: Tolerance) -> dict[str, Any]:
    """Visual tokens of every case image (one at a time: engines may take batch 1 only)
    against ``project(vision_features)``."""
    import torch

    pixels = [c.pixel_values for c in parity_cases if c.pixel_values is not None]
    with torch.no_grad():
        pv = torch.from_numpy(np.concatenate(pixels)).to(vlm.device, vlm.dtype)
        ref = vlm.project(vlm.vision_features(pv))
    got = np.concatenate([_numpy(backend.visual_tokens(p)) for p in pixels])
    numbers = compare(got, ref)
    return {"images": len(pixels), **limits(numbers, tol.vision_max_rel, tol.vision_cosine)}


def check_logits(vlm, backend, case: Case, tol: Tolerance) -> dict[str, Any]:
    """Prompt logits of ``case`` at its text positions against the PyTorch forward."""
    import torch

    ids = torch.from_numpy(case.input_ids)
    pv = None if case.pixel_values is None else torch.from_numpy(case.pixel_values)
    with torch.no_grad():
        ref = vlm.forward_stages(
            ids.to(vlm.device), None, None if pv is None else pv.to(vlm.device, vlm.dtype)
        )
    got = _numpy(backend.prefill_logits(case.input_ids, case.pixel_values))
    text = case.input_ids[0] != vlm.image_token_id
    got, ref = got.reshape(ref.shape)[0, text], _numpy(ref)[0, text]
    return {"positions": int(text.sum()), **check_logits_numbers(got, ref, tol)}


def check_greedy(
    vlm, backend, parity_cases: Sequence[Case], max_new_tokens: int, tol: Tolerance
) -> dict[str, Any]:
    """Greedy tokens of every case against ``model.generate`` (stop token included)."""
    samples = greedy_samples(vlm, backend, parity_cases, max_new_tokens)
    exact = sum(s["pytorch"] == s["artifact"] for s in samples)
    mean = float(np.mean([token_agreement(s["pytorch"], s["artifact"]) for s in samples]))
    n = len(parity_cases)
    ok = (exact == n) if tol.token_exact else mean >= tol.token_agreement
    return {
        "prompts": n,
        "prompts_exact": exact,
        "token_agreement": mean,
        "token_agreement_limit": tol.token_agreement,
        "required": "all exact" if tol.token_exact else "agreement",
        "max_new_tokens": max_new_tokens,
        "samples": samples,
        "pass": bool(ok),
    }


def greedy_samples(vlm, backend, parity_cases: Sequence[Case], max_new_tokens: int) -> list:
    """Per case: the question, ``model.generate``'s greedy tokens and the artifact's."""
    from edgekd.evaluate import greedy_reference

    return [
        {
            "question": c.question,
            "pytorch": greedy_reference(vlm, c.input_ids, c.pixel_values, max_new_tokens),
            "artifact": list(
                backend.generate_ids(c.input_ids, c.pixel_values, max_new_tokens).token_ids
            ),
        }
        for c in parity_cases
    ]


def eval_dataset(vlm, config: ExportConfig):
    """``config.eval_data`` (its first ``eval_limit`` samples) as the model's dataset."""
    from edgekd.data import LlavaDataset, load_llava_json

    data = Path(config.eval_data)
    samples = load_llava_json(data)[: config.eval_limit]
    context = TextDims.from_config(vlm.config.text_config).context
    return LlavaDataset(samples, data.parent, vlm.processor, context)


def artifact_answers(backend, dataset, max_new_tokens: int) -> list[dict[str, Any]]:
    """The artifact's greedy answer to every sample of ``dataset``, as scoring rows."""
    from edgekd.evaluate import prompts_and_references

    rows = prompts_and_references(dataset)
    for row in rows:
        pixels = dataset.load_pixels(row["index"])
        row["prediction"] = backend.generate_ids(
            np.asarray([row["input_ids"]], np.int64),
            None if pixels is None else pixels[None].float().numpy(),
            max_new_tokens,
        ).text
    return rows


def check_accuracy(vlm, backend, config: ExportConfig, tol: Tolerance) -> dict[str, Any]:
    """Normalised-match accuracy of PyTorch and of the artifact on ``config.eval_data``."""
    from edgekd.evaluate import generate_answers, score

    dataset = eval_dataset(vlm, config)
    reference = score(generate_answers(vlm, dataset, max_new_tokens=config.max_new_tokens))
    artifact = score(artifact_answers(backend, dataset, config.max_new_tokens))
    drop = reference["normalized_match"] - artifact["normalized_match"]
    return {
        "samples": artifact["n"],
        "pytorch_normalized_match": reference["normalized_match"],
        "artifact_normalized_match": artifact["normalized_match"],
        "pytorch_exact_match": reference["exact_match"],
        "artifact_exact_match": artifact["exact_match"],
        "drop": float(drop),
        "max_drop": tol.max_accuracy_drop,
        "pass": bool(drop <= tol.max_accuracy_drop),
    }


def check_vision_accuracy(
    vlm,
    backend,
    config: ExportConfig,
    max_drop: float,
    encoder: str = "visual_tokens",
    wrap: Callable[[np.ndarray], Any] = lambda tokens: tokens,
) -> dict[str, Any]:
    """What the artifact's vision encoder costs in answers, apart from its language model.

    Normalised-match accuracy on ``config.eval_data`` of the artifact as it is, and of the same
    artifact fed PyTorch's fp32 visual tokens instead of its own (the backend method named
    ``encoder``, through which its generation encodes images, replaced for the run by one
    returning PyTorch's tokens as ``wrap`` makes them), so the difference is the vision
    encoder's alone. Passes when it drops at most ``max_drop``.
    """
    import torch

    from edgekd.evaluate import score

    dataset = eval_dataset(vlm, config)
    own = score(artifact_answers(backend, dataset, config.max_new_tokens))

    def torch_visual(pixel_values):
        pv = torch.as_tensor(np.asarray(pixel_values)).to(vlm.device, vlm.dtype)
        with torch.no_grad():
            return wrap(vlm.project(vlm.vision_features(pv)).float().cpu().numpy())

    setattr(backend, encoder, torch_visual)  # an instance attribute: the class method is kept
    try:
        fed = score(artifact_answers(backend, dataset, config.max_new_tokens))
    finally:
        delattr(backend, encoder)
    drop = fed["normalized_match"] - own["normalized_match"]
    return {
        "samples": own["n"],
        "pytorch_vision_normalized_match": fed["normalized_match"],
        "artifact_normalized_match": own["normalized_match"],
        "drop": float(drop),
        "max_drop": max_drop,
        "pass": bool(drop <= max_drop),
    }


# ---- the driver ---------------------------------------------------------------------------
def validate(
    vlm,
    backend,
    config: ExportConfig,
    tol: Tolerance,
    *,
    target_checks: dict[str, Check] | None = None,
    parity_cases: Sequence[Case] | None = None,
) -> dict[str, Any]:
    """Run the target's own checks, then the shared ones; return the report or raise.

    Raises:
        ParityError: any check failed; the message names each with its numbers, and
            ``report`` holds the whole report.
    """
    parity_cases = list(parity_cases) if parity_cases is not None else cases(vlm, config)
    checks: dict[str, dict[str, Any]] = {}
    for name, run in (target_checks or {}).items():
        checks[name] = run()
    if any(c.pixel_values is not None for c in parity_cases):
        checks["vision"] = check_vision(vlm, backend, parity_cases, tol)
    first = next((c for c in parity_cases if c.pixel_values is not None), parity_cases[0])
    checks["logits"] = check_logits(vlm, backend, first, tol)
    checks["greedy"] = check_greedy(vlm, backend, parity_cases, config.max_new_tokens, tol)
    if tol.max_accuracy_drop is not None and config.eval_data is not None:
        checks["accuracy"] = check_accuracy(vlm, backend, config, tol)
    return report(config, tol, checks)


def report(config: ExportConfig, tol: Tolerance, checks: dict[str, dict[str, Any]]) -> dict:
    """Log one ✓/✗ line per check; the report, or ParityError carrying it."""
    for name, check in checks.items():
        log.info("%s %s: %s", "✓" if check["pass"] else "✗", name, numbers_line(check))
    failed = [name for name, check in checks.items() if not check["pass"]]
    result = {
        "precision": config.precision,
        "tolerance": asdict(tol),
        "checks": checks,
        "passed": not failed,
    }
    if failed:
        detail = "; ".join(f"{name}: {numbers_line(checks[name])}" for name in failed)
        raise ParityError(
            f"the {config.target} {config.precision} artifact does not match PyTorch: {detail}",
            report=result,
        )
    return result


def numbers_line(check: dict[str, Any]) -> str:
    """``key value, ...`` of a check's scalar numbers."""
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in check.items()
        if k != "pass" and (v is None or isinstance(v, (int, float, str, bool)))
    )
