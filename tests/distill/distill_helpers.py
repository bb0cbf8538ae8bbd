"""Helpers shared by the distillation tests (imported by name: tests/distill is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[color]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        x, y = rng.integers(4, 30, size=2)
        pixels[y : y + 24, x : x + 24] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(
            {
                "id": f"s{i}",
                "image": f"images/{i}.png",
                "question_type": "color",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    for i in range(text_only):
        samples.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": "Is red a color?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(samples))
    return path


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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from edgekd.models import VLM

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=99)
    return VLM(Llava(config), processor=None), vision, text
