"""The data layer: LLaVA-format datasets and the built-in dataset writers.

``DATASETS`` maps a built-in dataset name to its writer ``(out_dir, *, overwrite, ...) -> meta``.
"""

from edgekd.data.easyvqa import write_easy_vqa
from edgekd.data.fashion_grid import write_fashion_grid
from edgekd.data.llava import IGNORE_INDEX, LlavaCollator, LlavaDataset
from edgekd.data.samples import load_llava_json, subset_by_type, validate_samples

DATASETS = {"easy-vqa": write_easy_vqa, "fashion-grid": write_fashion_grid}

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "LlavaCollator",
    "LlavaDataset",
    "load_llava_json",
    "subset_by_type",
    "validate_samples",
    "write_easy_vqa",
    "write_fashion_grid",
]
