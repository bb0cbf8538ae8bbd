"""easy-vqa (PyPI, MIT) as LLaVA-format data: 64x64 shapes with templated questions.

Layout written::

    out_dir/train.json, out_dir/test.json       # LLaVA samples + "answer" and "question_type"
    out_dir/images/{train,test}/<n>.png          # the package's images, <n> its image id
    out_dir/meta.json                            # counts, answers, per-type counts, baselines

Question types come from the templates (about 74% of the questions are yes/no, so per-type
accuracy and the majority baseline in ``meta.json`` are what make a score meaningful).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekd.data.samples import qa_sample
from edgekd.errors import DataError
from edgekd.io import atomic_write_json
from edgekd.outputs import output_guard

QUESTION_TYPES = ("shape", "color", "yes/no")
_YES_NO_START = re.compile(r"^(is|are|does|do|can)\b")


def question_type(question: str) -> str:
    """Classify an easy-vqa question: ``yes/no``, ``color`` or ``shape``.

    The templates are "is/does ...?" (yes/no), "what color ...?" / "what is the color of ...?"
    (color) and "what shape ...?" / "what is the <color> shape?" (shape).

    Raises:
        DataError: a question that fits none of them.
    """
    q = question.strip().lower()
    if _YES_NO_START.match(q):
        return "yes/no"
    if q.startswith("what"):
        if re.search(r"\bcolou?r\b", q):
            return "color"
        if re.search(r"\bshape\b", q):
            return "shape"
    raise DataError(
        f"easy-vqa question '{question}' fits no known type ({', '.join(QUESTION_TYPES)})"
    )


def write_easy_vqa(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> dict[str, Any]:
    """Write the easy-vqa package's data as LLaVA-format JSON plus images, atomically.

    Args:
        out_dir: Output folder (must not exist or be empty unless ``overwrite``).
        overwrite: Replace an existing folder (only once the new one is complete).
        limit_train: Keep only the first N train questions (and the images they use).
        limit_test: Same for test.

    Returns:
        The ``meta.json`` content.

    Raises:
        DataError: the ``easy-vqa`` package is not installed, or a limit is below 1.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is off.
        OutputError: ``out_dir`` cannot be written (see :func:`edgekd.outputs.check_output`).
    """
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise DataError(f"easy-vqa: {name} ({flag}) must be at least 1 (got {value})")
    try:
        import easy_vqa
    except ImportError:
        raise DataError(
            "the easy-vqa package is not installed; pip install 'edgekd[data]'"
        ) from None
    with output_guard(out_dir, overwrite=overwrite) as guard:
        sources = {
            "train": (
                easy_vqa.get_train_questions(),
                easy_vqa.get_train_image_paths(),
                limit_train,
            ),
            "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), limit_test),
        }
        answers = easy_vqa.get_answers()
        with guard.build() as tmp:
            splits = {}
            for split, ((questions, answer_list, image_ids), image_paths, limit) in sources.items():
                rows = list(zip(questions, answer_list, image_ids, strict=True))[:limit]
                splits[split] = _write_split(tmp, split, rows, image_paths)
            meta = {
                "name": "easy-vqa",
                "source": f"easy-vqa {_version()}",
                "question_types": list(QUESTION_TYPES),
            }
            meta.update(qa_summary(splits, answers))
            atomic_write_json(tmp / "meta.json", meta)
    return meta


def _write_split(root: Path, split: str, rows: list[tuple], image_paths: dict) -> list[dict]:
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True)
    width = max(5, len(str(len(rows))))
    samples = []
    for n, (question, answer, image_id) in enumerate(rows):
        rel = f"images/{split}/{image_id}.png"
        if not (root / rel).exists():
            shutil.copyfile(image_paths[image_id], root / rel)
        samples.append(
            qa_sample(f"{split}-{n:0{width}d}", rel, question, answer, question_type(question))
        )
    atomic_write_json(root / f"{split}.json", samples)
    return samples


def _version() -> str:
    try:
        return version("easy-vqa")
    except PackageNotFoundError:
        return "unknown"


# ---- the summary every built-in writer puts in meta.json -------------------------------------
def qa_summary(splits: dict[str, list[dict]], answers: Sequence[str]) -> dict[str, Any]:
    """Counts, answer vocabulary, per-type counts and majority baselines for built-in datasets.

    Samples carry ``answer`` and ``question_type``. The baseline predicts, per question type, the
    most frequent train answer (ties broken alphabetically) and is scored on ``test``.
    """
    out: dict[str, Any] = {"answers": list(answers), "splits": {}}
    for name, samples in splits.items():
        types = Counter(s["question_type"] for s in samples)
        out["splits"][name] = {
            "n_samples": len(samples),
            "n_images": len({s["image"] for s in samples if s.get("image")}),
            "per_type": dict(sorted(types.items())),
        }
    train, test = splits.get("train", []), splits.get("test", [])
    majority = {}
    for qtype in sorted({s["question_type"] for s in train + test}):
        counts = Counter(s["answer"] for s in (train or test) if s["question_type"] == qtype)
        majority[qtype] = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else ""
    per_type = {}
    for qtype, answer in majority.items():
        rows = [s for s in test if s["question_type"] == qtype]
        hits = sum(s["answer"] == answer for s in rows)
        accuracy = round(hits / len(rows), 4) if rows else None
        per_type[qtype] = {"answer": answer, "accuracy": accuracy, "n": len(rows)}
    hits = sum(s["answer"] == majority[s["question_type"]] for s in test)
    out["majority_baseline_test"] = {
        "per_type": per_type,
        "overall": round(hits / len(test), 4) if test else None,
    }
    return out
