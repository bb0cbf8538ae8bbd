"""Prove a GGUF artifact against PyTorch through llama.cpp (the ``gguf`` exporter's validate phase).

Checks, each logged as one ✓/✗ line and returned with its numbers:

* tokenizer: llama.cpp's tokenizer (from the GGUF vocabulary, merges and pre-tokenizer)
  reproduces the transformers ids on sample texts, special tokens included;
* logits on a text prompt (``Llama(logits_all=True)`` on the same ids): max-abs and cosine;
* logits after an image prompt (text, visual tokens from the mmproj, text), the same measures;
* image embeddings: the mmproj's projected visual tokens against ``project(vision_features)``;
* greedy decoding over ``n_parity_prompts`` image prompts (token-exact required for f32);
* the multimodal chat handler path (``create_chat_completion`` with an image) runs;
* accuracy delta on ``eval_data`` for quantized precisions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgekd.export.base import ExportConfig, ExportError, ParityError
from edgekd.export.gguf_write import MMPROJ_FILE, MODEL_FILE, PRECISIONS, chat_template
from edgekd.runtime.llamacpp import LlamaCppSession

from edgekd.evaluate import greedy_reference

log = logging.getLogger(__name__)

SAMPLE_TEXTS = [
    "What shape is in the image? Is there a red circle?",
    "  leading spaces, trailing spaces   ",
    "numbers 12345 and 3.14159, punctuation!?;: (brackets) [x] {y}",
    "line one\nline two\n\n\ttabbed",
    "unicode: café, naïve, 東京, emoji 🙂",
    "<|im_start|>user\nHow many bags?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's we'll they're I'd",
]
PROMPTS = [
    "What shape is in the image?",
    "What color is the shape?",
    "Is there a red shape in the image?",
    "How many items are there?",
    "Describe the image.",
]
# mmproj embeddings vs PyTorch: clip's GELUs are approximations (see edgekd.export.gguf)
IMAGE_COSINE_MIN = {"f32": 0.999, "f16": 0.995}


def open_session(vlm, out: Path, *, n_threads=None, logits_all=False, error=ExportError):
    ip = vlm.processor.image_processor
    size = ip.size
    hw = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    from edgekd.evaluate import stop_token_ids

    return LlamaCppSession(
        out / MODEL_FILE,
        out / MMPROJ_FILE,
        chat_template=chat_template(vlm),
        image_size=hw,
        image_token=vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id),
        stop_ids=stop_token_ids(vlm.tokenizer, vlm.model.generation_config),
        n_ctx=vlm.num_image_tokens() + 512,
        n_threads=n_threads,
        logits_all=logits_all,
        resample=int(getattr(ip, "resample", 3)),
        error=error,
    )


def synthetic_image(vlm, seed: int) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 noise image at the model's input size."""
    vc = vlm.config.vision_config
    return np.random.default_rng(seed).integers(0, 256, (vc.image_size, vc.image_size, 3), np.uint8)


def smoke_test(vlm, out: Path, n_threads: int | None = None) -> dict[str, Any]:
    """Load both files in llama.cpp and encode one image; the visual token count must match."""
    session = open_session(vlm, out, n_threads=n_threads)
    try:
        embd, ms = session.encode_image(synthetic_image(vlm, 0))
    finally:
        session.close()
    expected = (vlm.num_image_tokens(), vlm.config.text_config.hidden_size)
    if embd.shape != expected or not np.isfinite(embd).all():
        raise ExportError(
            f"smoke test: the mmproj gave {embd.shape} visual tokens (finite: "
            f"{bool(np.isfinite(embd).all())}), the model expects {expected}"
        )
    return {
        "image_tokens": int(embd.shape[0]),
        "embedding_dim": int(embd.shape[1]),
        "vision_ms": ms,
    }


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max-abs difference, reference scale and per-row cosine of (N, D) arrays; b: reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {
        "max_abs": float(np.abs(a - b).max()),
        "ref_abs_max": float(np.abs(b).max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
    }


def check_logits(name: str, got, ref, tol: dict[str, float], factor: float = 1.0) -> dict:
    """Logits within ``factor * logits_max_abs * max(1, |ref|_max)`` and the cosine floor.

    Rounding error grows with the logits' magnitude, so the max-abs limit scales with the
    reference's largest logit once it exceeds 1 (tiny random models stay below it).
    """
    res = {"positions": int(got.shape[0]), **compare(got, ref)}
    res["max_abs_limit"] = factor * tol["logits_max_abs"] * max(1.0, res["ref_abs_max"])
    ok = res["max_abs"] <= res["max_abs_limit"] and res["cosine_min"] >= tol["logits_cosine"]
    detail = (
        f"max-abs {res['max_abs']:.2e} (limit {res['max_abs_limit']:.1e}), "
        f"cosine min {res['cosine_min']:.6f} over {res['positions']} positions"
    )
    return _check(name, res, ok, detail)


def _check(name: str, result: dict[str, Any], ok: bool, detail: str) -> dict[str, Any]:
    result["pass"] = bool(ok)
    log.info("%s %s: %s", "✓" if ok else "✗", name, detail)
    return result


def check_tokenizer(vlm, session) -> dict[str, Any]:
    mismatches = []
    for text in SAMPLE_TEXTS:
        ref = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = session.tokenize(text)
        if ref != got:
            mismatches.append({"text": text, "transformers": ref, "llama_cpp": got})
    res = {"texts": len(SAMPLE_TEXTS), "mismatches": mismatches}
    return _check(
        "tokenizer",
        res,
        not mismatches,
        f"{len(SAMPLE_TEXTS) - len(mismatches)}/"
        f"{len(SAMPLE_TEXTS)} sample texts give identical ids",
    )


@torch.no_grad()
def check_text_logits(vlm, session, tol: dict[str, float]) -> dict[str, Any]:
    text = session.render(PROMPTS[0], with_image=False)
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ref = vlm.language_logits(vlm.embed(torch.tensor([ids], device=vlm.device)))[0]
    session.prefill([ids])
    got = session.llm.scores[: len(ids)]
    return check_logits("text logits", got, ref.float().cpu().numpy(), tol)


def _pytorch_inputs(vlm, session, prompt: str, image: np.ndarray):
    from PIL import Image

    text = session.render(prompt, with_image=True)
    enc = vlm.processor(images=Image.fromarray(image), text=text, return_tensors="pt")
    return enc["input_ids"], enc["pixel_values"].to(vlm.dtype)


def split_at_image(ids: list[int], image_token_id: int) -> list:
    """Token ids with one run of image tokens -> [prefix ids, "image", suffix ids]."""
    pos = [i for i, t in enumerate(ids) if t == image_token_id]
    if not pos:
        return [ids]
    if pos[-1] - pos[0] + 1 != len(pos):
        raise ParityError("parity prompts take one image (one run of image tokens)")
    return [ids[: pos[0]], "image", ids[pos[-1] + 1 :]]


@torch.no_grad()
def check_image_path(vlm, session, tol: dict[str, float], vision_precision: str) -> dict[str, Any]:
    image = synthetic_image(vlm, 1)
    ids, pixels = _pytorch_inputs(vlm, session, PROMPTS[1], image)
    visual = vlm.project(vlm.vision_features(pixels.to(vlm.device)))[0].float().cpu().numpy()
    embd, vision_ms = session.encode_image(image)
    emb = {"tokens": int(embd.shape[0]), "vision_ms": vision_ms, **compare(embd, visual)}
    emb_ok = embd.shape == visual.shape and emb["cosine_min"] >= IMAGE_COSINE_MIN[vision_precision]
    _check(
        "image embeddings",
        emb,
        emb_ok,
        f"{embd.shape[0]} tokens, max-abs {emb['max_abs']:.2e}, cosine min {emb['cosine_min']:.6f}",
    )
    pieces = split_at_image(ids[0].tolist(), vlm.image_token_id)
    ref = vlm.forward_stages(ids.to(vlm.device), pixel_values=pixels.to(vlm.device))[0]
    session.prefill(pieces, image)
    start = len(pieces[0]) + embd.shape[0]
    got = session.llm.scores[start : session.llm.n_tokens]
    # the visual tokens carry clip's GELU approximations: allow twice the text limit
    logits = check_logits("image-prompt logits", got, ref[start:].float().cpu().numpy(), tol, 2.0)
    return {"image_embeddings": emb, "image_prompt_logits": logits}


def _trim(ids: list[int], stops: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in stops:
            return ids[: k + 1]
    return ids


@torch.no_grad()
def check_greedy(vlm, session, config: ExportConfig) -> dict[str, Any]:
    stops = sorted(session.stop_ids)
    rows, exact, agree, total = [], 0, 0, 0
    for k in range(config.n_parity_prompts):
        prompt, image = PROMPTS[k % len(PROMPTS)], synthetic_image(vlm, 100 + k)
        ids, pixels = _pytorch_inputs(vlm, session, prompt, image)
        ref = greedy_reference(vlm, ids, pixels, config.max_new_tokens, stop_ids=stops)
        pieces = session.prompt_pieces(prompt, image)
        ids_match = pieces == split_at_image(ids[0].tolist(), vlm.image_token_id)[: len(pieces)]
        got = _trim(
            session.generate_pieces(pieces, image, config.max_new_tokens).token_ids,
            session.stop_ids,
        )
        same = sum(a == b for a, b in zip(ref, got))
        exact += ref == got
        agree += same
        total += max(len(ref), len(got))
        rows.append(
            {"prompt": prompt, "prompt_ids_match": ids_match, "pytorch": ref, "llama_cpp": got}
        )
    res = {
        "prompts": config.n_parity_prompts,
        "token_exact": exact,
        "token_agreement": agree / max(total, 1),
        "required_exact": config.precision == "f32",
        "samples": rows,
    }
    ok = all(r["prompt_ids_match"] for r in rows) and (
        not res["required_exact"] or exact == len(rows)
    )
    return _check(
        "greedy decode",
        res,
        ok,
        f"{exact}/{len(rows)} prompts token-exact, {res['token_agreement']:.1%} tokens agree",
    )


def check_chat_handler(vlm, session) -> dict[str, Any]:
    """The public multimodal path: ``create_chat_completion`` with an image data URL."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(synthetic_image(vlm, 2)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": PROMPTS[0]},
            ],
        }
    ]
    try:
        reply = session.llm.create_chat_completion(
            messages=messages, max_tokens=4, temperature=0.0, repeat_penalty=1.0
        )
        res = {
            "ran": True,
            "text": reply["choices"][0]["message"]["content"],
            "prompt_tokens": reply["usage"]["prompt_tokens"],
        }
    except (ValueError, RuntimeError) as e:
        res = {"ran": False, "error": str(e)}
    ok = res["ran"] and res.get("prompt_tokens", 0) > vlm.num_image_tokens()
    return _check(
        "chat handler",
        res,
        ok,
        "create_chat_completion with an image ran" if ok else f"failed: {res.get('error', res)}",
    )


def pixels_to_uint8(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """Undo rescale + normalize: (3, H, W) pixel values -> the (H, W, 3) uint8 source image."""
    mean = np.asarray(image_processor.image_mean, np.float64)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float64)[:, None, None]
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    x = (pixels.double().cpu().numpy() * std + mean) / scale
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def accuracy_delta(vlm, session, config: ExportConfig) -> dict[str, Any]:
    """Normalised-match accuracy of PyTorch and of the GGUF artifact on ``config.eval_data``."""
    from edgekd.data import LlavaDataset, load_llava_json
    from edgekd.evaluate import evaluate, prompts_and_references, score

    data = Path(config.eval_data)
    ref = evaluate(vlm, data, limit=config.eval_limit, max_new_tokens=config.max_new_tokens)
    samples = load_llava_json(data)[: config.eval_limit]
    ds = LlavaDataset(samples, data.parent, vlm.processor, 4096)
    rows = prompts_and_references(ds)
    for r in rows:
        pixels = ds.load_pixels(r["index"])
        image = None if pixels is None else pixels_to_uint8(pixels, vlm.processor.image_processor)
        pieces = split_at_image(r["input_ids"], vlm.image_token_id)
        g = session.generate_pieces(pieces, image, config.max_new_tokens)
        r["prediction"] = vlm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
    got = score(rows)
    res = {
        "n": got["n"],
        "pytorch": ref["normalized_match"],
        "gguf": got["normalized_match"],
        "delta": got["normalized_match"] - ref["normalized_match"],
    }
    log.info(
        "✓ accuracy on %s: PyTorch %.3f, GGUF %.3f (delta %+.3f)",
        data.name,
        res["pytorch"],
        res["gguf"],
        res["delta"],
    )
    return res


def validate(vlm, config: ExportConfig, out: Path, tol: dict[str, float]) -> dict[str, Any]:
    """Run every check; raise :class:`ParityError` with the numbers if any fails."""
    vision_precision = "f32" if config.precision == "f32" else "f16"
    vision_precision = config.options.get("vision_precision", vision_precision)
    session = open_session(vlm, out, n_threads=config.options.get("n_threads"), logits_all=True)
    try:
        results: dict[str, Any] = {"precision": config.precision, "tolerances": tol}
        results["tokenizer"] = check_tokenizer(vlm, session)
        results["text_logits"] = check_text_logits(vlm, session, tol)
        results.update(check_image_path(vlm, session, tol, vision_precision))
        results["greedy"] = check_greedy(vlm, session, config)
        results["chat_handler"] = check_chat_handler(vlm, session)
        if config.eval_data is not None and PRECISIONS[config.precision] is not None:
            results["accuracy"] = accuracy_delta(vlm, session, config)
    finally:
        session.close()
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("pass") is False]
    results["pass"] = not failed
    if failed:
        raise ParityError(
            f"gguf {config.precision} parity failed: "
            + "; ".join(f"{k} {_summary(results[k])}" for k in failed)
        )
    return results


def _summary(r: dict[str, Any]) -> str:
    keys = ("max_abs", "cosine_min", "token_exact", "prompts", "mismatches", "error")
    parts = []
    for k in keys:
        if k in r:
            v = r[k]
            v = len(v) if isinstance(v, list) else v
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "(" + ", ".join(parts) + ")"
