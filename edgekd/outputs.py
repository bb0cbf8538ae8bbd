"""The output guard every writing command shares: check, lock, build beside, swap in.

    with output_guard(out, overwrite=True, inputs=[checkpoint, data]) as guard:
        ...                                  # validate and load: nothing is written yet
        with guard.build() as tmp:           # a hidden directory beside ``out``
            write_everything_into(tmp)       # ``out`` is replaced only when this succeeds

1. **Check** (before any work): the output is not a file, does not lie under a file, is not the
   working directory or one of its parents, is writable, is not equal to, inside or around any
   input, and is new or empty unless ``overwrite`` (every problem names both paths).
2. **Lock**: an exclusive ``flock`` on ``.NAME.lock`` beside the output, held for the whole run;
   a second run on the same output stops at once, naming the holder's pid. The lock file is
   removed when the run ends.
3. **Leftovers**: under the lock nobody else writes beside the output, so what an earlier run
   killed with SIGKILL left (``.NAME.tmp-*``) is removed, and an output caught between the two
   renames of a swap (only ``.NAME.old-*`` left) is put back.
4. **Build and swap**: the new output is built in ``.NAME.tmp-*`` and renamed over the old one
   only when complete; a failure at any point leaves the old output as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgekd.errors import OutputError, OutputExistsError
from edgekd.io import honour_umask, writing

Input = str | os.PathLike | None


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.`` becomes the working directory's name)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[Input] = (),
    reuse: bool = False,
    hint: str = "pass --overwrite to replace it",
) -> Path:
    """Refuse an output that cannot be written safely; return it absolute.

    Args:
        path: The output directory.
        overwrite: An existing, non-empty output may be replaced.
        inputs: Paths the run reads (missing ones and hub ids are skipped). The output may not
            be one of them, lie inside one, or contain one.
        reuse: An existing output is continued in place (``distill --resume``).
        hint: How to get past an existing output, for its message.

    Raises:
        OutputError: a file, under a file, the working directory, unwritable, or overlapping an
            input.
        OutputExistsError: the output exists, is not empty, and neither ``overwrite`` nor
            ``reuse`` is set.
    """
    out = absolute(path)
    try:
        _check_kind(out, path)
        _check_inputs(out, path, inputs)
        exists = out.exists() and any(out.iterdir())
    except OutputError:
        raise
    except (OSError, ValueError) as e:  # a name the system refuses: too long, a NUL byte
        reason = getattr(e, "strerror", None) or str(e)
        raise OutputError(f"output {str(path)!r} cannot be used: {reason}") from None
    if exists and not (overwrite or reuse):
        raise OutputExistsError(f"output '{path}' already exists; {hint}")
    return out


_SUFFIX_ROOM = len(".") + len(".tmp-") + 16  # the hidden names made beside an output


def _check_kind(out: Path, shown: str | os.PathLike) -> None:
    longest = 255 - _SUFFIX_ROOM  # NAME_MAX of the usual file systems
    if len(os.fsencode(out.name)) > longest:
        raise OutputError(
            f"output name '{out.name[:40]}...' is {len(os.fsencode(out.name))} bytes; edgekd "
            f"writes hidden folders beside it, so keep it to {longest}"
        )
    if out.is_symlink():
        raise OutputError(
            f"output '{shown}' is a symbolic link; give the directory it should be (edgekd "
            "replaces outputs by renaming, which would replace the link, not its target)"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{shown}' is an existing file; give a directory path")
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(out.resolve()):
        raise OutputError(
            f"output '{shown}' is the working directory or contains it; write to a new "
            "directory such as ./out"
        )
    for parent in out.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise OutputError(f"output '{shown}' lies under '{parent}', which is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "read-only file system" if _read_only(parent) else "permission denied"
            raise OutputError(f"output '{shown}': cannot write in '{parent}' ({why})")
        return


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class DataRoot(str):
    """An input folder read by file name only (an image root): an output inside it is fine,
    one equal to it or containing it is not (replacing it would delete the data)."""


def check_inputs(out: str | os.PathLike, inputs: Iterable[Input]) -> None:
    """Refuse an output equal to, inside, or containing any of ``inputs`` (existing paths).

    Raises:
        OutputError: naming the output and the input.
    """
    _check_inputs(absolute(out), out, inputs)


def _check_inputs(out: Path, shown: str | os.PathLike, inputs: Iterable[Input]) -> None:
    real = out.resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue  # a hub id, a tiny:SIZE model, a built-in dataset name
        src = Path(item).expanduser().resolve()
        if src == real:
            raise OutputError(f"output '{shown}' is the input '{item}'; write to another directory")
        if src.is_relative_to(real):
            raise OutputError(
                f"output '{shown}' contains the input '{item}' (replacing it would delete the "
                "input); write to another directory"
            )
        if src.is_dir() and real.is_relative_to(src) and not isinstance(item, DataRoot):
            raise OutputError(f"output '{shown}' lies inside the input '{item}'; write outside it")


# ---- the lock -----------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (``.NAME.lock`` beside it) until the block ends.

    Raises:
        OutputError: another process holds it (its pid is named).
    """
    lock = lock_path(out)
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            reason = e.strerror or str(e)
            why = f"cannot create {lock}: {reason}"
            raise OutputError(f"output '{out}' cannot be used: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise OutputError(
                f"output '{out}' is being written by another edgekd run (pid {holder}); "
                f"wait for it to end or choose another output (lock: {lock})"
            ) from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still holding the lock: nobody can be between open and lock
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    except OSError:
        return "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# ---- leftovers and the swap -----------------------------------------------------------------
def clean_leftovers(out: Path) -> None:
    """Remove what killed runs left beside ``out``; restore an output cut off mid-swap.

    Only call with the lock held: then no running writer owns these names.
    """
    parent = out.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.replace(olds.pop(), out)  # killed between the two renames of a swap
    for leftover in [*olds, *parent.glob(f".{out.name}.tmp-*")]:
        _remove(leftover)


def swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` to ``out``, replacing an old ``out`` only with ``overwrite``."""
    honour_umask(tmp)
    old = None
    if out.exists():
        if not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise OutputExistsError(f"output '{out}' appeared while it was being written")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def build_dir(out: Path, overwrite: bool, name: str | None = None) -> Iterator[Path]:
    """A temporary directory beside ``out``, swapped in when the block succeeds, else removed.

    ``name`` fixes the directory's suffix (``.NAME.tmp-<name>``) for writers in several
    processes that must agree on it (distributed training); the lock makes it unique.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        tmp = out.with_name(f".{out.name}.tmp-{name}")
        _remove(tmp)
        tmp.mkdir()
    try:
        with writing(out):
            yield tmp
            swap_in(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


# ---- the guard ------------------------------------------------------------------------------
class OutputGuard:
    """A checked output held under its lock; :meth:`build` writes it beside and swaps it in."""

    def __init__(self, path: Path, shown: str | os.PathLike, overwrite: bool) -> None:
        self.path = path
        self.shown = shown
        self.overwrite = overwrite

    @property
    def replacing(self) -> bool:
        """Whether an old, non-empty output exists and will be replaced."""
        return self.path.is_dir() and any(self.path.iterdir())

    def build(self, name: str | None = None):
        """Context manager: a temporary directory swapped in as the output on success."""
        return build_dir(self.path, self.overwrite, name)


@contextlib.contextmanager
def output_guard(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[Input] = (),
    reuse: bool = False,
    lock: bool = True,
    hint: str = "pass --overwrite to replace it",
) -> Iterator[OutputGuard]:
    """Check ``path`` (see :func:`check_output`), lock it and clean leftovers for the block.

    ``lock=False`` is for the non-main processes of a distributed run: the main one holds it.
    """
    inputs = list(inputs)
    out = check_output(path, overwrite=overwrite, inputs=inputs, reuse=reuse, hint=hint)
    if not lock:
        yield OutputGuard(out, path, overwrite)
        return
    with output_lock(out):
        clean_leftovers(out)
        check_output(path, overwrite=overwrite, inputs=inputs, reuse=reuse, hint=hint)
        yield OutputGuard(out, path, overwrite)


@contextlib.contextmanager
def guarded_dir(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Input] = ()
) -> Iterator[Path]:
    """:func:`output_guard` and :meth:`OutputGuard.build` in one: a directory to write into."""
    with output_guard(path, overwrite=overwrite, inputs=inputs) as guard, guard.build() as tmp:
        yield tmp
