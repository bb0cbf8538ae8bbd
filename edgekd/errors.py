"""User-facing errors.

Every problem caused by the user's input (a bad path, a malformed file, incompatible models, an
output that cannot be written) raises an :class:`EdgeKDError`. The CLI prints its message as one
line and exits with code 2; library users catch it like any other exception.
"""

import errno
import importlib
import importlib.util


class EdgeKDError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class DataError(EdgeKDError, ValueError):
    """A dataset file, sample or image is malformed or missing."""


class ModelError(EdgeKDError, ValueError):
    """A checkpoint cannot be loaded, or two models are incompatible."""


class OptionError(EdgeKDError, ValueError):
    """A command-line option or a library argument has an invalid value."""


class OutputError(EdgeKDError, ValueError):
    """An output path cannot be used: a file, inside or around an input, or in use by a run."""


class OutputExistsError(EdgeKDError, FileExistsError):
    """An output path exists and ``overwrite`` was not requested."""


class MissingPackageError(EdgeKDError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, error: type[Exception] = MissingPackageError, what=None):
    """``import module``, or raise ``error`` naming the extra to install.

    Args:
        module: The module to import (``onnxruntime``, ``llama_cpp``, ...).
        extra: The edgekd extra that installs it.
        error: The exception type raised (callers keep their own error family).
        what: Who needs it, for the message (default: the module).
    """
    package = {"llama_cpp": "llama-cpp-python"}.get(module.split(".")[0], module)
    missing = error(f"{what or module} needs {package}: pip install 'edgekd[{extra}]'")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise missing
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing from None


class DiskFullError(EdgeKDError, OSError):
    """Writing an output failed because its file system is full (or over quota).

    ``errno`` is ``ENOSPC`` (or ``EDQUOT``) as for the ``OSError`` it replaces; the message is
    one line naming the output.
    """

    def __init__(self, message: str, code: int = errno.ENOSPC, filename: str | None = None):
        super().__init__(code, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message
