"""Filesystem helpers: outputs appear whole or not at all, and data paths stay inside their root."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.errors import DataError, OutputExistsError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output directory unless ``overwrite`` is set."""
    out = Path(path)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output '{out}' already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; rename it to ``path`` on success.

    On any exception the temporary directory is removed and ``path`` is left untouched, so a
    reader never sees a half-written output. With ``overwrite`` an existing ``path`` is replaced
    only after the new content is complete.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse ``..`` escapes and symlinks leading out."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise DataError(
            f"path '{relative}' escapes its root '{base}'; keep data paths inside the root"
        )
    return target


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
"""A Hugging Face hub id: ``name`` or ``org/name``."""


def checkpoint_dir(path: str | os.PathLike) -> Path | None:
    """The local checkpoint directory of ``path``: itself when it holds ``config.json``, its
    ``model/`` when it is an ``edgekd distill`` run directory, else None."""
    local = Path(path).expanduser()
    for d in (local, local / "model"):
        if (d / "config.json").is_file():
            return d
    return None
