"""The model layer: an adapter over transformers' LLaVA family, tiny models, presets.

``dims`` (the language model's dimensions) imports nothing heavy; the rest loads torch and
transformers on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "PRESETS": "factory",
    "SHAPES": "factory",
    "TINY_SIZES": "factory",
    "build_vlm": "factory",
    "count_parameters": "factory",
    "train_tokenizer": "tokenizer",
    "VLM": "vlm",
    "check_compatible": "vlm",
    "load_processor": "vlm",
    "TextDims": "dims",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'edgekd.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"edgekd.models.{_NAMES[name]}"), name)
