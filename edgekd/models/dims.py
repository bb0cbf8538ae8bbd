"""The language model's dimensions, derived once from its config.

Exporters size KV caches and engine shapes with them, the planner and the roofline count bytes
with them, and the manifest records them (``text_dims``), so every reader of an artifact takes
the same numbers instead of re-deriving ``head_dim`` or the key/value head count::

    dims = TextDims.from_config(vlm.config.text_config)
    dims.kv_bytes_per_token(2)   # layers x kv_heads x head_dim x 2 (K and V) x 2 bytes
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TextDims:
    """Sizes of a decoder-only language model.

    Attributes:
        layers: Decoder layers.
        hidden: Hidden size (the width of a token embedding).
        heads: Query heads.
        kv_heads: Key/value heads (``heads`` without grouped-query attention).
        head_dim: Width of one head (``hidden // heads`` unless the config sets it).
        vocab: Rows of the embedding table (may exceed the tokenizer).
        context: Positions the model was built for.
        intermediate: Width of the MLP's hidden layer (``intermediate_size``); ``None`` in
            manifests written before it was recorded.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    intermediate: int | None = None

    @classmethod
    def from_config(cls, text_config: Any) -> TextDims:
        """From a transformers text config, or its ``config.json`` dict."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(text_config, dict):
                value = text_config.get(key, default)
            else:
                value = getattr(text_config, key, default)
            return default if value is None else value

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=hidden,
            heads=heads,
            kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            vocab=int(get("vocab_size")),
            context=int(get("max_position_embeddings", 2048)),
            intermediate=int(get("intermediate_size")) if get("intermediate_size") else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextDims:
        """From :meth:`to_dict` output (a manifest's ``text_dims``)."""
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__ if k in data})

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """KV-cache bytes one context token adds: ``layers x kv_heads x head_dim x 2 x size``."""
        return self.layers * self.kv_heads * self.head_dim * 2 * int(element_bytes)


# Vision towers whose embeddings put a class token before the patches (SigLIP has none)
CLASS_TOKEN_TOWERS = ("clip_vision_model", "dinov2")


def vision_mlp_width(vision: Any) -> int:
    """The hidden width of a vision tower's MLP: DINOv2 sets it as ``mlp_ratio`` x hidden (its
    config has no ``intermediate_size``), SigLIP and CLIP as ``intermediate_size``."""
    ratio = getattr(vision, "mlp_ratio", None)
    if ratio:
        return int(vision.hidden_size * ratio)
    return int(vision.intermediate_size)


def image_tokens(config: Any) -> int:
    """Visual tokens one image becomes in a Llava config, as the processor expands ``<image>``:
    the tower's patches, plus its class token (CLIP, DINOv2), less the first token under the
    ``default`` feature selection (LLaVA-1.5: 577 -> 576; TinyLLaVA's SigLIP: 729 -> 728)."""
    vision = config.vision_config
    size = vision.image_size
    h, w = (size, size) if isinstance(size, int) else size
    tokens = (int(h) // vision.patch_size) * (int(w) // vision.patch_size)
    tokens += getattr(vision, "model_type", "") in CLASS_TOKEN_TOWERS
    return tokens - (config.vision_feature_select_strategy == "default")
