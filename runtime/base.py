"""The backend protocol: every artifact answers ``generate(image, prompt, max_new_tokens)``.

A backend loads one artifact directory (after :func:`edgekd.export.manifest.verify`), applies
the checkpoint's chat template and image preprocessing recorded in the manifest, and decodes
greedily with a KV cache. Timings are measured inside ``generate`` so that benchmarks compare
like with like across backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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


class Backend(Protocol):
    """A loaded artifact that generates answers."""

    name: str

    def generate(self, image, prompt: str, max_new_tokens: int = 32) -> Generation: ...
