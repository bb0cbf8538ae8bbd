"""LLaVA-format loading, tokenization, labels, truncation, collation and every bad-input error."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from edgekd.data import IGNORE_INDEX, LlavaCollator, LlavaDataset, load_llava_json
from edgekd.errors import DataError, ModelError

IM_END = "<|im_end|>"


def qa(sid: str, question: str, answer: str, image: str | None = "a.png") -> dict:
    sample = {
        "id": sid,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        sample["image"] = image
    return sample


def conv(*turns: tuple) -> dict:
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def labelled_runs(item: dict, tokenizer) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    keep = (item["labels"] != IGNORE_INDEX).tolist()
    runs, cur = [], []
    for tok, k in zip(item["labels"].tolist(), keep, strict=True):
        if k:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tokenizer.decode(r) for r in runs]


# ---- tokens and labels -----------------------------------------------------------------------
def test_labels_are_exactly_the_answer_and_end_of_turn(processor, image_root):
    ds = LlavaDataset([qa("q1", "What shape is it?", "a red circle")], image_root, processor, 128)
    item = ds[0]
    assert labelled_runs(item, processor.tokenizer) == ["a red circle" + IM_END]
    kept = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][kept], item["input_ids"][kept])
    assert item["id"] == "q1" and item["attention_mask"].sum() == len(item["input_ids"])
    assert item["input_ids"].dtype == torch.long and item["pixel_values"].shape == (3, 64, 64)


def test_multi_turn_labels_both_answers(processor, image_root):
    sample = {
        "id": "m",
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat shape?"},
            {"from": "gpt", "value": "circle"},
            {"from": "user", "value": "And its color?"},
            {"from": "assistant", "value": "red"},
        ],
    }
    item = LlavaDataset([sample], image_root, processor, 128)[0]
    assert labelled_runs(item, processor.tokenizer) == ["circle" + IM_END, "red" + IM_END]


@pytest.mark.parametrize("image", ["a.png", "sub/c.png"])
def test_ids_equal_the_processors_own_expansion(processor, image_root, image):
    sample = qa("q", "How many bags are there?", "two", image)
    ds = LlavaDataset([sample], image_root, processor, 128)
    text, _ = ds.render(0)
    img = Image.open(image_root / image).convert("RGB")
    ref = processor(text=text, images=img, return_tensors="pt")
    item = ds[0]
    assert torch.equal(item["input_ids"], ref["input_ids"][0])
    assert torch.equal(item["pixel_values"], ref["pixel_values"][0])
    assert int((item["input_ids"] == ds.image_token_id).sum()) == ds.num_image_tokens == 16


def test_text_inside_the_user_turn_is_preserved_around_the_image(processor, image_root):
    sample = qa("q", "", "yes")
    sample["conversations"][0]["value"] = "Look: <image> is it round?"
    ds = LlavaDataset([sample], image_root, processor, 128)
    text, _ = ds.render(0)
    assert "<|im_start|>user\nLook: <image> is it round?<|im_end|>" in text


def test_tokenizer_template_is_the_fallback(processor, image_root):
    no_template = copy.copy(processor)
    no_template.chat_template = None
    samples = [qa("q", "What color?", "teal")]
    a = LlavaDataset(samples, image_root, processor, 128)[0]
    b = LlavaDataset(samples, image_root, no_template, 128)[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_template_that_is_not_prefix_stable_is_refused(processor, image_root):
    unstable = copy.copy(processor)
    unstable.chat_template = (
        "{%- for m in messages -%}{{- m['role'] + ': ' -}}"
        "{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{{- c['text'] -}}"
        "{%- else -%}<image>{%- endif -%}{%- endfor -%}"
        "{%- if loop.last -%}{{- ' END' -}}{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )
    ds = LlavaDataset([qa("q", "Q?", "A")], image_root, unstable, 128)
    with pytest.raises(ModelError, match="not prefix-stable.*sample 'q'"):
        ds[0]


def test_text_only_sample(processor, tmp_path):
    ds = LlavaDataset([qa("t", "Say hi.", "hi", image=None)], None, processor, 32)
    item = ds[0]
    assert item["pixel_values"] is None
    assert ds.image_token_id not in item["input_ids"].tolist()
    assert labelled_runs(item, processor.tokenizer) == ["hi" + IM_END]


def test_image_without_placeholder_gets_one_prepended(processor, image_root, write_json):
    sample = qa("p", "What shape?", "circle", image=None)
    sample["image"] = "a.png"
    samples = load_llava_json(write_json([sample]))
    assert samples[0]["conversations"][0]["value"] == "<image>\nWhat shape?"
    assert sample["conversations"][0]["value"] == "What shape?"  # the input is not mutated
    item = LlavaDataset(samples, image_root, processor, 64)[0]
    assert int((item["input_ids"] == processor.image_token_id).sum()) == 16


def test_metadata_fields_are_kept(write_json):
    sample = {**qa("k", "Q?", "yes"), "answer": "yes", "question_type": "yes/no"}
    loaded = load_llava_json(write_json([sample]))[0]
    assert loaded["answer"] == "yes" and loaded["question_type"] == "yes/no"


# ---- truncation ------------------------------------------------------------------------------
def test_truncation_is_counted_and_keeps_image_tokens(processor, image_root):
    long_answer = "circle " * 40
    samples = [qa("short", "Q?", "yes"), qa("long", "Q?", long_answer)]
    ds = LlavaDataset(samples, image_root, processor, max_length=40)
    item = ds[1]
    assert len(item["input_ids"]) == 40
    assert int((item["input_ids"] == ds.image_token_id).sum()) == 16
    assert (item["labels"] != IGNORE_INDEX).any()
    stats = ds.stats()
    assert stats["n_samples"] == 2 and stats["n_truncated"] == 1 == ds.n_truncated
    assert stats["n_no_answer_tokens"] == 0
    assert stats["max_length_seen"] > 40 and stats["image_tokens_per_image"] == 16


def test_sample_truncated_to_zero_answer_tokens_is_counted(processor, image_root):
    long_question = "what is the shape in the image " * 10
    ds = LlavaDataset(
        [qa("q", long_question, "yes"), qa("ok", "Q?", "no")], image_root, processor, max_length=32
    )
    assert (ds[0]["labels"] == IGNORE_INDEX).all()
    assert ds.stats()["n_no_answer_tokens"] == 1


def test_max_length_that_cannot_hold_the_image_is_refused(processor, image_root):
    with pytest.raises(DataError, match="max_length 16 cannot hold the 16 image tokens"):
        LlavaDataset([qa("q", "Q?", "A")], image_root, processor, max_length=16)


def test_truncation_never_cuts_image_tokens(processor, image_root):
    sample = {
        "id": "sys",
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "a long system prompt " * 10},
            {"from": "human", "value": "<image>\nQ?"},
            {"from": "gpt", "value": "A"},
        ],
    }
    ds = LlavaDataset([sample], image_root, processor, max_length=30)
    with pytest.raises(DataError, match="sample 'sys': image tokens at positions .* max_length 30"):
        ds[0]


# ---- collation -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_keeps_image_rows_in_order(data_vlm, processor, image_root, side):
    samples = [
        qa("a", "What shape?", "circle"),
        qa("t", "Say something longer, please.", "ok", None),
        qa("b", "What color is the shape in the image?", "red", "b.png"),
    ]
    ds = LlavaDataset(samples, image_root, processor, 128)
    items = [ds[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    batch = LlavaCollator(pad, padding_side=side, pad_to_multiple_of=8)(items)
    length = max(len(it["input_ids"]) for it in items)
    padded = -(-length // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == (3, padded)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])
    assert batch["has_image"].tolist() == [True, False, True] and batch["ids"] == ["a", "t", "b"]
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        real = slice(0, n) if side == "right" else slice(padded - n, padded)
        rest = slice(n, padded) if side == "right" else slice(0, padded - n)
        assert torch.equal(batch["input_ids"][row, real], it["input_ids"])
        assert torch.equal(batch["labels"][row, real], it["labels"])
        assert (batch["input_ids"][row, rest] == pad).all()
        assert (batch["labels"][row, rest] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n
    if side == "right":  # the model takes images in row order: a mixed batch runs and trains
        out = data_vlm.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        )
        assert torch.isfinite(out.loss)


def test_collator_text_only_batch_has_no_pixels(processor):
    ds = LlavaDataset([qa("t", "Q?", "A", None), qa("u", "Q2?", "B", None)], None, processor, 32)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["pixel_values"] is None and not batch["has_image"].any()


def test_collator_rejects_unknown_padding_side():
    with pytest.raises(DataError, match="padding_side 'middle'"):
        LlavaCollator(0, padding_side="middle")


# ---- bad inputs ------------------------------------------------------------------------------
def test_malformed_json_gives_line_and_column(write_json):
    path = write_json('[\n  {"id": "a",\n    "image": "a.png"\n    "conversations": []}\n]')
    with pytest.raises(
        DataError, match=r"data\.json: invalid JSON at line 4, column 5: Expecting ','"
    ):
        load_llava_json(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_llava_json(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "the dataset is empty"),
        ({"id": 1}, "expected a JSON list of samples, got an object"),
        (["text"], "sample '0' \\(index 0\\) is a string, not an object"),
        ([{"id": "x"}], "sample 'x' \\(index 0\\) has no 'conversations' list"),
        ([conv(("human", "hi"))], "sample 'x' \\(index 0\\) has no assistant turn"),
        (
            [conv(("human", "hi"), ("bot", "yo"))],
            "turn 1 has unknown role 'bot'; valid: human, user, gpt",
        ),
        ([conv(("human", "hi"), ("gpt", 3))], "turn 1 value is a number, not a string"),
        (
            [conv(("human", "<image>\nhi"), ("gpt", "a"))],
            "sample 'x' \\(index 0\\) has an <image> placeholder but no 'image' field",
        ),
        ([conv(("gpt", "a"), ("human", "b"))], "does not start with a user turn"),
        ([conv((["human"], "a"), ("gpt", "b"))], "turn 0 has unknown role"),
        (
            [{**conv(("human", "<image>a"), ("gpt", "b")), "image": ["a.png", "b.png"]}],
            "multi-image samples are not supported",
        ),
        ([conv(("human", "hi"), ("gpt", ""))], "turn 1 is an empty answer"),
        ([conv(("human", "hi"), ("gpt", " \n"))], "turn 1 is an empty answer"),
        ([{**conv(("human", "hi"), ("gpt", "a")), "answer": ""}], "has an empty or non-text"),
        ([{**conv(("human", "hi"), ("gpt", "a")), "answer": None}], "has an empty or non-text"),
    ],
)
def test_structural_problems_name_the_sample(write_json, data, message):
    with pytest.raises(DataError, match=f"data\\.json: .*{message}"):
        load_llava_json(write_json(data))


def test_several_bad_samples_are_counted_and_the_first_shown(write_json):
    good = qa("ok", "Q?", "A")
    bad = [{"id": f"q{i}", "conversations": [{"from": "human", "value": "Q?"}]} for i in range(3)]
    data = [good] * 16 + bad
    with pytest.raises(
        DataError,
        match=r"data\.json: 3 invalid samples; first: sample 'q0' "
        r"\(index 16\) has no assistant turn",
    ):
        load_llava_json(write_json(data))


def test_missing_image_names_sample_and_path(processor, image_root):
    with pytest.raises(DataError, match=r"sample 'm' image '.*root/gone\.png' not found"):
        LlavaDataset([qa("m", "Q?", "A", "gone.png")], image_root, processor, 64)


def test_16_bit_image_gives_the_pixels_of_its_8_bit_version(processor, image_root):
    import numpy as np

    grey = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint16)
    Image.fromarray(grey * 257).save(image_root / "g16.png")  # the same image in 16 bits
    Image.fromarray(grey.astype(np.uint8)).convert("RGB").save(image_root / "g8.png")
    ds = LlavaDataset(
        [qa("16", "Q?", "A", "g16.png"), qa("8", "Q?", "A", "g8.png")], image_root, processor, 64
    )
    assert torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"])


def test_corrupt_image_names_sample_and_path_at_access(processor, image_root):
    ds = LlavaDataset([qa("c", "Q?", "A", "bad.png")], image_root, processor, 64)
    with pytest.raises(DataError, match=r"sample 'c': cannot read image '.*bad\.png'"):
        ds[0]


@pytest.mark.parametrize(
    "path, message",
    [
        ("../a.png", "escapes its root"),
        ("sub/../../a.png", "escapes its root"),
        ("/etc/hostname", "is absolute"),
    ],
)
def test_image_paths_may_not_leave_the_root(processor, image_root, path, message):
    with pytest.raises(DataError, match=f"sample 'e'.*{message}"):
        LlavaDataset([qa("e", "Q?", "A", path)], image_root, processor, 64)


def test_absolute_path_inside_the_root_is_refused_too(processor, image_root):
    with pytest.raises(DataError, match="is absolute"):
        LlavaDataset([qa("e", "Q?", "A", str(image_root / "a.png"))], image_root, processor, 64)


def test_images_need_an_image_root(processor):
    with pytest.raises(DataError, match="sample 'n' has an image 'a.png' but no image_root"):
        LlavaDataset([qa("n", "Q?", "A")], None, processor, 64)
