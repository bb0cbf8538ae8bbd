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
