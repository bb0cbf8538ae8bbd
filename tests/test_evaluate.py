"""Answer accuracy: normalisation, scoring per type, greedy answers with and without images."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from edgekd.evaluate import evaluate, normalize_answer, score


def test_normalize_answer():
    assert normalize_answer("The Red.") == normalize_answer("red")
    assert normalize_answer("Two bags") == "2 bags"
    assert normalize_answer("  top   left ") == "top left"
    assert normalize_answer("a circle") == "circle"


def test_score_overall_and_per_type():
    rows = [
        {"prediction": "red", "reference": "red", "question_type": "color"},
        {"prediction": "Red.", "reference": "red", "question_type": "color"},
        {"prediction": "circle", "reference": "square", "question_type": "shape"},
    ]
    result = score(rows)
    assert result["n"] == 3
    assert abs(result["exact_match"] - 1 / 3) < 1e-9
    assert abs(result["normalized_match"] - 2 / 3) < 1e-9
    assert result["per_type"]["color"] == {"n": 2, "exact_match": 0.5, "normalized_match": 1.0}
    assert result["per_type"]["shape"]["normalized_match"] == 0.0


def test_evaluate_greedy_answers_for_image_and_text_only_batches(tiny_vlm, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    samples = [
        {
            "id": "img",
            "image": "a.png",
            "question_type": "color",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color?"},
                {"from": "gpt", "value": "black"},
            ],
        },
        {
            "id": "txt",
            "question_type": "text",
            "conversations": [
                {"from": "human", "value": "Say yes."},
                {"from": "gpt", "value": "yes"},
            ],
        },
    ]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(samples))
    result = evaluate(tiny_vlm, data, batch_size=1, max_new_tokens=3)  # one text-only batch
    assert result["n"] == 2 and set(result["per_type"]) == {"color", "text"}
    assert [p["id"] for p in result["predictions"]] == ["img", "txt"]
    assert all(isinstance(p["prediction"], str) for p in result["predictions"])
    batched = evaluate(tiny_vlm, data, batch_size=2, max_new_tokens=3)  # mixed batch
    assert [p["prediction"] for p in batched["predictions"]] == [
        p["prediction"] for p in result["predictions"]
    ]


def test_greedy_reference_text_only_and_with_image(tiny_vlm):
    import torch

    from edgekd.evaluate import greedy_reference, stop_token_ids

    ids = tiny_vlm.tokenizer("<|im_start|>user\nSay yes.<|im_end|>\n")["input_ids"]
    got = greedy_reference(tiny_vlm, ids, None, max_new_tokens=3)  # no pixel_values at all
    stops = stop_token_ids(tiny_vlm.tokenizer, tiny_vlm.model.generation_config)
    ref = tiny_vlm.model.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=3,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=tiny_vlm.tokenizer.pad_token_id,
    )
    assert got == ref[0, len(ids) :].tolist()[: len(got)] and 1 <= len(got) <= 3
    enc = tiny_vlm.processor(
        text="<image>What?", images=Image.new("RGB", (64, 64)), return_tensors="pt"
    )
    with_image = greedy_reference(tiny_vlm, enc["input_ids"][0], enc["pixel_values"][0], 3)
    assert with_image == greedy_reference(tiny_vlm, enc["input_ids"], enc["pixel_values"], 3)
