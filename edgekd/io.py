"""Filesystem helpers: outputs appear whole or not at all, and data paths stay inside their root.

Output directories (check, lock, build beside, swap in) live in :mod:`edgekd.outputs`, which
builds on the helpers here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.errors import DataError, DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NEARLY_FULL_BYTES = 16 * 2**20  # what a sequential writer leaves when the disk ran out
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask (read without leaving it changed)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes the umask allows.

    Temporary files and directories (``mkstemp``, ``mkdtemp``, some serializers) are private
    (0600 / 0700); renamed into place they would stay so. Execute bits of files are kept.
    """
    mask = umask()
    base = Path(root)
    items = [base, *base.rglob("*")] if base.is_dir() else [base]
    for item in items:
        if item.is_symlink():
            continue
        mode = 0o777 if item.is_dir() else (item.stat().st_mode & 0o111) | 0o666
        os.chmod(item, mode & ~mask)


def disk_full(exc: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` when it was caused by a full file system, else None.

    Some serializers hide the cause (torch: ``unexpected pos 576 vs 534``); when the error has
    no errno (safetensors puts it in the text), the free space left on ``path``'s file system
    decides.
    """
    code = getattr(exc, "errno", None)
    if code is None and (found := _RUST_OS_ERROR.search(str(exc))):
        code = int(found.group(1))  # safetensors: "I/O error: ... (os error 28)"
    if code is not None and code not in _FULL_ERRNOS:
        return None
    free = _free_bytes(Path(path))
    if code is None and (free is None or free >= _NEARLY_FULL_BYTES):
        return None
    left = "" if free is None else f" ({free / 2**20:.1f} MiB left)"
    return DiskFullError(
        f"the disk is full: writing '{path}' failed{left}: {first_line(exc)}; "
        "free some space or write the output to another file system",
        code or errno.ENOSPC,
        str(path),
    )


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write failure caused by a full disk into a one-line :class:`DiskFullError`."""
    try:
        yield
    except Exception as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from e


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would survive the rename
        with writing(dest), os.fdopen(fd, "w", encoding="utf-8") as f:
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
    """Resolve ``relative`` under ``root``; refuse ``..`` escapes, symlinks leading out, and
    names the system cannot open (a NUL byte, a name too long, a symlink loop)."""
    base = Path(root).resolve()
    try:
        target = (base / relative).resolve()
        target.is_file()  # a name the system refuses (too long, ...) fails here, not later
    except (OSError, ValueError, RuntimeError) as e:  # ELOOP / ENAMETOOLONG, NUL, symlink loop
        reason = getattr(e, "strerror", None) or str(e)
        raise DataError(f"path {relative!r} under '{base}' cannot be opened: {reason}") from None
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


def looks_local(text: str) -> bool:
    """Whether ``text`` is written as a local path rather than a hub id.

    ``./x``, ``../x``, ``/x``, ``~/x``, ``x/``, ``a/b/c`` and ``runs/x`` where ``runs`` is a
    folder here are paths: when they do not exist they are typos, not hub ids to look up.
    """
    if text in (".", "..") or text.startswith(("./", "../", "/", "~")) or text.endswith("/"):
        return True
    if "\\" in text or text.count("/") > 1:
        return True
    head, sep, _ = text.partition("/")
    return bool(sep) and Path(head).is_dir()


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a hub model: ``org/name``, not written as a local path.

    A bare ``name`` is taken for a local folder: vision-language checkpoints on the hub live
    under an organisation, and a missing folder should fail at once, not after network retries.
    """
    return bool(HUB_ID.fullmatch(text)) and text.count("/") == 1 and not looks_local(text)


def checkpoint_dir(path: str | os.PathLike) -> Path | None:
    """The local checkpoint directory of ``path``: itself when it holds ``config.json``, its
    ``model/`` when it is an ``edgekd distill`` run directory, else None."""
    local = Path(path).expanduser()
    for d in (local, local / "model"):
        if (d / "config.json").is_file():
            return d
    return None
