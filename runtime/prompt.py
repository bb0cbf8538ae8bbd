"""One user turn -> the text, token ids and pixels a model sees; the same for every backend.

Every backend renders a prompt with the checkpoint's chat template and the content items of
:func:`user_content`: ``<image>`` in the prompt marks where the image goes; without it an image
goes first, followed by a newline, as in LLaVA data (``"<image>\\n{question}"``). Backends that
carry the checkpoint's processor (torch, onnxruntime, TensorRT, and the parity checks) encode
with :func:`encode_prompt`; llama.cpp, which has no processor, renders the manifest's template
with :func:`render_template` and tokenizes itself. :func:`check_image_slots` is the one check
that a prompt's image tokens and the images' visual tokens agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.chat import IMAGE_PLACEHOLDER, content_items
from edgekd.errors import EdgeKDError


class PromptError(EdgeKDError, ValueError):
    """A prompt or image that no backend can take as given."""


def user_content(prompt: str, has_image: bool) -> list[dict[str, str]]:
    """One user turn as chat-template content items (see the module docstring)."""
    if has_image and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
    return content_items(prompt)


def render_prompt(processor, prompt: str, has_image: bool) -> str:
    """The chat-template text of one user turn (generation prompt added), by the processor."""
    if getattr(processor, "chat_template", None):
        owner = processor
        messages = [{"role": "user", "content": user_content(prompt, has_image)}]
    else:
        if has_image and IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        owner = getattr(processor, "tokenizer", processor)
        messages = [{"role": "user", "content": prompt}]
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_template(template: str, prompt: str, has_image: bool, **special: str) -> str:
    """The same text from a bare Jinja chat template, rendered as transformers renders it.

    ``special`` (``bos_token``, ``eos_token``) is passed to the template as transformers does.
    """
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"the chat template refused the prompt: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    content = user_content(prompt, has_image)
    if has_image and sum(item["type"] == "image" for item in content) != 1:
        raise PromptError("the prompt must hold one '<image>' (backends take one image)")
    return env.from_string(template).render(
        messages=[{"role": "user", "content": content}],
        add_generation_prompt=True,
        raise_exception=raise_exception,
        **special,
    )


def encode_prompt(processor, image, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(input_ids (1, L) int64, pixel_values (1, 3, H, W) float32 or None)`` for one prompt.

    Args:
        processor: A LLaVA processor (an artifact's saved one, or a checkpoint's).
        image: A PIL image, an image path, or ``None`` for a text-only prompt.
        prompt: The user's question.
    """
    image = open_image(image)
    text = render_prompt(processor, prompt, image is not None)
    if image is None:
        ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="np")["input_ids"]
        return ids.astype(np.int64), None
    enc = processor(text=text, images=[image], return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["pixel_values"].astype(np.float32)


def open_image(image):
    """A path opened as an RGB PIL image; anything else is returned as it is."""
    if image is None or not isinstance(image, (str, Path)):
        return image
    from PIL import Image

    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except OSError as e:
        raise PromptError(f"cannot read image '{image}': {e}") from None


def check_image_slots(n_slots: int, n_visual: int) -> None:
    """A prompt's image tokens must equal the visual tokens its images give."""
    if n_slots != n_visual:
        raise PromptError(
            f"the prompt has {n_slots} image tokens but the images give {n_visual} visual tokens"
        )


def split_at_image(ids, image_token_id: int) -> list:
    """Token ids with at most one run of image tokens -> ``[prefix, "image", suffix]``
    (``[ids]`` without one), for runtimes that insert the image themselves (llama.cpp)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    pos = [i for i, t in enumerate(ids) if t == image_token_id]
    if not pos:
        return [ids]
    if pos[-1] - pos[0] + 1 != len(pos):
        raise PromptError("this backend takes one image per prompt (one run of image tokens)")
    return [ids[: pos[0]], "image", ids[pos[-1] + 1 :]]


def pixels_to_uint8(pixels, mean, std, rescale_factor: float) -> np.ndarray:
    """Undo rescale + normalize: (3, H, W) pixel values -> the (H, W, 3) uint8 image they came
    from (exact for images the processor resized: every value is a rounded byte)."""
    mean = np.asarray(mean, np.float64)[:, None, None]
    std = np.asarray(std, np.float64)[:, None, None]
    x = (np.asarray(pixels, np.float64) * std + mean) / float(rescale_factor)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)
