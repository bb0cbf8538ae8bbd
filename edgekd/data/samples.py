"""LLaVA-format sample files: read and validate the JSON up front (every problem one
:class:`DataError` naming the sample), resolve image paths inside their root, and decode every
image once before any later stage meets a bad one. No torch: the dataset that tokenizes the
samples is :mod:`edgekd.data.llava`.

The format (LLaVA's ``llava_v1_5_mix665k.json`` and its descendants)::

    [{"id": "q1", "image": "rel/path.png",            # optional: text-only samples have none
      "conversations": [{"from": "human", "value": "<image>\\nQuestion"},
                        {"from": "gpt", "value": "Answer"}, ...]}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd.chat import IMAGE_PLACEHOLDER
from edgekd.errors import DataError
from edgekd.images import check_images
from edgekd.io import atomic_write_text, safe_join

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


# ---- reading and validating ------------------------------------------------------------------
def qa_sample(
    sample_id: str, image: str, question: str, answer: str, question_type: str, **extra: Any
) -> dict:
    """One single-turn LLaVA sample about an image, with the fields evaluation scores by."""
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "answer": answer,
        "question_type": question_type,
        **extra,
    }


def subset_by_type(path: str | os.PathLike, question_types: Sequence[str]) -> Path:
    """The samples of ``path`` whose ``question_type`` is listed, as ``<stem>.<types>.json``.

    Written once next to ``path`` (atomically) and reused; image paths stay valid because the
    subset lives in the same folder.
    """
    src = Path(path)
    dst = src.with_name(f"{src.stem}.{'-'.join(question_types)}.json")
    if not dst.exists():
        kept = [s for s in load_llava_json(src) if s.get("question_type") in question_types]
        if not kept:
            raise DataError(f"{src}: no sample has question_type in {list(question_types)}")
        atomic_write_text(dst, json.dumps(kept))
    return dst


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA-format JSON file and validate every sample before training starts.

    Returns:
        Normalized copies of the samples (see :func:`validate_samples`).

    Raises:
        DataError: The file is missing or not JSON (with line and column), or samples are malformed
            (the count and the first problem, naming the sample id and index).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    return validate_samples(data, source=str(p))


def validate_samples(data: Any, source: str = "samples") -> list[dict]:
    """Check the structure of every sample; return normalized shallow copies.

    Normalization: roles become ``user``/``assistant``/``system``; an ``image`` without any
    ``<image>`` placeholder gets ``"<image>\\n"`` prepended to its first user turn (as LLaVA does);
    ``id`` becomes a string (the index when missing). Other keys (metadata such as ``answer`` or
    ``question_type``) are kept; the input is not modified.

    Raises:
        DataError: one line, ``"{source}: N invalid samples; first: sample 'x' (index i) ..."``.
    """
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of samples, got {_json_type(data)}")
    if not data:
        raise DataError(f"{source}: the dataset is empty (no samples)")
    out, problems = [], []
    for i, sample in enumerate(data):
        try:
            out.append(_normalize_sample(sample, i))
        except _SampleProblem as e:
            sid = sample.get("id", i) if isinstance(sample, dict) else i
            problems.append(f"sample '{sid}' (index {i}) {e}")
    if len(problems) == 1:
        raise DataError(f"{source}: {problems[0]}")
    if problems:
        raise DataError(f"{source}: {len(problems)} invalid samples; first: {problems[0]}")
    return out


class _SampleProblem(Exception):
    pass


def _normalize_sample(sample: Any, index: int) -> dict:
    if not isinstance(sample, dict):
        raise _SampleProblem(f"is {_json_type(sample)}, not an object")
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _SampleProblem("has no 'conversations' list")
    image = sample.get("image")
    if isinstance(image, list):
        raise _SampleProblem("has a list of images; multi-image samples are not supported")
    if image is not None and (not isinstance(image, str) or not image):
        raise _SampleProblem(f"has an 'image' that is not a path ({_json_type(image)} {image!r})")
    roles = [_check_turn(turn, t) for t, turn in enumerate(convs)]
    first = next((t for t, r in enumerate(roles) if r != "system"), None)
    if first is None or roles[first] != "user":
        raise _SampleProblem("does not start with a user turn (after an optional system turn)")
    if "assistant" not in roles:
        raise _SampleProblem("has no assistant turn")
    n_placeholders = 0
    for t, (role, turn) in enumerate(zip(roles, convs, strict=True)):
        k = turn["value"].count(IMAGE_PLACEHOLDER)
        if k and role != "user":
            raise _SampleProblem(f"has an {IMAGE_PLACEHOLDER} placeholder in turn {t} ({role})")
        n_placeholders += k
    answer = sample.get("answer")
    if "answer" in sample and not (isinstance(answer, (str, int, float)) and str(answer).strip()):
        raise _SampleProblem(f"has an empty or non-text 'answer' ({_json_type(answer)} {answer!r})")
    if n_placeholders and image is None:
        raise _SampleProblem(f"has an {IMAGE_PLACEHOLDER} placeholder but no 'image' field")
    if n_placeholders > 1:
        raise _SampleProblem(f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for one image")
    convs = [{"from": roles[t], "value": turn["value"]} for t, turn in enumerate(convs)]
    if image is not None and n_placeholders == 0:
        convs[first] = {"from": "user", "value": IMAGE_PLACEHOLDER + "\n" + convs[first]["value"]}
    return {**sample, "id": str(sample.get("id", index)), "conversations": convs}


def _check_turn(turn: Any, t: int) -> str:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise _SampleProblem(f"turn {t} is not an object with 'from' and 'value'")
    if not isinstance(turn["from"], str) or turn["from"] not in ROLES:
        raise _SampleProblem(
            f"turn {t} has unknown role '{turn['from']}'; valid: {', '.join(ROLES)}"
        )
    if ROLES[turn["from"]] == "system" and t != 0:
        raise _SampleProblem(f"turn {t} is a system turn; only the first turn may be one")
    if not isinstance(turn["value"], str):
        raise _SampleProblem(f"turn {t} value is {_json_type(turn['value'])}, not a string")
    if ROLES[turn["from"]] == "assistant" and not turn["value"].strip():
        raise _SampleProblem(f"turn {t} is an empty answer; give the assistant turn its text")
    return ROLES[turn["from"]]


def _json_type(x: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(x), type(x).__name__)


def resolve_images(samples: list[dict], root: str | os.PathLike | None) -> list[Path | None]:
    """Each sample's image path under ``root`` (None for text-only samples).

    Raises:
        DataError: an absolute path, a path leaving ``root``, or missing files (one line:
            the count and the first one).
    """
    paths: list[Path | None] = []
    missing = []
    for s in samples:
        rel = s.get("image")
        if rel is None:
            paths.append(None)
            continue
        if root is None:
            raise DataError(f"sample '{s['id']}' has an image '{rel}' but no image_root was given")
        if os.path.isabs(rel):
            raise DataError(
                f"sample '{s['id']}': image path '{rel}' is absolute; image paths "
                "must be relative to image_root"
            )
        try:
            path = safe_join(root, rel)
        except DataError as e:
            raise DataError(f"sample '{s['id']}': {e}") from None
        if not path.is_file():
            missing.append(f"sample '{s['id']}' image '{path}' not found")
        paths.append(path)
    if len(missing) == 1:
        raise DataError(missing[0])
    if missing:
        raise DataError(f"{len(missing)} images missing under '{root}'; first: {missing[0]}")
    return paths


# ---- batching --------------------------------------------------------------------------------


def checked_samples(
    data: str | os.PathLike, image_root: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[list[dict], list[Path | None]]:
    """The first ``limit`` samples of a LLaVA JSON file and their image paths, every sample
    validated and every image decoded once, so that later stages never meet a bad one.

    Raises:
        DataError: a limit below 1, invalid JSON or samples, missing or unreadable images.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1 (got {limit})")
    samples = load_llava_json(data)[:limit]
    root = Path(image_root) if image_root is not None else Path(data).parent
    images = resolve_images(samples, root)
    check_images(images, [s["id"] for s in samples])
    return samples, images
