"""(image, prompt) cases shared by the backend tests (tests/runtime is on sys.path)."""

from __future__ import annotations

from PIL import Image

PROMPTS = [
    (("red", (64, 64)), "What color is the shape?"),
    (("blue", (80, 48)), "What shape is in the image?"),  # resized by the processor
    (("green", (64, 64)), "Is there a <image> circle?"),  # image placed mid-prompt
    (None, "Say something."),  # text only
]


def image_for(spec):
    """A solid-colour image from a PROMPTS spec, or None for a text-only case."""
    return None if spec is None else Image.new("RGB", spec[1], spec[0])
