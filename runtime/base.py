"""The backend protocol every artifact implements, the greedy loop they share, and timings.

A backend opens one artifact directory (after :func:`edgekd.artifact.verify`) or checkpoint,
applies the chat template and image preprocessing it records (:mod:`edgekd.runtime.prompt`),
and decodes greedily with a KV cache through :func:`greedy_generate`, which times each stage
the same way for every backend. The stage methods of :class:`Backend` are what the parity
checks (:mod:`edgekd.export.parity`) and ``edgekd bench`` call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edgekd.errors import EdgeKDError


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


@runtime_checkable
class Backend(Protocol):
    """A loaded artifact or checkpoint. Arrays may be numpy arrays or CPU/GPU tensors.

    Attributes:
        name: The backend (``torch``, ``onnxruntime``, ``llamacpp``, ``tensorrt``, ...).
        context_length: Positions a prompt plus its answer may fill.
        eos_token_ids: Tokens that end an answer.
    """

    name: str
    context_length: int
    eos_token_ids: set[int]

    def encode(self, image, prompt: str) -> tuple[Any, Any]:
        """``(input_ids (1, L), pixel_values (1, 3, H, W) or None)`` as the checkpoint's
        processor makes them."""
        ...

    def visual_tokens(self, pixel_values) -> Any:
        """(B, 3, H, W) pixels -> (B, N, D_text) visual tokens (vision tower + projector)."""
        ...

    def prefill_logits(self, input_ids, pixel_values=None) -> Any:
        """(1, L, V) logits of a whole prompt from an empty cache. Runtimes that insert visual
        tokens as embeddings (llama.cpp) need not give logits at the image positions."""
        ...

    def generate_ids(
        self, input_ids, pixel_values=None, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy decoding of one encoded prompt, through :func:`greedy_generate`."""
        ...

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer; ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens."""
        ...

    def info(self) -> dict[str, Any]:
        """What a benchmark records about this backend."""
        ...

    def close(self) -> None:
        """Free what the backend holds (sessions, engines, contexts)."""
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
