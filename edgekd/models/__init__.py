"""The model layer: an adapter over transformers' LLaVA family, tiny models, presets."""

from edgekd.models.factory import PRESETS, SHAPES, TINY_SIZES, build_vlm, count_parameters
from edgekd.models.tokenizer import train_tokenizer
from edgekd.models.vlm import VLM, check_compatible, load_processor

__all__ = [
    "PRESETS",
    "SHAPES",
    "TINY_SIZES",
    "VLM",
    "build_vlm",
    "check_compatible",
    "count_parameters",
    "load_processor",
    "train_tokenizer",
]
