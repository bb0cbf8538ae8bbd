"""Opening images: 16-bit greys scaled (not whitened), every unreadable file one DataError."""

from __future__ import annotations

import numpy as np
import pytest
from fault_helpers import bomb_png
from PIL import Image

from edgekd.errors import DataError
from edgekd.images import open_rgb


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    expected = np.rint(grey / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 120 < rgb.mean() < 135  # Pillow's own convert("RGB") gives ~254: white


def test_8_bit_images_are_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c.png")
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "c.png")), pixels)


def test_float_pixels_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"sample 'q': image '.*f\.tiff' has floating-point"):
        open_rgb(tmp_path / "f.tiff", "q")


@pytest.mark.parametrize(
    "kind,message",
    [
        ("fake", "cannot identify image file"),
        ("truncated", "truncated"),
        ("bomb", "too large to decode safely"),
        ("folder", "Is a directory"),
        ("missing", "No such file"),
    ],
)
def test_unreadable_images_name_the_sample_and_the_file(tmp_path, kind, message):
    path = tmp_path / "x.png"
    if kind == "fake":
        path.write_text("a text file renamed .png")
    elif kind == "truncated":
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:-60])
    elif kind == "bomb":
        path.write_bytes(bomb_png())
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(DataError, match=message) as e:
        open_rgb(path, "s7")
    assert str(e.value).startswith("sample 's7': ") and str(path) in str(e.value)
