"""Answer accuracy of a VLM on a LLaVA-format eval set, by greedy decoding.

For each sample the conversation up to its last user turn is the prompt (rendered by the
model's chat template, generation prompt added) and the last assistant turn (or the sample's
``answer`` field) is the reference. Two scores, overall and per ``question_type``:

* exact match: the stripped prediction equals the reference;
* normalised match (VQA-style): both lower-cased, punctuation and articles (a, an, the)
  removed, number words mapped to digits, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from edgekd.chat import stop_token_ids
from edgekd.errors import DataError

_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: case, punctuation, articles, number words, whitespace."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def prompts_and_references(dataset) -> list[dict[str, Any]]:
    """Per sample: prompt token ids (image tokens expanded), reference answer, type, id."""
    rows = []
    for i, sample in enumerate(dataset.samples):
        ids = dataset.prompt_ids(i)
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "assistant"]
        reference = sample.get("answer", answers[-1])
        rows.append(
            {
                "index": i,
                "id": sample["id"],
                "input_ids": ids,
                "reference": reference,
                "question_type": sample.get("question_type", "all"),
            }
        )
    return rows


@torch.no_grad()
def greedy_reference(
    vlm,
    input_ids,
    pixel_values=None,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] | None = None,
) -> list[int]:
    """transformers' greedy ``generate`` for one prompt: the reference every backend must match.

    Args:
        vlm: A ``VLM``.
        input_ids: Prompt ids with image tokens expanded, (L,) or (1, L); tensor or numpy.
        pixel_values: The prompt's images, (3, H, W) or (N, 3, H, W), or None for text only.
        max_new_tokens: Tokens generated at most.
        stop_ids: Tokens that end generation (default: :func:`stop_token_ids`).

    Returns:
        The generated ids after the prompt, the first stop token included when reached.
    """
    stops = (
        list(stop_ids)
        if stop_ids is not None
        else stop_token_ids(vlm.tokenizer, vlm.model.generation_config)
    )
    pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else stops[0]
    ids = torch.as_tensor(input_ids).reshape(1, -1).to(vlm.device)
    kwargs = {}
    if pixel_values is not None:  # an explicit pixel_values=None makes generate run the tower
        pv = torch.as_tensor(pixel_values)
        kwargs["pixel_values"] = (pv[None] if pv.ndim == 3 else pv).to(vlm.device, vlm.dtype)
    out = vlm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=pad,
        **kwargs,
    )
    tokens = out[0, ids.shape[1] :].tolist()
    cut = next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]


@torch.no_grad()
def generate_answers(
    vlm,
    dataset,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers of ``vlm`` (a ``VLM``) for every sample of ``dataset`` (a LlavaDataset)."""
    rows = prompts_and_references(dataset)
    tok, stops = vlm.tokenizer, stop_token_ids(vlm.tokenizer, vlm.model.generation_config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    vlm.model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[b, width - len(r["input_ids"]) :] = torch.tensor(r["input_ids"])
            mask[b, width - len(r["input_ids"]) :] = 1
        pixels = [dataset.load_pixels(r["index"]) for r in batch]
        pixel_values = (
            torch.stack([p for p in pixels if p is not None]).to(vlm.device, vlm.dtype)
            if any(p is not None for p in pixels)
            else None
        )
        kwargs = {"pixel_values": pixel_values} if pixel_values is not None else {}
        # (transformers runs the vision tower for an explicit pixel_values=None: leave it out)
        out = vlm.model.generate(
            input_ids=ids.to(vlm.device),
            attention_mask=mask.to(vlm.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            **kwargs,
        )
        for b, r in enumerate(batch):
            r["prediction"] = tok.decode(out[b, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(batch))
    return rows


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact and normalised match, overall and per question type."""
    per_type: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r in rows:
        exact = r["prediction"].strip() == r["reference"].strip()
        norm = normalize_answer(r["prediction"]) == normalize_answer(r["reference"])
        per_type[r["question_type"]].append((exact, norm))
    everything = [x for v in per_type.values() for x in v]

    def summary(items: list[tuple[bool, bool]]) -> dict[str, float]:
        n = len(items)
        return {
            "n": n,
            "exact_match": sum(e for e, _ in items) / max(n, 1),
            "normalized_match": sum(m for _, m in items) / max(n, 1),
        }

    return {**summary(everything), "per_type": {k: summary(v) for k, v in sorted(per_type.items())}}


def evaluate(
    vlm,
    data: str | Path,
    image_root: str | Path | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    max_length: int = 2048,
) -> dict[str, Any]:
    """Score ``vlm`` on a LLaVA-format eval file; returns scores plus every prediction.

    Raises:
        DataError: an invalid eval file, or a ``limit`` below 1.
    """
    from edgekd.data import LlavaDataset, load_llava_json

    if limit is not None and limit < 1:
        raise DataError(f"eval limit must be at least 1 (got {limit})")
    samples = load_llava_json(data)[:limit]
    root = image_root if image_root is not None else Path(data).parent
    dataset = LlavaDataset(samples, root, vlm.processor, max_length)
    rows = generate_answers(vlm, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = score(rows)
    result["predictions"] = [
        {k: r[k] for k in ("id", "question_type", "reference", "prediction")} for r in rows
    ]
    return result
