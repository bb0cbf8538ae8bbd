"""The ``edgekd`` command line: a thin Typer shell over the library API.

The command layer: ``app.py`` (the Typer apps and shared options), ``stages.py`` (distill,
export, bench, plan, demo), ``tools.py`` (data, convert, models, profiles), ``tables.py`` (what
each command prints) and ``demo.py`` (the offline end-to-end demo).

Each command parses its options, calls one library function and renders the result. Heavy
imports (torch, transformers, onnxruntime, llama_cpp, tensorrt) happen inside the commands so
that ``edgekd --help`` answers at once.

:func:`main` is the error boundary: user errors (:class:`edgekd.errors.EdgeKDError`, malformed
options, outputs on a full, read-only or forbidden file system) print as one line on stderr with
exit code 2; ``--debug`` (or ``EDGEKD_DEBUG=1``) adds the traceback. Any other exception is a bug
and shows its traceback. SIGTERM unwinds like an error, so temporary outputs are removed.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback

import typer
from rich.markup import escape

from edgekd.cli import stages, tools  # noqa: F401 - registers the commands on the app
from edgekd.cli.app import DEBUG, DEBUG_ENV, app, err_console
from edgekd.errors import EdgeKDError
from edgekd.io import disk_full

try:  # typer 0.2x ships its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that context managers remove temporary outputs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


# Errors of the machine, not of edgekd: a full disk, a read-only or forbidden file system.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def error_line(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (a traceback)."""
    if isinstance(exc, click_errors.ClickException):
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return exc.format_message() + where
    if isinstance(exc, EdgeKDError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        path = exc.filename or "a file"
        full = disk_full(exc, path)
        return str(full) if full is not None else f"cannot access '{path}': {exc.strerror}"
    return None


def main() -> None:
    """Entry point: run the app; user errors become one line and exit code 2 (see the module)."""
    # edgekd draws its own progress (rich); the libraries' tqdm bars and info logs are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGTERM, _terminate)
    DEBUG["on"] = False
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError:
        sys.exit(2)  # the help has been printed
    except Terminated:
        err_console.print("[bold red]terminated[/bold red] (SIGTERM); temporary outputs removed")
        sys.exit(143)
    except typer.Abort:
        err_console.print("[bold red]aborted[/bold red]")
        sys.exit(1)
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise  # a bug: its traceback shows where it comes from
        if DEBUG["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(e)
        text = " ".join(part.strip() for part in line.splitlines() if part.strip())
        err_console.print(
            f"[bold red]error:[/bold red] {escape(text)}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
