"""fashion-grid: 2x2 grids of Fashion-MNIST items with counting, position and presence questions.

A harder built-in task than easy-vqa, where a small student has a real gap to its teacher: the
model must recognise ten clothing categories at 28x28, localise them, and count them. Each image
is a 56x56 grid (greyscale rendered as RGB); a cell may be blank, and categories repeat on
purpose so that counts vary.

Question types (answers in brackets)::

    position  What item is in the top left?      [t-shirt | ... | ankle boot | nothing]
    count     How many bags are there?           [zero | one | two | three | four]
    yes/no    Is there a sneaker in the image?   [yes | no], balanced exactly
    where     Where is the coat?                 [top left | top right | bottom left | bottom right]
              (asked only about a category present exactly once)

Train grids use Fashion-MNIST's train split and test grids its t10k split, so no item image
appears in both. Items come from Debian's ``dataset-fashion-mnist`` (IDX files). Generation is
deterministic for a seed. The output layout is the one :mod:`edgekd.data.easyvqa` writes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.data.easyvqa import qa_summary
from edgekd.data.samples import qa_sample
from edgekd.errors import DataError
from edgekd.io import atomic_write_json
from edgekd.outputs import output_guard

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)  # Fashion-MNIST label order
PLURALS = (
    "t-shirts",
    "trousers",
    "pullovers",
    "dresses",
    "coats",
    "sandals",
    "shirts",
    "sneakers",
    "bags",
    "ankle boots",
)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell order, row-major
NUMBERS = ("zero", "one", "two", "three", "four")
EMPTY = "nothing"
QUESTION_TYPES = ("position", "count", "yes/no", "where")
ANSWERS = (*CATEGORIES, EMPTY, *NUMBERS, "yes", "no", *POSITIONS)

CELL = 28
P_EMPTY = 0.2  # chance a cell is blank
P_REPEAT = 0.3  # chance a cell repeats a category already in the grid (so counts reach 2-4)

Cells = list  # four entries, each a category index or None (blank), row-major


# ---- reading Fashion-MNIST -------------------------------------------------------------------
def load_fashion_mnist(split: str, source: str | os.PathLike | None = None):
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` or ``t10k`` split.

    Raises:
        DataError: the folder or a file is missing, or a file is not the IDX it should be.
    """
    root = Path(source) if source is not None else DEFAULT_SOURCE
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST folder '{root}' not found; apt-get install dataset-fashion-mnist "
            "or pass --source DIR (a folder with the *-ubyte.gz files)"
        )
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz", magic=2051, ndim=3)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz", magic=2049, ndim=1)
    if len(images) != len(labels) or images.shape[1:] != (CELL, CELL):
        raise DataError(
            f"Fashion-MNIST '{split}' in '{root}': {len(images)} images of shape "
            f"{images.shape[1:]} but {len(labels)} labels; expected 28x28 and equal counts"
        )
    if labels.max(initial=0) >= len(CATEGORIES):
        raise DataError(f"Fashion-MNIST '{split}' labels reach {labels.max()}; expected 0..9")
    return images, labels


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file (big-endian int32 magic, dims, then uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file '{path}' not found") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read Fashion-MNIST file '{path}': {e}") from None
    head = np.frombuffer(raw[: 4 * (1 + ndim)], dtype=">i4") if len(raw) >= 4 * (1 + ndim) else []
    if len(head) != 1 + ndim or head[0] != magic:
        got = int(head[0]) if len(head) else None
        raise DataError(f"'{path}' is not an IDX file with magic {magic} (got {got})")
    dims = tuple(int(d) for d in head[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"'{path}': header says {dims} = {int(np.prod(dims))} bytes, file has {data.size}"
        )
    return data.reshape(dims)


# ---- questions -------------------------------------------------------------------------------
def ask(kind: str, cells: Cells, target: int) -> tuple[str, str]:
    """The question and its answer about a grid.

    Args:
        kind: One of :data:`QUESTION_TYPES`.
        cells: Four category indices (or ``None`` for a blank cell), row-major.
        target: A cell index for ``position``, a category index otherwise.

    Raises:
        ValueError: unknown kind, or ``where`` about a category not present exactly once.
    """
    if kind == "position":
        item = cells[target]
        answer = EMPTY if item is None else CATEGORIES[item]
        return f"What item is in the {POSITIONS[target]}?", answer
    n = sum(c == target for c in cells)
    if kind == "count":
        return f"How many {PLURALS[target]} are there?", NUMBERS[n]
    if kind == "yes/no":
        return f"Is there a {CATEGORIES[target]} in the image?", "yes" if n else "no"
    if kind == "where":
        if n != 1:
            raise ValueError(
                f"'where' needs a category present once; {CATEGORIES[target]} is there {n}x"
            )
        return f"Where is the {CATEGORIES[target]}?", POSITIONS[cells.index(target)]
    raise ValueError(f"unknown question kind '{kind}'; valid: {', '.join(QUESTION_TYPES)}")


def make_questions(
    cells: Cells, n: int, rng: np.random.Generator, want_yes: bool
) -> list[tuple[str, str, str]]:
    """``n`` questions of distinct types about one grid: (type, question, answer).

    ``want_yes`` decides the answer of a yes/no question, so the caller can balance them exactly.
    """
    present = sorted({c for c in cells if c is not None})
    absent = [c for c in range(len(CATEGORIES)) if c not in present]
    singles = [c for c in present if cells.count(c) == 1]
    kinds = [k for k in QUESTION_TYPES if k != "where" or singles]
    chosen = rng.choice(len(kinds), size=min(n, len(kinds)), replace=False)
    out = []
    for kind in (kinds[int(k)] for k in chosen):
        if kind == "position":
            target = int(rng.integers(4))
        elif kind == "count":  # mostly present categories, sometimes an absent one ("zero")
            pool = present if rng.random() < 0.75 else absent
            target = int(rng.choice(pool))
        elif kind == "yes/no":
            target = int(rng.choice(present if want_yes else absent))
        else:
            target = int(rng.choice(singles))
        out.append((kind, *ask(kind, cells, target)))
    return out


# ---- grids -----------------------------------------------------------------------------------
class _ItemPool:
    """Item indices per category, each shuffled and used in turn (reshuffled when exhausted)."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.rng = rng
        self.by_cat = [np.flatnonzero(labels == c) for c in range(len(CATEGORIES))]
        self.order = [rng.permutation(ix) for ix in self.by_cat]
        self.pos = [0] * len(CATEGORIES)

    def take(self, cat: int) -> int:
        if self.pos[cat] == len(self.order[cat]):
            self.order[cat], self.pos[cat] = self.rng.permutation(self.by_cat[cat]), 0
        self.pos[cat] += 1
        return int(self.order[cat][self.pos[cat] - 1])


def sample_cells(rng: np.random.Generator) -> Cells:
    """Four cells: blank with :data:`P_EMPTY`, else a repeat with :data:`P_REPEAT`, else random."""
    cells: Cells = []
    for _ in range(4):
        placed = [c for c in cells if c is not None]
        if rng.random() < P_EMPTY:
            cells.append(None)
        elif placed and rng.random() < P_REPEAT:
            cells.append(int(rng.choice(placed)))
        else:
            cells.append(int(rng.integers(len(CATEGORIES))))
    if all(c is None for c in cells):
        cells[0] = int(rng.integers(len(CATEGORIES)))
    # repeats copy earlier cells, so shuffle to keep every position equally likely to hold anything
    return [cells[k] for k in rng.permutation(4)]


def render_grid(cells: Cells, images: np.ndarray, pool: _ItemPool) -> np.ndarray:
    """A (56, 56, 3) uint8 grid; blank cells stay black like Fashion-MNIST's background."""
    grid = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
    for k, cat in enumerate(cells):
        if cat is not None:
            r, c = divmod(k, 2)
            grid[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = images[pool.take(cat)]
    return np.repeat(grid[:, :, None], 3, axis=2)


def _generate_split(
    root: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    n_images: int,
    questions_per_image: int,
    seed: int,
) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pool = _ItemPool(labels, rng)
    (root / "images" / split).mkdir(parents=True)
    width = max(5, len(str(n_images * questions_per_image)))
    samples: list[dict] = []
    n_yes_no = 0
    for n in range(n_images):
        cells = sample_cells(rng)
        rel = f"images/{split}/{n}.png"
        Image.fromarray(render_grid(cells, images, pool)).save(root / rel)
        for kind, question, answer in make_questions(
            cells, questions_per_image, rng, want_yes=n_yes_no % 2 == 0
        ):
            n_yes_no += kind == "yes/no"
            cell_names = [None if c is None else CATEGORIES[c] for c in cells]
            sample_id = f"{split}-{len(samples):0{width}d}"
            samples.append(qa_sample(sample_id, rel, question, answer, kind, cells=cell_names))
    atomic_write_json(root / f"{split}.json", samples)
    return samples


def write_fashion_grid(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 4000,
    n_test: int = 500,
    seed: int = 0,
    questions_per_image: int = 2,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate fashion-grid as LLaVA-format JSON plus PNGs, atomically.

    Args:
        out_dir: Output folder (must not exist or be empty unless ``overwrite``).
        n_train: Train grids (from Fashion-MNIST train).
        n_test: Test grids (from Fashion-MNIST t10k).
        seed: Same seed, same files.
        questions_per_image: Questions per grid, each of a different type (1-4).
        source: Folder with Fashion-MNIST's ``*-ubyte.gz`` files (default: Debian's).
        overwrite: Replace an existing folder (only once the new one is complete).

    Returns:
        The ``meta.json`` content.

    Raises:
        DataError: Fashion-MNIST is missing or malformed, or the arguments are out of range.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is off.
        OutputError: ``out_dir`` cannot be written (see :func:`edgekd.outputs.check_output`).
    """
    problems = [
        f"{k} must be >= 1 (got {v})"
        for k, v in (("n_train", n_train), ("n_test", n_test))
        if v < 1
    ]
    if seed < 0:
        problems.append(f"seed must be >= 0 (got {seed})")
    if not 1 <= questions_per_image <= len(QUESTION_TYPES):
        problems.append(
            f"questions_per_image must be 1..{len(QUESTION_TYPES)} (got {questions_per_image})"
        )
    if problems:
        raise DataError("fashion-grid: " + "; ".join(problems))
    with output_guard(out_dir, overwrite=overwrite, inputs=[source]) as guard:
        data = {
            "train": load_fashion_mnist("train", source),
            "test": load_fashion_mnist("t10k", source),
        }
        counts = {"train": n_train, "test": n_test}
        with guard.build() as tmp:
            splits = {
                split: _generate_split(
                    tmp, split, *data[split], counts[split], questions_per_image, seed
                )
                for split in data
            }
            meta = {
                "name": "fashion-grid",
                "seed": seed,
                "questions_per_image": questions_per_image,
                "grid": "2x2 of 28x28 Fashion-MNIST items, 56x56 px",
                "categories": list(CATEGORIES),
                "question_types": list(QUESTION_TYPES),
            }
            meta.update(qa_summary(splits, ANSWERS))
            atomic_write_json(tmp / "meta.json", meta)
    return meta
