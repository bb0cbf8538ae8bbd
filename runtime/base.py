"""The backend protocol: every artifact answers ``generate(image, prompt, max_new_tokens)``.

A backend loads one artifact directory (after :func:`edgekd.export.manifest.verify`), applies
the checkpoint's chat template and image preprocessing recorded in the manifest, and decodes
greedily with a KV cache. Timings are measured inside ``generate`` so that benchmarks compare
like with like across backends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgekd.chat import IMAGE_PLACEHOLDER, content_items
from edgekd.errors import EdgeKDError


def user_content(prompt: str, has_image: bool) -> list[dict[str, str]]:
    """One user turn as chat-template content items; every backend renders prompts with it.

    ``<image>`` in ``prompt`` marks where the image goes; without it an image goes first,
    followed by a newline, as in LLaVA data (``"<image>\\n{question}"``).
    """
    if has_image and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
    return content_items(prompt)


class BackendError(EdgeKDError, RuntimeError):
    """A backend cannot run here (missing package, no GPU) or its artifact is unusable."""


@dataclass
class Generation:
    """One greedy generation and where its time went."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    vision_ms: float = 0.0  # image -> visual tokens
    prefill_ms: float = 0.0  # prompt (with visual tokens) -> first token; TTFT = vision + prefill
    decode_ms: float = 0.0  # every token after the first
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_ms(self) -> float:
        return self.vision_ms + self.prefill_ms

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / (self.decode_ms / 1e3) if self.decode_ms > 0 and n else 0.0


class Backend(Protocol):
    """A loaded artifact that generates answers."""

    name: str

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer; ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens."""
        ...


def greedy_generate(
    *,
    encode_image: Callable[[], Any],
    prefill: Callable[[Any], int],
    step: Callable[[int, int], int],
    prompt_tokens: int,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    decode: Callable[[list[int]], str],
    has_image: bool,
    sync: Callable[[], None] = lambda: None,
    extra: dict[str, Any] | None = None,
    context_length: int | None = None,
) -> Generation:
    """The greedy loop every backend shares, timed per stage.

    Args:
        encode_image: Runs the vision encoder (returns visual tokens, or None without an image).
        prefill: Takes the visual tokens, runs the prompt, returns the first generated token.
        step: Takes the last token and its position, returns the next token (KV cache kept by
            the backend).
        prompt_tokens: Prompt length, image tokens included (the first decode position).
        stop_ids: Tokens that end generation (kept in the output, as transformers does).
        decode: Token ids -> text.
        has_image: Without an image the vision time is 0.
        sync: Waits for the device (CUDA backends), so stage boundaries are honest.
        context_length: The model's positions; a prompt that cannot take ``max_new_tokens``
            more is refused before any work.

    Raises:
        BackendError: the prompt plus ``max_new_tokens`` exceed ``context_length``.
    """
    if context_length is not None and prompt_tokens + max_new_tokens > context_length:
        raise BackendError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
            f"context length {context_length}"
        )
    stops = set(stop_ids)
    t0 = time.perf_counter()
    visual = encode_image()
    sync()
    t1 = time.perf_counter() if has_image else t0
    tokens = [prefill(visual)]
    t2 = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in stops:
        tokens.append(step(tokens[-1], prompt_tokens + len(tokens) - 1))
    sync()
    t3 = time.perf_counter()
    return Generation(
        decode(tokens).strip(),
        tokens,
        prompt_tokens,
        vision_ms=(t1 - t0) * 1e3,
        prefill_ms=(t2 - t1) * 1e3,
        decode_ms=(t3 - t2) * 1e3,
        extra=extra or {},
    )
