"""Helpers shared by the distillation tests (imported by name: tests/distill is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llava_samples import COLOURS, image_sample, text_sample, write_samples
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")


def write_dataset(root: Path, n: int = 24, text_only: int = 4, seed: int = 0) -> Path:
    """``n`` image questions (coloured squares) plus ``text_only`` questions without an image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        color = COLORS[i % 3]
        rgb = COLOURS[color]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        x, y = rng.integers(4, 30, size=2)
        pixels[y : y + 24, x : x + 24] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(
            image_sample(f"s{i}", f"images/{i}.png", "What color is the shape?", color, "color")
        )
    for i in range(text_only):
        samples.append(text_sample(f"t{i}", "Is red a color?", "yes"))
    return write_samples(root / "train.json", samples)


FAST = {
    "training.max_steps": 3,
    "training.global_batch_size": 4,
    "training.per_device_batch_size": 4,
    "training.max_length": 64,
    "training.learning_rate": 1e-3,
    "loss.top_n": 32,
    "loss.k_max": 8,
}


def clip_llama_vlm():
    """A tiny LLaVA of a family the presets do not use: CLIP tower (class token, quick_gelu)
    with a Llama decoder, random weights. Returns the VLM and its (vision, text) configs."""
    from edgekd.models import build_vlm

    vlm = build_vlm("tiny", tower="clip", decoder="llama")
    return vlm, vlm.config.vision_config, vlm.config.text_config


def saved_for_backward(module, run) -> list:
    """The tensors autograd keeps for the backward while ``run()`` runs (``module``'s parameters
    left out), each storage once (a view counts as its base)."""
    import torch

    params = {id(p) for p in module.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            seen[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return list(seen.values())
