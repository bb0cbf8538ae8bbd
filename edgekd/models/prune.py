"""Depth pruning: a student cut from its teacher by keeping some of its layers.

Minitron-style depth pruning keeps a subset of the decoder layers (and, optionally, of the vision
tower's) and drops the rest; everything else is kept as it is: embeddings, final norm, head,
projector, tokenizer, processor and chat template. The student therefore shares its teacher's
vocabulary, image tokens and vision width, which distillation and the visual switch need.

The pruned checkpoint is a standard ``LlavaForConditionalGeneration`` directory with
``edgekd_prune.json`` beside it: the source and the layers kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import ModelError
from edgekd.models.factory import count_parameters
from edgekd.models.vlm import VLM
from edgekd.outputs import output_guard

RECORD = "edgekd_prune.json"


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices spread evenly, the first and last always kept."""
    if not 1 <= keep <= total:
        raise ModelError(f"cannot keep {keep} of {total} layers: choose 1 to {total}")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def layers_to_keep(
    total: int, indices: list[int] | None, count: int | None, what: str
) -> list[int] | None:
    """The sorted layer indices to keep, from explicit ``indices`` or a ``count``; None: all.

    Raises ModelError, one line, for both or an empty, duplicated or out-of-range choice.
    """
    if indices is not None and count is not None:
        raise ModelError(f"{what}: give the layer indices or their number, not both")
    if count is not None:
        if not 1 <= count <= total:
            raise ModelError(f"{what}: cannot keep {count} of {total} layers; choose 1 to {total}")
        return evenly_spaced(total, count)
    if indices is None:
        return None
    if not indices:
        raise ModelError(f"{what}: no layer index given; keep at least one of 0..{total - 1}")
    outside = sorted({i for i in indices if not 0 <= i < total})
    if outside:
        listed = ", ".join(map(str, outside))
        raise ModelError(f"{what}: layer {listed} out of range; the model has 0..{total - 1}")
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise ModelError(f"{what}: layer {', '.join(map(str, twice))} given twice")
    return sorted(indices)


def _layer_list(root: torch.nn.Module, total: int, what: str) -> tuple[torch.nn.Module, str]:
    """The ModuleList of ``root``'s ``total`` transformer layers, and its attribute name."""
    found = [
        (parent, name)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) == total
    ]
    if len(found) != 1:
        raise ModelError(f"cannot find the {what}'s {total} layers (found {len(found)} lists)")
    return found[0]


def _keep(root: torch.nn.Module, keep: list[int], total: int, what: str) -> None:
    """Keep ``keep`` of ``root``'s layers in place; attention modules learn their new index."""
    parent, name = _layer_list(root, total, what)
    kept = torch.nn.ModuleList([getattr(parent, name)[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # the KV cache slot of an attention module
                module.layer_idx = new_index
    setattr(parent, name, kept)


def prune_vlm(
    vlm: VLM, text_keep: list[int] | None, vision_keep: list[int] | None
) -> dict[str, Any]:
    """Prune ``vlm`` in place; returns what was kept, per stack."""
    config = vlm.model.config
    record: dict[str, Any] = {}
    text = config.text_config
    if text_keep is not None:
        total = text.num_hidden_layers
        _keep(vlm.language_model, text_keep, total, "language model")
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[i] for i in text_keep]
        text.num_hidden_layers = len(text_keep)
        record["text_layers"] = {"kept": text_keep, "of": total}
    if vision_keep is not None:
        feature = config.vision_feature_layer
        layers = feature if isinstance(feature, list) else [feature]
        if any(f >= 0 for f in layers):
            raise ModelError(
                f"vision_feature_layer {feature} counts from the start; pruning the vision "
                "tower needs it counted from the end (negative), as LLaVA's -2"
            )
        vision = config.vision_config
        total = vision.num_hidden_layers
        if len(vision_keep) < max(-f for f in layers):
            raise ModelError(
                f"vision_feature_layer {feature} needs at least {max(-f for f in layers)} "
                f"vision layers; {len(vision_keep)} kept"
            )
        _keep(vlm.vision_tower, vision_keep, total, "vision tower")
        vision.num_hidden_layers = len(vision_keep)
        if getattr(vision, "stage_names", None):  # a backbone config (DINOv2): one stage a layer
            vision.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(vision_keep) + 1)]
            vision.out_features = None  # the last stage, as a fresh config has it
        record["vision_layers"] = {"kept": vision_keep, "of": total}
    return record


def prune(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    keep_layers: list[int] | None = None,
    layers: int | None = None,
    keep_vision_layers: list[int] | None = None,
    vision_layers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a copy of checkpoint ``src`` with only the chosen layers, to ``out``.

    Args:
        keep_layers / layers: decoder layer indices to keep, or how many (evenly spaced).
        keep_vision_layers / vision_layers: the same for the vision tower (optional).
    Returns the record written to ``out/edgekd_prune.json``.
    Raises ModelError (one line) for a bad choice of layers, before anything is written.
    """
    if all(v is None for v in (keep_layers, layers, keep_vision_layers, vision_layers)):
        raise ModelError("nothing to prune: give --keep-layers or --layers (or the vision ones)")
    with output_guard(out, overwrite=overwrite) as guard:  # a taken output fails first
        vlm = VLM.from_pretrained(src, dtype="auto")
        text_keep = layers_to_keep(
            vlm.config.text_config.num_hidden_layers, keep_layers, layers, "--keep-layers/--layers"
        )
        vision_keep = layers_to_keep(
            vlm.config.vision_config.num_hidden_layers,
            keep_vision_layers,
            vision_layers,
            "--keep-vision-layers/--vision-layers",
        )
        before = count_parameters(vlm)["total"]
        record = {"source": str(src), **prune_vlm(vlm, text_keep, vision_keep)}
        record["parameters"] = {"before": before, "after": count_parameters(vlm)["total"]}
        with guard.build() as tmp:
            vlm.write(tmp)
            (Path(tmp) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
