"""Where the installed llama.cpp puts a vision tower's class token: measured, not assumed.

llama.cpp's llava graph (``tools/mtmd/models/llava.cpp``) appended the class embedding after
the patches in every llama-cpp-python release up to 0.3.36, while the position rows and the
rows it keeps assume it first (llama.cpp issue #25814): a CLIP or DINOv2 tower then emits
patches 2..N and the class token where the model has patches 1..N. edgekd's Makefile compiles
llama-cpp-python with the one-line fix (upstream PR #25844, ``runtime/llama_source.py``); any
other build may or may not have it.

:func:`class_token_order` finds out once per process and llama.cpp library: a tiny random CLIP
LLaVA (built from a config, 64 px, 16 patches) is written as f32 GGUF files, one image is
encoded by the installed libmtmd and by PyTorch, and the rows are compared both ways:

* ``first``: the rows are the model's (cosine >= :data:`SAME`): class-token towers export;
* ``shifted``: llama.cpp's row ``i`` is the model's patch ``i + 1`` (the issue's signature):
  refused, with the fix named;
* ``unknown``: neither: refused, with both cosines.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.base import ExportError
from edgekd.export.gguf_validate import open_backend
from edgekd.export.gguf_write import write_lm, write_mmproj
from edgekd.export.parity import compare

FIRST, SHIFTED, UNKNOWN = "first", "shifted", "unknown"
SAME = 0.999  # the f32 mmproj's vision floor (gguf_validate.IMAGE_COSINE_MIN["f32"])
FIX = (
    "install edgekd's llama-cpp-python build (`make install`: it compiles llama.cpp with the "
    "one-line fix of llama.cpp PR #25844) or a llama.cpp that has that fix, or export this "
    "tower with --target onnx or tensorrt"
)


def order_from_rows(rows: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Which order llama.cpp's ``rows`` show against PyTorch's ``ref`` (the model's visual
    tokens, class token dropped): ``first``, ``shifted`` or ``unknown``, with both cosines
    (``unknown`` with none when llama.cpp returns another number of rows)."""
    if rows.shape != ref.shape:
        return {"order": UNKNOWN, "cosine_in_place": float("nan"), "cosine_shifted": float("nan")}
    in_place = compare(rows, ref)["cosine_min"]
    shifted = compare(rows[:-1], ref[1:])["cosine_min"]
    if in_place >= SAME:
        order = FIRST
    elif shifted > in_place and shifted >= 0.99:
        order = SHIFTED
    else:
        order = UNKNOWN
    return {"order": order, "cosine_in_place": in_place, "cosine_shifted": shifted}


def library() -> Path:
    """The libmtmd file llama-cpp-python loaded (the measurement's cache key)."""
    import llama_cpp.mtmd_cpp as mtmd

    return Path(mtmd._libmtmd._name).resolve()


def rows_and_reference(vlm, folder: Path, image: np.ndarray, n_threads=None):
    """``vlm`` written as f32 GGUF files in ``folder``: llama.cpp's visual rows of ``image``
    (uint8 HxWx3, through edgekd's backend) and PyTorch's projected features of it."""
    import torch

    write_lm(vlm, folder / "model.gguf", "f32")
    write_mmproj(vlm, folder / "mmproj.gguf", "f32")
    backend = open_backend(vlm, folder, n_threads=n_threads)
    try:
        rows, _ = backend.session.encode_image(image)
    finally:
        backend.close()
    pixels = vlm.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = vlm.project(vlm.vision_features(pixels))[0].numpy()
    return rows, ref


@functools.lru_cache(maxsize=4)
def _measure(key: tuple[str, int, int]) -> dict[str, Any]:
    from edgekd.models import build_vlm, train_tokenizer

    vlm = build_vlm(
        "tiny", tokenizer=train_tokenizer(), seed=0, tower="clip", select_strategy="default"
    )
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    with tempfile.TemporaryDirectory(prefix="edgekd-probe-") as folder:
        rows, ref = rows_and_reference(vlm, Path(folder), image, n_threads=1)
    return {**order_from_rows(rows, ref), "library": key[0]}


def class_token_order() -> dict[str, Any]:
    """The installed llama.cpp's class-token order (:func:`order_from_rows`), measured once
    per process and library file."""
    lib = library()
    stat = lib.stat()
    return dict(_measure((str(lib), stat.st_size, stat.st_mtime_ns)))


def check_class_token_order(tower: str) -> dict[str, Any]:
    """The measurement, when the installed llama.cpp runs a class-token ``tower`` exactly.

    Raises:
        ExportError: it does not (one line: the cosines and the fix).
    """
    found = class_token_order()
    if found["order"] == FIRST:
        return found
    what = (
        "appends the class token after the patches and emits it in place of the first patch "
        "(llama.cpp issue #25814)"
        if found["order"] == SHIFTED
        else "returns rows that are neither the model's nor shifted by one"
    )
    raise ExportError(
        f"vision tower '{tower}': the installed llama.cpp ({found['library']}) {what}: row "
        f"cosine {found['cosine_in_place']:.3f} in place, {found['cosine_shifted']:.3f} shifted "
        f"by one; {FIX}"
    )
