"""A LLaVA-style VLM assembled from a pretrained vision tower and a pretrained language model.

The first step of LLaVA and TinyLLaVA Factory: vision tower -> freshly initialised projector ->
language model, saved as a standard ``LlavaForConditionalGeneration`` checkpoint with its
processor (the tower's preprocessing at the chosen image size, the language model's tokenizer
with an ``<image>`` token added, and the language model's own chat template, taught to render
image items), plus ``edgekd_assemble.json``: where each part came from and what was chosen.

Towers (``--vision``): a SigLIP, CLIP or DINOv2 checkpoint directory or hub id, a vision model
or a full SigLIP/CLIP model (its vision half is taken). At another ``--image-size`` than the
tower's, its position table is resized once, here, by the bicubic interpolation transformers
applies per call (``interpolate_pos_encoding``), so the checkpoint holds the exact table for
its resolution and exporters trace no resampling.

Language models (``--language``): a causal LM checkpoint directory or hub id, or a GGUF file,
dequantized to fp32 by transformers with its tokenizer read from the file's metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgekd.chat import with_image_items
from edgekd.errors import ModelError
from edgekd.io import first_line
from edgekd.models.checkpoint import read_json
from edgekd.models.dims import CLASS_TOKEN_TOWERS, image_tokens
from edgekd.models.factory import count_parameters
from edgekd.models.hub import resolve_source
from edgekd.models.llava15 import CLIP_MEAN, CLIP_STD
from edgekd.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from edgekd.models.tinyllava_processor import bos_into_template
from edgekd.models.tokenizer import IMAGE_TOKEN
from edgekd.models.vlm import VLM
from edgekd.outputs import output_guard

RECORD = "edgekd_assemble.json"
# --projector -> Llava's projector activation (linear, act, linear: LLaVA-1.5's mlp2x_gelu)
PROJECTORS = {"mlp2x_gelu": "gelu"}
SELECT = ("default", "full")


@dataclass(frozen=True)
class Tower:
    """How a vision tower's checkpoint becomes Llava's ``vision_tower``.

    Attributes:
        full: The model_type of the full (image-text) model holding it, if any.
        crop: Preprocessing resizes the shortest edge and centre-crops (else: a square resize).
        positions: Its position table's key, and whether it is an embedding table (2-D).
    """

    full: str | None
    crop: bool
    mean: list[float]
    std: list[float]
    positions: str
    table_2d: bool


TOWERS = {
    "siglip_vision_model": Tower(
        "siglip", False, [0.5] * 3, [0.5] * 3,
        "embeddings.position_embedding.weight", True,
    ),
    "clip_vision_model": Tower(
        "clip", True, CLIP_MEAN, CLIP_STD,
        "embeddings.position_embedding.weight", True,
    ),
    "dinov2": Tower(
        None, True, IMAGENET_MEAN, IMAGENET_STD, "embeddings.position_embeddings", False,
    ),
}  # fmt: skip
_FULL = {t.full: kind for kind, t in TOWERS.items() if t.full}


def assemble(
    vision: str | os.PathLike,
    language: str | os.PathLike,
    out: str | os.PathLike,
    *,
    projector: str = "mlp2x_gelu",
    image_size: int | None = None,
    select: str = "default",
    feature_layer: int = -2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a Llava checkpoint of ``vision`` -> a new projector -> ``language`` to ``out``.

    Args:
        vision: Vision tower checkpoint (directory or hub id).
        language: Causal LM checkpoint (directory or hub id) or a ``.gguf`` file.
        projector: :data:`PROJECTORS`.
        image_size: Input resolution (a multiple of the tower's patch); default: the tower's
            preprocessing crop size, else its config's ``image_size``.
        select: ``default`` drops the tower's first token (a class token, or SigLIP's first
            patch as TinyLLaVA does), ``full`` keeps every token.
        feature_layer: The tower's ``hidden_states`` index the projector reads (LLaVA: -2).
        seed: Seeds the projector's initialisation.
    Returns the record written to ``out/edgekd_assemble.json``.
    Raises ModelError (one line) for parts that cannot be assembled, before anything is written.
    """
    if projector not in PROJECTORS:
        raise ModelError(f"projector '{projector}' is not built; valid: {', '.join(PROJECTORS)}")
    if select not in SELECT:
        raise ModelError(f"--select '{select}'; valid: {', '.join(SELECT)}")
    inputs = [p for p in (vision, language) if Path(str(p)).expanduser().exists()]
    with output_guard(out, overwrite=overwrite, inputs=inputs) as guard:
        kind, vision_config, tower_state, vision_dir = load_tower(vision)
        size = _image_size(vision_config, image_size or _processor_size(vision_dir))
        _check_feature_layer(feature_layer, vision_config.num_hidden_layers)
        if size != vision_config.image_size:
            key = TOWERS[kind].positions
            tower_state[key] = resize_positions(tower_state[key], TOWERS[kind], vision_config, size)
            vision_config.image_size = size
        lm, tokenizer = load_language(language)
        vlm = _build(
            kind, vision_config, tower_state, lm, tokenizer, vision_dir,
            projector=projector, select=select, feature_layer=feature_layer, seed=seed,
        )  # fmt: skip
        record = {
            "vision": {"source": str(vision), "model_type": kind},
            "language": {"source": str(language), "model_type": lm.config.model_type},
            "projector": projector,
            "image_size": size,
            "select": select,
            "feature_layer": feature_layer,
            "visual_tokens": vlm.num_image_tokens(),
            "image_token_id": vlm.config.image_token_index,
            "seed": seed,
            "parameters": count_parameters(vlm),
        }
        notice = vision_dir / "NOTICE"
        if notice.is_file():  # licence notices travel with the weights
            record["vision"]["notice"] = notice.read_text().strip()
        with guard.build() as tmp:
            vlm.write(tmp)
            (Path(tmp) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---- the vision tower ---------------------------------------------------------------------
def load_tower(src: str | os.PathLike):
    """``(kind, vision config, tower state dict, directory)`` of a vision checkpoint."""
    from transformers import CONFIG_MAPPING, AutoModel

    folder = resolve_source(src, what="vision tower").path
    if not (folder / "config.json").is_file():
        raise ModelError(f"vision tower '{src}' has no config.json")
    raw = read_json(folder / "config.json", what="a model config")
    model_type = raw.get("model_type")
    if model_type in _FULL:
        kind, fields = _FULL[model_type], raw.get("vision_config") or {}
    elif model_type in TOWERS:
        kind, fields = model_type, raw
    else:
        raise ModelError(
            f"'{src}' is not a vision tower Llava can host (model_type '{model_type}'); "
            f"give a SigLIP, CLIP or DINOv2 vision checkpoint"
        )
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures")}
    try:
        config = CONFIG_MAPPING[kind](**fields)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot read the vision config of '{src}': {first_line(e)}") from None
    try:
        model, info = AutoModel.from_pretrained(
            str(folder), config=None if model_type in _FULL else config, dtype=torch.float32,
            output_loading_info=True,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load the vision tower '{src}': {first_line(e)}") from None
    missing = [
        k for k in info.get("missing_keys") or [] if model_type in TOWERS or "vision_model." in k
    ]
    if missing:
        raise ModelError(f"vision tower '{src}': {missing[0]} is missing from its weights")
    if model_type in _FULL:
        state = dict(model.vision_model.state_dict())  # a SigLIP/CLIP vision model itself
    else:
        state = dict(model.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return kind, config, state, folder


def _processor_size(folder: Path) -> int | None:
    """The crop (or square) size of the tower's own preprocessing, when it has one: DINOv2's
    config says 518 px (its position grid) while it runs at 224."""
    saved = folder / "preprocessor_config.json"
    if not saved.is_file():
        return None
    data = read_json(saved, what="an image processor")
    for key in ("crop_size", "size"):
        value = data.get(key)
        if isinstance(value, dict) and "height" in value:
            return int(value["height"])
    return None


def _image_size(config, image_size: int | None) -> int:
    size = int(image_size or config.image_size)
    patch = int(config.patch_size)
    if size <= 0 or size % patch:
        raise ModelError(
            f"--image-size {size} is not a multiple of the tower's patch size {patch}; "
            f"e.g. {max(patch, size // patch * patch)}"
        )
    return size


def _check_feature_layer(layer: int, n: int) -> None:
    if not -(n + 1) <= layer <= n:
        raise ModelError(
            f"--feature-layer {layer}: the tower has {n} layers, so hidden_states "
            f"{-(n + 1)}..{n} (LLaVA: -2)"
        )


def resize_positions(table: torch.Tensor, tower: Tower, config, size: int) -> torch.Tensor:
    """The position table for ``size`` px: the patch grid resampled bicubically (as
    transformers' ``interpolate_pos_encoding`` does per call), class rows kept."""
    rows = table if tower.table_2d else table[0]
    cls = int(config.model_type in CLASS_TOKEN_TOWERS)
    grid = rows[cls:]
    old = int(round(grid.shape[0] ** 0.5))
    if old * old != grid.shape[0]:
        raise ModelError(f"the position table has {grid.shape[0]} patch rows, not a square grid")
    new = size // int(config.patch_size)
    dim = grid.shape[-1]
    image = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    image = torch.nn.functional.interpolate(
        image, size=(new, new), mode="bicubic", align_corners=False
    )
    resized = image.permute(0, 2, 3, 1).reshape(new * new, dim).to(table.dtype)
    out = torch.cat([rows[:cls], resized], dim=0)
    return out if tower.table_2d else out[None]


# ---- the language model -------------------------------------------------------------------
def load_language(src: str | os.PathLike):
    """``(causal LM in fp32, tokenizer)`` from a checkpoint directory, hub id or GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(src)).expanduser()
    if path.is_file() or str(src).endswith(".gguf"):
        check_gguf(path)
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        where, extra = str(resolve_source(src, what="language model").path), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load the language model '{src}': {first_line(e)}") from None
    if getattr(lm.config, "quantization_config", None) is not None:
        # a GGUF's weights are dequantized to fp32 at load: the checkpoint written is plain fp32
        # (kept, the config would mark it as quantized and trainers would refuse it)
        del lm.config.quantization_config
    if not tokenizer.chat_template:
        raise ModelError(
            f"language model '{src}' has no chat template; assemble from an instruction-tuned "
            "model or add its template (chat_template.jinja) first"
        )
    return lm.eval(), tokenizer


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF with a tokenizer, in one line."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"GGUF file '{path}' not found")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(
                f"'{path}' is not a GGUF file (no GGUF magic in its first bytes); --language "
                "takes a checkpoint directory, a hub id or a .gguf file"
            )
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError...
        raise ModelError(
            f"'{path}' is not a complete GGUF file (truncated or corrupt: {first_line(e)})"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise ModelError(f"GGUF file '{path}' is truncated ({path.stat().st_size} of {end} bytes)")
    missing = [
        k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in reader.fields
    ]
    if missing:
        raise ModelError(
            f"GGUF file '{path}' has no tokenizer in its metadata ({', '.join(missing)}); "
            "use a GGUF written with its tokenizer"
        )


def add_image_token(lm, tokenizer) -> int:
    """``<image>`` in the tokenizer (added when absent) and an embedding row for it (new rows:
    the mean of the existing ones); returns its id."""
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
        )
    rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        with torch.no_grad():
            embed = lm.get_input_embeddings().weight
            mean = embed.mean(0)
            head = lm.get_output_embeddings()
            head_mean = None if head is None or head.weight is embed else head.weight.mean(0)
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            lm.get_input_embeddings().weight[rows:] = mean
            if head_mean is not None:
                lm.get_output_embeddings().weight[rows:] = head_mean
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# ---- the Llava model ----------------------------------------------------------------------
def _build(kind, vision_config, tower_state, lm, tokenizer, vision_dir, **choice) -> VLM:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_token_id = add_image_token(lm, tokenizer)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_index=image_token_id,
        projector_hidden_act=PROJECTORS[choice["projector"]],
        vision_feature_layer=choice["feature_layer"],
        vision_feature_select_strategy=choice["select"],
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    config.image_seq_length = image_tokens(config)
    torch.manual_seed(choice["seed"])
    try:
        model = LlavaForConditionalGeneration(config).eval()
    except (AttributeError, KeyError, ValueError) as e:  # e.g. GPT-2: no embed_tokens to tie
        raise ModelError(
            f"transformers' Llava cannot host a '{lm.config.model_type}' language model "
            f"({first_line(e)}); use a Llama, Qwen2 or Gemma-style causal LM"
        ) from None
    _load(model.model.vision_tower, tower_state, "vision tower")
    _load(model.model.language_model, lm.base_model.state_dict(), "language model")
    if not tied:
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.tie_weights()
    return VLM(model, _processor(kind, vision_config, tokenizer, vision_dir, choice["select"]))


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = {k for k in module.state_dict() if not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        first = f"{missing[0]} missing" if missing else f"{unexpected[0]} has no place"
        raise ModelError(
            f"the {what}'s weights do not fit its config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected; first: {first})"
        )
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"the {what}'s weights do not fit its config: {first_line(e)}") from None


def _processor(kind: str, vision_config, tokenizer, vision_dir: Path, select: str):
    """LlavaProcessor: the tower's preprocessing at the assembled size, the LM's tokenizer and
    its own chat template (image items rendered as ``<image>``)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tower, size = TOWERS[kind], int(vision_config.image_size)
    saved = vision_dir / "preprocessor_config.json"
    stats = read_json(saved, what="an image processor") if saved.is_file() else {}
    norm = {
        "image_mean": stats.get("image_mean", tower.mean),
        "image_std": stats.get("image_std", tower.std),
    }
    if tower.crop:
        images = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm
        )
    else:
        images = SiglipImageProcessorPil(size={"height": size, "width": size}, **norm)
    bos = bos_into_template(tokenizer)
    template = with_image_items(tokenizer.chat_template)
    if bos:
        template = "{{- '" + bos + "' -}}" + template
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy=select,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(vision_config.model_type in CLASS_TOKEN_TOWERS),
    )
