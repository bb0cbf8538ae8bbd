"""Opening dataset images: every failure one :class:`DataError`, every bit depth converted right.

Pillow's ``convert("RGB")`` clips 16- and 32-bit grey images (PNG ``I;16``, ``I``) at 255, so a
16-bit PNG turns white; :func:`open_rgb` scales them to 8 bits instead. Files that are not
images, are cut short, cannot be opened, or declare more pixels than Pillow's decompression-bomb
limit are refused with the path and the reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image

_MAX_16BIT = 65535


def open_rgb(path: str | os.PathLike, sample: str | None = None) -> Image:
    """Decode ``path`` fully and return it as an 8-bit RGB image.

    Args:
        path: The image file.
        sample: The id of the sample it belongs to, named in errors.

    Raises:
        DataError: the file cannot be opened (missing, a folder, no permission, a name the
            system refuses), is not an image Pillow can decode, is truncated, exceeds the
            decompression-bomb limit, or has a pixel format without a faithful RGB conversion.
    """
    from PIL import Image as PIL

    where = f"sample '{sample}': " if sample is not None else ""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit: refuse those too
            warnings.simplefilter("error", PIL.DecompressionBombWarning)
            with PIL.open(path) as im:
                im.load()
                return _to_rgb(im, path, where)
    except (PIL.DecompressionBombError, PIL.DecompressionBombWarning) as e:
        raise DataError(f"{where}image '{path}' is too large to decode safely ({e})") from None
    except OSError as e:  # UnidentifiedImageError and truncated files are OSErrors too
        raise DataError(f"{where}cannot read image '{path}': {_reason(e)}") from None
    except (ValueError, SyntaxError, EOFError) as e:  # malformed headers in some decoders
        raise DataError(f"{where}cannot read image '{path}': {e}") from None


def _to_rgb(im: Image, path: str | os.PathLike, where: str) -> Image:
    import numpy as np
    from PIL import Image as PIL

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(im, dtype=np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > _MAX_16BIT):
            raise DataError(
                f"{where}image '{path}' has {mode} pixels outside 0..65535; save it as 8-bit RGB"
            )
        grey = np.rint(pixels * (255 / _MAX_16BIT)).astype(np.uint8)
        return PIL.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise DataError(
            f"{where}image '{path}' has floating-point pixels (mode F); save it as 8-bit RGB"
        )
    return im.convert("RGB")


def _reason(e: OSError) -> str:
    if e.strerror:  # the system refused to open it: permission, a folder, a name too long, ...
        return e.strerror
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_images(paths: list[Path | None], names: list[str]) -> None:
    """Decode every image once (before anything is written); the first failure is raised.

    Raises:
        DataError: see :func:`open_rgb`.
    """
    for path, name in zip(paths, names, strict=True):
        if path is not None:
            open_rgb(path, name)
