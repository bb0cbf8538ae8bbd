"""Helpers for the fault tests: snapshots of trees, leftovers beside outputs, bad files."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
from llava_samples import image_sample, write_samples
from PIL import Image


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) and the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """Names edgekd writes beside ``out`` while working (temporary dirs, lock, old copy)."""
    parent = out.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def write_qa_set(root: Path, n: int = 3) -> Path:
    """``n`` single-turn colour questions with 64 px PNGs; returns the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        pixels = np.full((64, 64, 3), 40 * i, np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        question = image_sample(f"q{i}", f"images/{i}.png", "What color is it?", "red", "color")
        samples.append(question)
    return write_samples(root / "eval.json", samples)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG header declaring ``width`` x ``height`` pixels (beyond Pillow's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")
