"""VLMs built from configs alone: tiny trainable models and shape-faithful presets.

* Tiny models (``tiny``, ``small``, ``base``) are SigLIP vision + Qwen2 text, small enough to train
  on two CPU cores in minutes. They share one vision-tower shape, as Switch-KD's teacher and
  student share SigLIP-so400m, so a student's vision features fit a teacher's projector.
  ``build_vlm(size, tower=..., decoder=...)`` builds the same shape with another member of the
  family: a CLIP tower (class token, pre-layernorm, quick GELU, CLIP preprocessing: LLaVA-1.5's
  layout) and a Llama, Mistral or Gemma decoder (:data:`TOWERS`, :data:`DECODERS`).
* Presets (``qwen2-0.5b-siglip-so400m``, ``qwen2.5-3b-siglip-so400m``) have the exact shapes of
  the paper's student and teacher (TinyLLaVA, SigLIP-so400m-patch14-384, mlp2x_gelu, features
  from layer -2 without the first token) with random weights, for latency and memory planning.
  Build them on ``device="meta"`` to count parameters without allocating memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import ModelError
from edgekd.models.checkpoint import resolve_checkpoint
from edgekd.models.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, train_tokenizer
from edgekd.models.vlm import VLM
from edgekd.outputs import output_guard


@dataclass(frozen=True)
class VisionShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None = None  # None: the tokenizer's length
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class VLMShape:
    vision: VisionShape
    text: TextShape
    vision_feature_layer: int | list[int] = -2
    select_strategy: str = "full"  # "default" drops the first vision token, as TinyLLaVA does
    tower: str = "siglip"  # a key of TOWERS
    decoder: str = "qwen2"  # a key of DECODERS
    extra: dict[str, Any] = field(default_factory=dict)


TOWERS = ("siglip", "clip")
DECODERS = ("qwen2", "llama", "mistral", "gemma")


_TINY_VISION = VisionShape(64, 128, 2, 4, image_size=64, patch_size=16)  # 16 visual tokens
_SO400M = VisionShape(1152, 4304, 27, 16, image_size=384, patch_size=14)  # 729 patches

SHAPES: dict[str, VLMShape] = {
    "tiny": VLMShape(_TINY_VISION, TextShape(64, 128, 2, 4, 2)),
    "small": VLMShape(_TINY_VISION, TextShape(128, 384, 4, 4, 2)),
    "base": VLMShape(_TINY_VISION, TextShape(256, 768, 6, 8, 2)),
    "qwen2-0.5b-siglip-so400m": VLMShape(
        _SO400M,
        TextShape(
            896,
            4864,
            24,
            14,
            2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        select_strategy="default",
    ),
    "qwen2.5-3b-siglip-so400m": VLMShape(
        _SO400M,
        TextShape(
            2048,
            11008,
            36,
            16,
            2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        select_strategy="default",
    ),
}
TINY_SIZES = ("tiny", "small", "base")
PRESETS = tuple(name for name in SHAPES if name not in TINY_SIZES)


def get_shape(name: str) -> VLMShape:
    if name not in SHAPES:
        raise ModelError(f"unknown model size '{name}'; valid: {', '.join(SHAPES)}")
    return SHAPES[name]


def build_image_processor(shape: VLMShape):
    """The tower's own preprocessing: SigLIP resizes to a square and scales to [-1, 1]; CLIP
    resizes the shortest edge, centre-crops and normalises with CLIP's mean and std."""
    size = shape.vision.image_size
    if shape.tower == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def build_processor(tokenizer, shape: VLMShape):
    """A LlavaProcessor: the tower's preprocessing, the tokenizer and its chat template."""
    from transformers import LlavaProcessor

    image_processor = build_image_processor(shape)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.vision.patch_size,
        vision_feature_select_strategy=shape.select_strategy,
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
        # SigLIP has no class token: one token per patch; CLIP adds its class token
        num_additional_image_tokens=int(shape.tower == "clip"),
    )


def _vision_config(shape: VLMShape):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    v = shape.vision
    sizes = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    if shape.tower == "clip":
        return CLIPVisionConfig(**sizes, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return SiglipVisionConfig(**sizes)


def _text_config(shape: VLMShape, tokenizer, vocab: int):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    t = shape.text
    kinds = {
        "qwen2": Qwen2Config,
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "gemma": GemmaConfig,
    }
    extra: dict[str, Any] = {}
    if shape.decoder == "mistral":
        extra["sliding_window"] = None  # Mistral-style, without sliding-window attention
    if shape.decoder == "gemma":
        extra["head_dim"] = t.hidden_size // t.num_attention_heads
        extra["hidden_activation"] = "gelu_pytorch_tanh"
    return kinds[shape.decoder](
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        vocab_size=vocab,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_config(shape: VLMShape, tokenizer):
    """A LlavaConfig (the shape's vision tower and text decoder configs) for ``shape``."""
    from transformers import LlavaConfig

    if shape.tower not in TOWERS:
        raise ModelError(f"unknown vision tower '{shape.tower}'; valid: {', '.join(TOWERS)}")
    if shape.decoder not in DECODERS:
        raise ModelError(f"unknown text decoder '{shape.decoder}'; valid: {', '.join(DECODERS)}")
    v, t = shape.vision, shape.text
    vocab = t.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ModelError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    tokens = (v.image_size // v.patch_size) ** 2 + (shape.tower == "clip")
    n_visual = tokens - (shape.select_strategy == "default")
    return LlavaConfig(
        vision_config=_vision_config(shape),
        text_config=_text_config(shape, tokenizer, vocab),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_visual,
        projector_hidden_act="gelu",
        vision_feature_layer=shape.vision_feature_layer,
        vision_feature_select_strategy=shape.select_strategy,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_vlm(
    size: str = "tiny",
    *,
    tokenizer=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tower: str | None = None,
    decoder: str | None = None,
    select_strategy: str | None = None,
    vision_feature_layer: int | list[int] | None = None,
    **text_overrides: Any,
) -> VLM:
    """Build a randomly initialised VLM of a named size or preset.

    Args:
        size: One of :data:`SHAPES` (``tiny``, ``small``, ``base`` or a preset).
        tokenizer: Shared tokenizer; by default one trained offline by :func:`train_tokenizer`.
            Teacher and student built with the same tokenizer can be distilled.
        seed: Seeds the weight initialisation: same size + seed gives the same weights.
        dtype: Parameter dtype.
        device: ``"meta"`` builds the structure without memory (for counting parameters).
        tower, decoder, select_strategy, vision_feature_layer: Replace the shape's family
            member (:data:`TOWERS`, :data:`DECODERS`) or feature selection.
        **text_overrides: Replace fields of the text shape (e.g. ``num_hidden_layers=1``).
    """
    from transformers import LlavaForConditionalGeneration

    shape = get_shape(size)
    if text_overrides:
        shape = replace(shape, text=replace(shape.text, **text_overrides))
    family = dict(
        tower=tower,
        decoder=decoder,
        select_strategy=select_strategy,
        vision_feature_layer=vision_feature_layer,
    )
    shape = replace(shape, **{k: v for k, v in family.items() if v is not None})
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer()
    config = build_config(shape, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.eval()
    return VLM(model, build_processor(tokenizer, shape))


def count_parameters(vlm: VLM) -> dict[str, int]:
    """Parameters per stage (shared tied weights counted once)."""

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm = n(vlm.language_model)
    head_tied = vlm.lm_head.weight is vlm.language_model.get_input_embeddings().weight
    return {
        "vision_tower": n(vlm.vision_tower),
        "projector": n(vlm.projector),
        "language_model": lm + (0 if head_tied else vlm.lm_head.weight.numel()),
        "total": sum(p.numel() for p in vlm.model.parameters()),
    }


def corpus_texts(llava_json: str | Path) -> list[str]:
    """Every conversation turn of a LLaVA-format file, for training a tokenizer on its domain."""
    from edgekd.data import load_llava_json

    texts = []
    for sample in load_llava_json(llava_json):
        texts.extend(turn["value"].replace(IMAGE_TOKEN, "") for turn in sample["conversations"])
    return texts


def _shared_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    src = resolve_checkpoint(path)  # a missing local folder fails here, not on the hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from '{path}': {e}") from None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ModelError(f"the tokenizer of '{path}' has no {IMAGE_TOKEN} token")
    return tokenizer


def create_checkpoint(
    size: str,
    out: str | Path,
    *,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    corpus: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Build a randomly initialised VLM and save it as a transformers checkpoint (atomically).

    Args:
        size: A tiny size or a preset name (see :data:`SHAPES`).
        out: Output directory.
        seed: Initialisation seed.
        tokenizer_from: Reuse the tokenizer of this checkpoint (teacher and student must share it).
        corpus: Otherwise, a LLaVA JSON whose text the new tokenizer learns merges from.
        overwrite: Replace an existing ``out``.

    Returns:
        Parameter counts per stage (see :func:`count_parameters`).
    """
    get_shape(size)
    # checked and locked before minutes of work, replaced only when the new checkpoint is whole
    with output_guard(out, overwrite=overwrite, inputs=[tokenizer_from, corpus]) as guard:
        if tokenizer_from is not None:
            tokenizer = _shared_tokenizer(tokenizer_from)
        else:
            tokenizer = train_tokenizer(corpus_texts(corpus) if corpus else ())
        vlm = build_vlm(size, tokenizer=tokenizer, seed=seed)
        with guard.build() as tmp:
            vlm.write(tmp)
    return count_parameters(vlm)
