"""fashion-grid: correct answers, deterministic generation, no split leakage, clear errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from edgekd.data import DATASETS, LlavaDataset, load_llava_json, write_fashion_grid
from edgekd.data.fashion_grid import (
    ANSWERS,
    CATEGORIES,
    DEFAULT_SOURCE,
    QUESTION_TYPES,
    ask,
    load_fashion_mnist,
    make_questions,
)
from edgekd.errors import DataError, OutputExistsError

SNEAKER, BAG, COAT = CATEGORIES.index("sneaker"), CATEGORIES.index("bag"), CATEGORIES.index("coat")
needs_fmnist = pytest.mark.skipif(
    not DEFAULT_SOURCE.is_dir(), reason="apt-get install dataset-fashion-mnist"
)


def test_answers_for_a_constructed_grid():
    cells = [SNEAKER, None, BAG, BAG]
    assert ask("position", cells, 0) == ("What item is in the top left?", "sneaker")
    assert ask("position", cells, 1) == ("What item is in the top right?", "nothing")
    assert ask("position", cells, 3) == ("What item is in the bottom right?", "bag")
    assert ask("count", cells, BAG) == ("How many bags are there?", "two")
    assert ask("count", cells, COAT) == ("How many coats are there?", "zero")
    assert ask("yes/no", cells, SNEAKER) == ("Is there a sneaker in the image?", "yes")
    assert ask("yes/no", cells, COAT) == ("Is there a coat in the image?", "no")
    assert ask("where", cells, SNEAKER) == ("Where is the sneaker?", "top left")
    with pytest.raises(ValueError, match="present once"):
        ask("where", cells, BAG)
    with pytest.raises(ValueError, match="valid: position, count"):
        ask("colour", cells, 0)


def test_generated_questions_are_distinct_types_with_correct_answers():
    rng = np.random.default_rng(0)
    cells = [SNEAKER, None, BAG, BAG]
    for want_yes in (True, False) * 20:
        qs = make_questions(cells, 4, rng, want_yes)
        assert sorted(k for k, _, _ in qs) == sorted(QUESTION_TYPES)
        for kind, question, answer in qs:
            assert (question, answer) in all_questions(cells)[kind]
            if kind == "yes/no":
                assert answer == ("yes" if want_yes else "no")


def all_questions(cells):
    out = {k: set() for k in QUESTION_TYPES}
    for kind in QUESTION_TYPES:
        for target in range(4 if kind == "position" else len(CATEGORIES)):
            try:
                out[kind].add(ask(kind, cells, target))
            except ValueError:
                pass
    return out


@needs_fmnist
def test_small_grid_dataset_is_correct_and_deterministic(tmp_path, processor):
    kw = {"n_train": 24, "n_test": 12, "questions_per_image": 2}
    meta = write_fashion_grid(tmp_path / "a", seed=0, **kw)
    write_fashion_grid(tmp_path / "b", seed=0, **kw)
    write_fashion_grid(tmp_path / "c", seed=1, **kw)
    assert DATASETS["fashion-grid"] is write_fashion_grid
    for name in ("train.json", "test.json", "meta.json", "images/train/5.png", "images/test/0.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a/train.json").read_text() != (tmp_path / "c/train.json").read_text()
    assert json.loads((tmp_path / "a/meta.json").read_text()) == meta
    for split, n_grids, mnist_split in (("train", 24, "train"), ("test", 12, "t10k")):
        samples = load_llava_json(tmp_path / "a" / f"{split}.json")
        assert len(samples) == 2 * n_grids == meta["splits"][split]["n_samples"]
        yes_no = [s["answer"] for s in samples if s["question_type"] == "yes/no"]
        assert abs(yes_no.count("yes") - yes_no.count("no")) <= 1
        check_answers_and_pixels(tmp_path / "a", samples, *load_fashion_mnist(mnist_split))
    ds = LlavaDataset(tmp_path / "a" / "test.json", tmp_path / "a", processor, max_length=64)
    assert ds[0]["pixel_values"].shape == (3, 64, 64) and ds.stats()["n_no_answer_tokens"] == 0


def check_answers_and_pixels(root, samples, images, labels):
    """Each answer follows from the grid's cells; each cell holds an item of its category from
    the right Fashion-MNIST split (so test items never come from train), blank cells are black."""
    for s in samples:
        cells = [None if c is None else CATEGORIES.index(c) for c in s["cells"]]
        question = s["conversations"][0]["value"].removeprefix("<image>\n")
        assert (question, s["answer"]) in all_questions(cells)[s["question_type"]]
        assert s["answer"] in ANSWERS
        grid = np.asarray(Image.open(root / s["image"]))
        assert grid.shape == (56, 56, 3) and (grid[..., 0] == grid[..., 2]).all()
        for k, cat in enumerate(cells):
            r, c = divmod(k, 2)
            cell = grid[28 * r : 28 * r + 28, 28 * c : 28 * c + 28, 0]
            if cat is None:
                assert not cell.any()
            else:
                assert (images[labels == cat] == cell).all(axis=(1, 2)).any()


@needs_fmnist
def test_refuses_to_overwrite_and_leaves_no_temp_dirs(tmp_path):
    out = tmp_path / "fg"
    write_fashion_grid(out, n_train=2, n_test=2)
    with pytest.raises(OutputExistsError):
        write_fashion_grid(out, n_train=3, n_test=2)
    assert len(load_llava_json(out / "train.json")) == 4
    write_fashion_grid(out, n_train=3, n_test=2, overwrite=True)
    assert len(load_llava_json(out / "train.json")) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["fg"]


def test_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist or pass --source"):
        write_fashion_grid(tmp_path / "out", source=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_bad_idx_magic_is_refused(tmp_path):
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(np.array([2049, 1, 28, 28], dtype=">i4").tobytes() + bytes(784))
    with pytest.raises(DataError, match="not an IDX file with magic 2051 \\(got 2049\\)"):
        load_fashion_mnist("train", tmp_path)


def test_arguments_are_checked_together(tmp_path):
    with pytest.raises(DataError, match="n_train must be >= 1 .*questions_per_image must be 1..4"):
        write_fashion_grid(tmp_path / "x", n_train=0, questions_per_image=5)
