"""The easy-vqa writer: loadable LLaVA data, known answers and types, atomic output."""

from __future__ import annotations

import json

import pytest

from edgekd.data import DATASETS, LlavaDataset, load_llava_json, write_easy_vqa
from edgekd.data.easyvqa import QUESTION_TYPES, question_type
from edgekd.errors import DataError, OutputExistsError

pytest.importorskip("easy_vqa")


def test_small_export_is_loadable_and_consistent(tmp_path, processor):
    out = tmp_path / "ev"
    meta = write_easy_vqa(out, limit_train=30, limit_test=20)
    assert DATASETS["easy-vqa"] is write_easy_vqa
    assert json.loads((out / "meta.json").read_text()) == meta
    for split, n in (("train", 30), ("test", 20)):
        samples = load_llava_json(out / f"{split}.json")
        assert len(samples) == n == meta["splits"][split]["n_samples"]
        assert samples[0]["id"] == f"{split}-00000"
        for s in samples:
            assert s["answer"] in meta["answers"] and s["question_type"] in QUESTION_TYPES
            assert s["conversations"][1]["value"] == s["answer"]
            assert s["conversations"][0]["value"].startswith("<image>\n")
            assert (out / s["image"]).is_file()
        assert sum(meta["splits"][split]["per_type"].values()) == n
    baseline = meta["majority_baseline_test"]
    assert set(baseline["per_type"]) <= set(QUESTION_TYPES) and 0 <= baseline["overall"] <= 1
    ds = LlavaDataset(out / "test.json", out, processor, max_length=64)
    assert ds[0]["pixel_values"].shape == (3, 64, 64) and ds.stats()["n_truncated"] == 0


def test_every_package_question_gets_a_type_matching_its_answer():
    import easy_vqa

    shapes, yes_no = {"circle", "rectangle", "triangle"}, {"yes", "no"}
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        for q, a in zip(questions, answers, strict=True):
            t = question_type(q)
            assert (t == "yes/no") == (a in yes_no) and (t == "shape") == (a in shapes), (q, a)


def test_unknown_question_is_an_error():
    with pytest.raises(DataError, match="fits no known type"):
        question_type("how big is it?")


def test_refuses_to_overwrite_and_leaves_no_temp_dirs(tmp_path):
    out = tmp_path / "ev"
    write_easy_vqa(out, limit_train=3, limit_test=2)
    with pytest.raises(OutputExistsError, match="already exists"):
        write_easy_vqa(out, limit_train=4, limit_test=2)
    assert len(load_llava_json(out / "train.json")) == 3
    write_easy_vqa(out, overwrite=True, limit_train=4, limit_test=2)
    assert len(load_llava_json(out / "train.json")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]
