"""Convert an original LLaVA-1.5 checkpoint (``LlavaLlamaForCausalLM``) into a transformers Llava.

The LLaVA repository (github.com/haotian-liu/LLaVA) saves its models in its own layout, which
transformers' ``LlavaForConditionalGeneration`` does not read; this module maps one onto the
native class, with identical logits, as :mod:`edgekd.models.tinyllava` does for TinyLLaVA.

Facts read from the LLaVA source (paths in that repository):

* ``llava/model/language_model/llava_llama.py``: ``LlavaLlamaForCausalLM`` is a
  ``LlamaForCausalLM`` whose ``model`` also holds ``mm_projector`` and ``vision_tower``; its
  config (``model_type`` ``"llava"``, ``architectures`` ``["LlavaLlamaForCausalLM"]``) is a
  ``LlamaConfig`` with the ``mm_*`` keys at the top level, no nested sub-configs.
* ``llava/model/multimodal_encoder/clip_encoder.py``: the tower wraps a ``CLIPVisionModel``
  (``model.vision_tower.vision_tower.vision_model.*``) named by ``mm_vision_tower``; features
  are ``hidden_states[mm_vision_select_layer]`` with the class token dropped for
  ``mm_vision_select_feature == "patch"`` (kept for ``cls_patch``): Llava's ``default`` and
  ``full``. Released checkpoints do not contain the tower (it is frozen and loaded from
  ``mm_vision_tower``, e.g. openai/clip-vit-large-patch14-336): it is read from there, or
  from ``vision_tower=`` (a CLIP checkpoint directory or hub id).
* ``llava/model/multimodal_projector/builder.py``: ``mlp2x_gelu`` is Linear, GELU, Linear
  (``model.mm_projector.{0,2}``), Llava's projector; ``linear`` has no Llava equivalent.
* ``llava/conversation.py`` (``conv_vicuna_v1``): the system sentence plus one space, then
  ``USER: {q} ASSISTANT: {a}</s>``, the open answer ``ASSISTANT:``; ``<image>\\n`` opens the
  question; the Llama tokenizer's BOS comes first. That is TinyLLaVA's ``llama`` template
  (:func:`edgekd.models.tinyllava_processor.chat_template`).
* ``llava/mm_utils.py``: ``image_aspect_ratio == "pad"`` pads to a square with the CLIP mean
  colour before the CLIP processor (shortest-edge resize, centre crop); images enter the text as
  the placeholder id -200, so ``<image>`` is added to the tokenizer (next free id; the
  embedding grows by mean rows when it must, as for TinyLLaVA).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import ModelError
from edgekd.io import sha256_file
from edgekd.models.checkpoint import LLAVA15_ARCHITECTURE as ARCHITECTURE
from edgekd.models.checkpoint import is_llava15, read_json
from edgekd.models.hub import resolve_source
from edgekd.models.tinyllava import (
    EMBED_KEY,
    HEAD_KEY,
    MANIFEST,
    grow_vocab,
    load_strict,
    load_weight_dir,
    map_state_dict,
    source_dtype,
)
from edgekd.models.tinyllava_processor import (
    IMAGE_TOKEN,
    TEMPLATE_EOS,
    bos_into_template,
    chat_template,
    load_tokenizer,
)
from edgekd.models.vlm import VLM, resolve_dtype
from edgekd.outputs import output_guard

SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # LLaVA -> transformers Llava
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's processor statistics (the defaults)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Source prefix -> target prefix, first match wins; any other source tensor is an error.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
# A CLIP checkpoint's tower (CLIPModel or CLIPVisionModel); its text side is not used.
_CLIP_UNUSED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# buffers older transformers saved that the current classes recompute (never weights)
_STALE_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")
_LLAVA_KEYS = ("mm_", "image_aspect_ratio", "freeze_mm", "tune_mm", "use_mm", "unfreeze_mm")


def convert_llava15(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Convert an original LLaVA-1.5 checkpoint into a Llava checkpoint at ``out``.

    Args:
        src: The LLaVA checkpoint: a directory or a hub id (liuhaotian/llava-v1.5-7b).
        out: Output directory; written atomically (complete or absent).
        vision_tower: The CLIP checkpoint for a source without the tower's weights (default:
            the source's ``mm_vision_tower``, a hub id or a directory).
        overwrite: Replace an existing, non-empty ``out``.
        dtype: ``float32`` (default), ``float16``, ``bfloat16`` or ``auto`` (the source's).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is not set (before any work).
        ModelError: not an original LLaVA checkpoint, an unsupported part, or tensors that do
            not fill the converted model exactly.
    """
    resolve_dtype(dtype)
    inputs = [src] + ([vision_tower] if vision_tower is not None else [])
    with output_guard(out, overwrite=overwrite, inputs=inputs) as guard:
        source = resolve_source(src, what="LLaVA checkpoint")
        path = source.path
        config = read_json(path / "config.json", what="a LLaVA checkpoint")
        if not is_llava15(config):  # LLaVA's own layout, whatever its language model
            raise ModelError(
                f"'{path}' is not an original LLaVA checkpoint: config.json has architectures "
                f"{config.get('architectures')}, expected ['{ARCHITECTURE}']"
            )
        strategy = check_supported(path, config)
        found = load_weight_dir(path)
        if found is None:
            raise ModelError(f"no weights in '{path}' (model.safetensors or an index)")
        tensors, files = found
        state, taken = map_state_dict(tensors, KEY_MAP, skip=_STALE_BUFFERS)
        counts = {f"{s}* -> {t}*": taken[s] for s, t in KEY_MAP}
        tower_source = None
        if not any(k.startswith("model.vision_tower.") for k in state):
            tower_source, tower_state = load_tower(vision_tower or config["mm_vision_tower"])
            state.update(tower_state)
            counts["tower from " + tower_source] = len(tower_state)
        vision_config = _vision_config(tower_source, path, vision_tower, config)
        tokenizer, added = load_tokenizer(path)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        tied = bool(config.get("tie_word_embeddings", False)) and HEAD_KEY not in state
        source_vocab = state[EMBED_KEY].shape[0]
        grow_vocab(state, max(len(tokenizer), image_token_id + 1), tied)
        llava = build_config(config, vision_config, state, tied, image_token_id, strategy)
        model = load_strict(llava, state, tied)
        target = resolve_dtype(dtype)
        model = model.to(source_dtype(tensors) if target == "auto" else target).eval()
        processor = build_processor(tokenizer, vision_config, strategy, config)
        manifest = {
            "source": source.hub_id or str(path.resolve()),
            "source_format": ARCHITECTURE,
            "source_config_sha256": sha256_file(path / "config.json"),
            "source_files": files,
            "vision_tower": tower_source or "in the checkpoint",
            "key_mapping": counts,
            "image_token": {"token": IMAGE_TOKEN, "id": image_token_id, "added": added},
            "vocab_size": {"source": source_vocab, "converted": llava.text_config.vocab_size},
            "vision_feature_layer": llava.vision_feature_layer,
            "vision_feature_select_strategy": {
                "llava": config.get("mm_vision_select_feature", "patch"),
                "transformers": strategy,
            },
            "image_aspect_ratio": config.get("image_aspect_ratio", "square"),
            "chat_template": "vicuna_v1",
            "dtype": str(model.dtype).removeprefix("torch."),
        }
        with guard.build() as tmp:
            VLM(model, processor).write(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def check_supported(path: Path, config: dict[str, Any]) -> str:
    """Refuse what Llava cannot represent, all problems at once; return Llava's strategy."""
    problems = []
    projector = config.get("mm_projector_type", "linear")
    if projector not in SUPPORTED_PROJECTORS:
        problems.append(
            f"mm_projector_type '{projector}' is not supported (supported: "
            f"{', '.join(SUPPORTED_PROJECTORS)}; Llava's projector is Linear-GELU-Linear)"
        )
    select = config.get("mm_vision_select_feature", "patch")
    if select not in SELECT_STRATEGY:
        problems.append(
            f"mm_vision_select_feature '{select}' is unknown (valid: {', '.join(SELECT_STRATEGY)})"
        )
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("square", "pad"):
        problems.append(
            f"image_aspect_ratio '{aspect}' is not supported (square, pad): 'anyres' (LLaVA-1.6) "
            "cuts images into several crops, which Llava's one-image input cannot hold"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end / mm_use_im_patch_token tokens are not supported")
    if "mm_vision_tower" not in config:
        problems.append("config.json has no mm_vision_tower")
    if ARCHITECTURE not in (config.get("architectures") or []):
        problems.append(
            f"architectures {config.get('architectures')}: only {ARCHITECTURE} (a Llama "
            "language model) is converted"
        )
    if config.get("rope_scaling"):
        problems.append(f"rope_scaling {config['rope_scaling']} is not converted")
    if problems:
        raise ModelError(f"cannot convert '{path}': " + "; ".join(problems))
    return SELECT_STRATEGY[select]


def load_tower(ref: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """The CLIP vision tower's tensors under Llava's names, from a checkpoint dir or hub id."""
    source = resolve_source(ref, what="CLIP vision tower")
    found = load_weight_dir(source.path)
    if found is None:
        raise ModelError(f"no weights in the vision tower '{source.path}'")
    state = {}
    for name, tensor in found[0].items():
        if name.startswith(_CLIP_UNUSED) or name.endswith(_STALE_BUFFERS):
            continue
        state["model.vision_tower." + name.removeprefix("vision_model.")] = tensor
    if not state:
        raise ModelError(f"'{source.path}' holds no vision_model.* tensors (not a CLIP tower)")
    return source.hub_id or str(source.path), state


def _vision_config(tower_source, path: Path, vision_tower, config: dict) -> dict[str, Any]:
    """The CLIP vision config: of the tower checkpoint (a CLIPConfig's ``vision_config`` or a
    CLIPVisionConfig), else the source's ``vision_tower/config.json``, else ``mm_vision_tower``'s
    config (a checkpoint holding the tower's weights but not its config)."""

    def folders():  # lazily: mm_vision_tower (maybe a hub id) only when nothing else has it
        for ref in (tower_source, vision_tower):
            if ref is not None:
                yield resolve_source(ref, what="CLIP vision tower").path
        yield path / "vision_tower"
        if tower_source is None and vision_tower is None:
            yield resolve_source(config["mm_vision_tower"], what="CLIP vision tower").path

    for folder in folders():
        if (folder / "config.json").is_file():
            data = read_json(folder / "config.json", what="a CLIP config")
            vision = data.get("vision_config", data)
            if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
                raise ModelError(f"'{folder}' is not a CLIP vision tower")
            return {**vision, "_source": str(folder)}
    raise ModelError(
        f"no CLIP vision config for '{path}': pass the tower checkpoint (vision_tower=...)"
    )


def build_config(
    config: dict, vision: dict, state: dict, tied: bool, image_token_id: int, strategy: str
):
    """A LlavaConfig: the top-level Llama keys, the CLIP tower, LLaVA's feature selection."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_keys = set(LlamaConfig().to_dict()) | {"rope_theta"}  # legacy key, folded by LlamaConfig
    text = {
        k: v
        for k, v in config.items()
        if k in text_keys and not k.startswith(_LLAVA_KEYS) and not k.startswith("_")
    }
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        text.pop(key, None)
    text.update(vocab_size=state[EMBED_KEY].shape[0], tie_word_embeddings=tied)
    vision_keys = set(CLIPVisionConfig().to_dict()) - {"model_type", "transformers_version"}
    try:
        text_config = LlamaConfig(**text)
        vision_config = CLIPVisionConfig(**{k: v for k, v in vision.items() if k in vision_keys})
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot rebuild the Llama and CLIP configs: {e}") from None
    if int(config.get("mm_hidden_size", vision_config.hidden_size)) != vision_config.hidden_size:
        raise ModelError(
            f"mm_hidden_size {config['mm_hidden_size']} differs from the CLIP tower's "
            f"hidden_size {vision_config.hidden_size}: the wrong vision tower"
        )
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1  # + class token
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=tokens - (strategy == "default"),
        projector_hidden_act="gelu",  # nn.GELU() in LLaVA's builder == exact erf GELU
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )


def build_processor(tokenizer, vision: dict, strategy: str, config: dict):
    """LlavaProcessor: CLIP preprocessing (padded to a square first for ``pad``), the
    tokenizer and the vicuna_v1 prompt."""
    from transformers import LlavaProcessor

    size = int(vision.get("image_size", 224))
    kwargs = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,  # bicubic
        **_saved_preprocessing(Path(vision["_source"])),
    }
    if config.get("image_aspect_ratio", "square") == "pad":
        from transformers import LlavaImageProcessorPil

        images = LlavaImageProcessorPil(do_pad=True, do_center_crop=True, **kwargs)
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        images = CLIPImageProcessorPil(**kwargs)
    template = chat_template(TEMPLATE_EOS["llama"], bos_into_template(tokenizer))
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=int(vision.get("patch_size", 32)),
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token
    )


def _saved_preprocessing(folder: Path) -> dict[str, Any]:
    """Mean, std and resampling of the tower's ``preprocessor_config.json``, when it has one."""
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return {}
    data = read_json(pre, what="an image processor")
    return {k: data[k] for k in ("image_mean", "image_std", "resample") if k in data}
