"""User-facing errors.

Every problem caused by the user's input (a bad path, a malformed file, incompatible models)
raises an :class:`EdgeKDError`. The CLI prints its message as one line and exits non-zero;
library users catch it like any other exception.
"""


class EdgeKDError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class DataError(EdgeKDError, ValueError):
    """A dataset file, sample or image is malformed or missing."""


class ModelError(EdgeKDError, ValueError):
    """A checkpoint cannot be loaded, or two models are incompatible."""


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
    import importlib
    import importlib.util

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
