"""Tiny pretrained-looking parts for ``edgekd models assemble``: vision towers (SigLIP, CLIP,
DINOv2) and language models (a directory, or a GGUF file), random, saved as their own
checkpoints."""

from __future__ import annotations

import torch

PATCH, SIZE = 8, 32


def tiny_tower(kind: str, path, image_size: int = SIZE):
    """A random ``kind`` vision model saved to ``path``; returns it (eval mode)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH,
    )
    torch.manual_seed(1)
    if kind == "dinov2":
        # LayerScale factors far from 1, as real DINOv2 towers have (up to |7|)
        model = Dinov2Model(Dinov2Config(**sizes, layerscale_value=2.5, layer_norm_eps=1e-6))
    elif kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**sizes, hidden_act="quick_gelu"))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**sizes))
    model.save_pretrained(path)
    return model.eval()


def causal_lm(vlm):
    """The language half of a VLM as a standalone causal LM (same weights)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(vlm.config.text_config)
    lm.model.load_state_dict(vlm.language_model.state_dict())
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    return lm.eval()


def tiny_language(kind: str, path, tokenizer):
    """A tiny ``kind`` LM directory (model + tokenizer with its chat template); returns it."""
    from edgekd.models import build_vlm

    lm = causal_lm(build_vlm("tiny", tokenizer=tokenizer, decoder=kind, seed=3))
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return lm


def tiny_assembled(tmp_path, tokenizer, tower: str = "dinov2", language: str = "llama", **kw):
    """A VLM assembled from tiny parts under ``tmp_path``; returns its directory."""
    from edgekd.models.assemble import assemble

    tiny_tower(tower, tmp_path / "tower")
    tiny_language(language, tmp_path / "lm", tokenizer)
    assemble(tmp_path / "tower", tmp_path / "lm", tmp_path / "vlm", **kw)
    return tmp_path / "vlm"
