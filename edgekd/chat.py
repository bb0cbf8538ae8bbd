"""The ``<image>`` placeholder of LLaVA text and how a turn becomes chat-template content."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's placeholder in the JSON, whatever the processor's token is


def content_items(text: str) -> list[dict[str, str]]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "\\nWhat
    is it?"}]``: an image item at each placeholder, the text between them (empty text dropped)."""
    items: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return items
