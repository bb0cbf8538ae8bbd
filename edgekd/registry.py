"""Registries of named entries (export targets, distillation methods): each entry registered
once, found by name with one error that lists the valid names, and its code referenced as a
``"module:attribute"`` string imported on first use, so that reading a registry imports nothing
heavy (``edgekd --help`` stays fast)."""

from __future__ import annotations

import importlib
from typing import Any


class Registry(dict):
    """Entries by their ``name``, in registration order (``sort``: names listed sorted)."""

    def __init__(self, what: str, error: type[Exception] = ValueError, sort: bool = False):
        super().__init__()
        self.what, self.error, self.sort = what, error, sort

    def add(self, entry: Any) -> Any:
        """Register ``entry`` (a second registration of a name replaces the first)."""
        self[entry.name] = entry
        return entry

    def require(self, name: str) -> Any:
        """The entry ``name``; an unknown name raises ``error`` listing the valid ones."""
        if name not in self:
            raise self.error(f"unknown {self.what} '{name}'; valid: {', '.join(self.names())}")
        return self[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self)) if self.sort else tuple(self)


def resolve(ref: Any) -> Any:
    """The object a ``"module:attribute"`` reference names (anything else as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
