"""The gguf target's validation: its own checks, then the shared ones (:mod:`edgekd.export.parity`).

The artifact runs through edgekd's llama.cpp backend (``model.gguf`` in ``llama_cpp.Llama``,
``mmproj.gguf`` through libmtmd). Checks of this target, each one ✓/✗ line in the log:

* ``tokenizer``: llama.cpp's tokenizer (the GGUF vocabulary, merges and pre-tokenizer)
  reproduces the transformers ids on sample texts, special tokens included;
* ``prompt_ids``: llama.cpp's rendering and tokenization of every parity prompt gives the
  processor's ids (so the shared greedy check, which feeds the processor's ids, covers what
  users run);
* ``text_logits``: logits of a text-only prompt (``Llama(logits_all=True)``);
* ``chat_handler``: the public multimodal path (``create_chat_completion`` with an image) runs.

The shared ``vision`` check compares the mmproj's visual tokens with ``project(vision_features)``;
clip computes GELU with ggml's tanh approximation, so its cosine limit is looser than the
language model's.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import artifact
from edgekd.export import parity
from edgekd.export.base import ExportConfig, ExportError
from edgekd.export.parity import (
    Case,
    Tolerance,
    check_logits_numbers,
    synthetic_image,
)
from edgekd.runtime.llamacpp import LlamaCppBackend
from edgekd.runtime.prompt import split_at_image

SAMPLE_TEXTS = [
    "What shape is in the image? Is there a red circle?",
    "  leading spaces, trailing spaces   ",
    "numbers 12345 and 3.14159, punctuation!?;: (brackets) [x] {y}",
    "line one\nline two\n\n\ttabbed",
    "unicode: café, naïve, 東京, emoji 🙂",
    "<|im_start|>user\nHow many bags?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's we'll they're I'd",
]
TEXT_PROMPT = "What shape is in the image?"


def open_backend(
    vlm, out: Path, *, n_threads=None, logits_all=False, drop_first_tokens=None
) -> LlamaCppBackend:
    """The artifact in ``out`` before its manifest exists, described by ``vlm``."""
    return LlamaCppBackend(
        out,
        n_threads=n_threads,
        n_ctx=vlm.num_image_tokens() + 512,
        logits_all=logits_all,
        preprocessing=artifact.preprocessing(vlm),
        resample=int(getattr(vlm.processor.image_processor, "resample", 3)),
        verify=False,
        drop_first_tokens=drop_first_tokens,
        error=ExportError,
    )


def smoke_test(vlm, out: Path, n_threads: int | None = None) -> dict[str, Any]:
    """Load both files in llama.cpp and encode one image; the visual token count must match."""
    backend = open_backend(vlm, out, n_threads=n_threads)
    h, w = backend.session.image_size
    try:
        embd, ms = backend.session.encode_image(np.asarray(synthetic_image(0, (w, h))))
    finally:
        backend.close()
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


def check_tokenizer(vlm, backend: LlamaCppBackend) -> dict[str, Any]:
    mismatches = []
    for text in SAMPLE_TEXTS:
        ref = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = backend.session.tokenize(text)
        if ref != got:
            mismatches.append({"text": text, "transformers": ref, "llama_cpp": got})
    return {
        "texts": len(SAMPLE_TEXTS),
        "identical": len(SAMPLE_TEXTS) - len(mismatches),
        "mismatches": mismatches,
        "pass": not mismatches,
    }


def check_prompt_ids(vlm, backend: LlamaCppBackend, cases: list[Case]) -> dict[str, Any]:
    """llama.cpp's own pieces of each parity prompt against the processor's ids."""
    rows = []
    for c in cases:
        pieces = backend.session.prompt_pieces(c.question, c.image)
        rows.append(pieces == split_at_image(c.input_ids, vlm.image_token_id))
    return {"prompts": len(rows), "identical": int(sum(rows)), "pass": all(rows)}


def check_text_logits(vlm, backend: LlamaCppBackend, tol: Tolerance) -> dict[str, Any]:
    import torch

    text = backend.session.render(TEXT_PROMPT, with_image=False)
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = vlm.language_logits(vlm.embed(torch.tensor([ids], device=vlm.device)))[0]
    got = backend.prefill_logits(np.asarray([ids], np.int64))[0]
    return {"positions": len(ids), **check_logits_numbers(got, ref, tol)}


def check_chat_handler(vlm, backend: LlamaCppBackend) -> dict[str, Any]:
    """The public multimodal path: ``create_chat_completion`` with an image data URL."""
    h, w = backend.session.image_size
    buf = io.BytesIO()
    synthetic_image(2, (w, h)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": TEXT_PROMPT},
            ],
        }
    ]
    try:
        reply = backend.session.llm.create_chat_completion(
            messages=messages, max_tokens=4, temperature=0.0, repeat_penalty=1.0
        )
        res = {
            "ran": True,
            "text": reply["choices"][0]["message"]["content"],
            "prompt_tokens": reply["usage"]["prompt_tokens"],
        }
    except (ValueError, RuntimeError) as e:
        res = {"ran": False, "error": str(e)}
    return {
        **res,
        "pass": bool(res["ran"] and res.get("prompt_tokens", 0) > vlm.num_image_tokens()),
    }


def validate(vlm, config: ExportConfig, out: Path, tol: Tolerance) -> dict[str, Any]:
    """The gguf checks and the shared ones; raise ParityError with the numbers if any fails."""
    cases = parity.cases(vlm, config)
    backend = open_backend(vlm, out, n_threads=config.options.get("n_threads"), logits_all=True)
    checks = {
        "tokenizer": lambda: check_tokenizer(vlm, backend),
        "prompt_ids": lambda: check_prompt_ids(vlm, backend, cases),
        "text_logits": lambda: check_text_logits(vlm, backend, tol),
        "chat_handler": lambda: check_chat_handler(vlm, backend),
    }
    try:
        return parity.validate(vlm, backend, config, tol, target_checks=checks, parity_cases=cases)
    finally:
        backend.close()


def tolerance(base: Tolerance, vision_precision: str, options: dict[str, Any]) -> Tolerance:
    """``base`` with the mmproj's cosine floor for its precision and an ``atol`` override."""
    changes: dict[str, Any] = {"vision_cosine": IMAGE_COSINE_MIN[vision_precision]}
    if "atol" in options:
        changes["logits_max_rel"] = float(options["atol"])
    return dataclasses.replace(base, **changes)


# mmproj visual tokens vs PyTorch: clip's GELUs are approximations (see edgekd.export.gguf)
IMAGE_COSINE_MIN = {"f32": 0.999, "f16": 0.995}


# ---- what stock llama.cpp tools get from a first-token-dropping artifact ---------------------
def stock_feed(vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
    """Answers when every clip row is fed, as llama-server and llama-mtmd-cli do, against
    PyTorch's: on ``config.eval_data`` when given (accuracy and answer agreement, edgekd's
    exact path beside it), else on the parity prompts (greedy token agreement). A measurement
    recorded in the manifest, not a gate.

    The stock tools feed the rows through libmtmd's helper at consecutive positions, which is
    what edgekd's backend does with ``drop_first_tokens=0`` (for a ``full`` artifact the served
    answer equals the backend's: tests/runtime/test_llamacpp_server.py).
    """
    stock = open_backend(vlm, out, n_threads=config.options.get("n_threads"), drop_first_tokens=0)
    try:
        result: dict[str, Any] = {
            "what": "every clip row fed (stock llama.cpp tools), against PyTorch",
            "visual_tokens_fed": vlm.num_image_tokens() + stock.session.mmproj_drop,
            "visual_tokens_model": vlm.num_image_tokens(),
        }
        if config.eval_data is not None:
            return {**result, **_stock_eval(vlm, stock, config)}
        cases = [c for c in parity.cases(vlm, config) if c.pixel_values is not None]
        runs = parity.greedy_samples(vlm, stock, cases, config.max_new_tokens)
        agreement = [parity.token_agreement(r["pytorch"], r["artifact"]) for r in runs]
        return {
            **result,
            "on": "parity prompts",
            "samples": len(runs),
            "answers_identical": sum(r["pytorch"] == r["artifact"] for r in runs)
            / max(len(runs), 1),
            "token_agreement": float(np.mean(agreement)) if agreement else None,
        }
    finally:
        stock.close()


def _stock_eval(vlm, backend: LlamaCppBackend, config: ExportConfig) -> dict[str, Any]:
    """Accuracy of PyTorch, the stock feed and edgekd's exact path on the eval set, and how
    often each artifact path gives PyTorch's answer (one backend, its drop set per path)."""
    from edgekd.evaluate import generate_answers, normalize_answer, score

    dataset = parity.eval_dataset(vlm, config)
    reference = generate_answers(vlm, dataset, max_new_tokens=config.max_new_tokens)
    session = backend.session
    rows = {}
    for name, drop in (("stock", 0), ("exact", session.mmproj_drop)):
        session.drop_first_tokens = drop
        rows[name] = parity.artifact_answers(backend, dataset, config.max_new_tokens)

    def identical(name: str) -> float | None:
        same = [
            normalize_answer(a["prediction"]) == normalize_answer(b["prediction"])
            for a, b in zip(reference, rows[name], strict=True)
        ]
        return float(np.mean(same)) if same else None

    return {
        "on": str(Path(config.eval_data).name),
        "samples": len(reference),
        "answers_identical": identical("stock"),
        "exact_answers_identical": identical("exact"),
        "pytorch_normalized_match": score(reference)["normalized_match"],
        "stock_normalized_match": score(rows["stock"])["normalized_match"],
        "exact_normalized_match": score(rows["exact"])["normalized_match"],
    }
