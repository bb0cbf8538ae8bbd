"""Convert a TinyLLaVA Factory checkpoint into a transformers-native LLaVA checkpoint.

TinyLLaVA Factory (github.com/TinyLLaVA/TinyLLaVA_Factory) trains the paper's student and teacher
(Qwen2 / Qwen2.5 + SigLIP-so400m + ``mlp2x_gelu``). Its checkpoints load only with the
repository's own code (``trust_remote_code``); this module turns one into a
``LlavaForConditionalGeneration`` + ``LlavaProcessor`` that edgekd (and transformers) load as is.
The processor side (tokenizer, prompt template, image preprocessing) is in
:mod:`edgekd.models.tinyllava_processor`.

Facts read from the TinyLLaVA Factory source (paths in that repository):

* ``tinyllava/model/modeling_tinyllava.py``: ``TinyLlavaForConditionalGeneration`` has three
  children: ``language_model`` (a plain transformers causal LM, ``Qwen2ForCausalLM`` for Qwen2,
  see ``tinyllava/model/llm/qwen2.py``), ``vision_tower`` and ``connector``. Images enter the text
  as one placeholder id, -200 (``IMAGE_TOKEN_INDEX``), never a vocabulary token: the prompt is split
  at ``<image>``, the pieces are tokenized apart, and the placeholder is replaced by all visual
  tokens of the image (``prepare_inputs_labels_for_multimodal``).
* ``tinyllava/model/vision_tower/siglip.py`` and ``base.py``: the tower wraps a transformers
  ``SiglipVisionModel`` in ``_vision_tower``; features are ``hidden_states[vision_feature_layer]``
  (default -2), and the default select strategy ``patch`` drops the first token even though SigLIP
  has no CLS token (728 visual tokens at 384 px / patch 14); ``cls_patch`` keeps all of them.
  transformers' Llava does the same with ``"default"`` and ``"full"``.
* ``tinyllava/model/connector/mlp.py`` and ``base.py``: ``mlp{N}x_gelu`` is ``_connector``, an
  ``nn.Sequential`` of Linear(vision_hidden -> hidden), then (GELU, Linear(hidden -> hidden)) N-1
  times; ``mlp2x_gelu`` has its Linears at indices 0 and 2, Llava's projector is
  linear_1 -> GELU -> linear_2 with the same shapes. Other connectors (resampler, qformer, ...)
  have no Llava equivalent.
* ``tinyllava/model/configuration_tinyllava.py``: ``model_type`` is ``"tinyllava"``; the text and
  vision configs are nested dicts (``text_config``, ``vision_config``), saved by transformers 4.x
  as a diff against the sub-config class defaults (so a field equal to its default is absent and
  is taken from the current class default here). ``connector_type``,
  ``vision_feature_layer``, ``vision_feature_select_strategy``, ``image_aspect_ratio`` (default
  ``square``) and ``tokenizer_*`` sit at the top level; ``image_token_index`` is -200. No
  template name is stored. Reading the config with its own class would fetch the LLM and vision
  configs from the hub with ``trust_remote_code=True``; this module reads config.json as plain
  JSON instead.
* Saved layouts: a fine-tune stage (``training_recipe/base.py`` ``save``) and the released hub
  models (e.g. Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP, fp16 in one file, and
  Zhang199/TinyLLaVA-Qwen2.5-3B-SigLIP, bf16 in shards with an index) hold one state dict of the
  whole model with keys ``language_model.model.*``, ``language_model.lm_head.weight`` (absent
  when tied), ``vision_tower._vision_tower.vision_model.*`` (transformers 4.x's SigLIP; 5.x's
  ``SiglipVisionModel`` has no ``vision_model.`` level, so that segment is dropped) and
  ``connector._connector.{0,2}.*``. The pre-train stage writes ``language_model/``,
  ``vision_tower/`` and ``connector/`` subfolders, each a ``pytorch_model.bin`` of that part's
  own parameters (plus a config.json for the first two); both layouts are read here. The
  tokenizer and the full config sit at the top level.
* Other language models TinyLLaVA trains: Phi-2 (``phi``) has a biased LM head, which Llava's
  bias-free ``lm_head`` cannot hold (its ``phi`` template equals ``qwen2_base``). Gemma needs
  its own template and an embedding fix: transformers 4.x's ``GemmaModel`` (TinyLLaVA's)
  multiplies all input embeddings, the visual tokens included, by sqrt(hidden_size), while 5.x
  scales only the token embeddings (``GemmaTextScaledWordEmbedding``), so the projector's last
  layer would have to absorb the factor. Neither is converted; the refusal says why.

Choices made here:

* The image token is added at the tokenizer's next free id, which normally lies inside the
  embedding matrix (151936 rows), so no weights change. When it does not fit, the embedding (and
  an untied lm_head) grows to the new vocabulary; the new rows are the mean of the existing
  ones. The image token's input row is never read (visual tokens replace it); as an output it
  is one more logit, appended after the source vocabulary, so the source logits keep their
  columns. Qwen2 and Qwen2.5 conversions get different ids (151646 and 151665); distillation
  translates one into the other, so no shared id has to be forced on either tokenizer.
* Only SigLIP towers with ``mlp2x_gelu`` connectors and Qwen2-family LLMs are converted: the
  qwen2_base template is only right for Qwen2, and other towers need other image processors.
* A tower saved without SigLIP's attention-pooling head gets ``vision_use_head=False``; the
  text ``vocab_size`` is taken from the embedding matrix, the source of truth.
* A hub id (``org/name``) is fetched with huggingface_hub (the config, weights and tokenizer
  files only, never code); anything else is a local directory.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edgekd.errors import ModelError
from edgekd.io import sha256_file
from edgekd.models.checkpoint import pickle_refused, read_json
from edgekd.models.hub import Source, resolve_source
from edgekd.models.tinyllava_processor import (
    IMAGE_TOKEN,
    QWEN2_BASE_SYSTEM,
    QWEN2_BASE_TEMPLATE,
    aspect_ratio_problem,
    build_processor,
    load_tokenizer,
)
from edgekd.models.vlm import VLM, resolve_dtype
from edgekd.outputs import output_guard

__all__ = [
    "QWEN2_BASE_SYSTEM",
    "QWEN2_BASE_TEMPLATE",
    "convert_tinyllava",
    "read_checkpoint",
    "resolve_source",
]

SUPPORTED_CONNECTORS = ("mlp2x_gelu",)
SUPPORTED_VISION = ("siglip_vision_model",)
SUPPORTED_TEXT = ("qwen2", "llama", "gemma")  # the LLMs whose TinyLLaVA templates edgekd renders
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # TinyLLaVA -> transformers Llava
MANIFEST = "edgekd_convert.json"

# Source prefix -> target prefix, first match wins; a source tensor no rule takes is an error.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # transformers 4.x (TinyLLaVA's) nests SigLIP in vision_model.; 5.x has a flat SiglipVisionModel
    ("vision_tower._vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower._vision_tower.", "model.vision_tower."),
    ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
)
# Pre-train layout: subfolder -> prefix its keys have inside the full model.
SUBFOLDERS = {
    "language_model": "language_model.",
    "vision_tower": "vision_tower._vision_tower.",
    "connector": "connector.",
}
EMBED_KEY = "model.language_model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
# Bookkeeping fields of TinyLLaVA's nested configs that are no part of the architecture.
_DROP_SUBCONFIG_KEYS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_name_or_path",
    "model_name_or_path2",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation_autoset",
}


@dataclass
class TinyLlavaCheckpoint:
    """A TinyLLaVA checkpoint read from disk: its configs and every tensor, by source name."""

    path: Path
    config: dict[str, Any]
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layout: str  # "single", "sharded" or "subfolders"
    files: list[str] = field(default_factory=list)


def convert_tinyllava(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Convert a TinyLLaVA Factory checkpoint into a LLaVA checkpoint at ``out``.

    Args:
        src: A directory holding TinyLLaVA's config.json, weights and tokenizer files, or a hub
            id (``org/name``, fetched with huggingface_hub: from its cache when offline).
        out: Output directory; written atomically (complete or absent).
        overwrite: Replace an existing, non-empty ``out``.
        dtype: Of the written weights: ``float32`` (default), ``float16``, ``bfloat16`` or
            ``auto`` (the source's dtype: the published fp16/bf16 files keep their size).

    Returns:
        ``out``, loadable with :meth:`edgekd.models.VLM.from_pretrained`.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is not set (before any work).
        OutputError: ``out`` is, contains or lies inside ``src``, or cannot be written.
        ModelError: ``src`` is neither a directory nor a reachable hub id, is not a supported
            TinyLLaVA checkpoint, or its tensors do not fill the converted model exactly.
    """
    resolve_dtype(dtype)  # a bad --dtype fails before any download
    # refuses out == src (and out inside or around it) before reading a byte of the source
    with output_guard(out, overwrite=overwrite, inputs=[src]) as guard:
        source = resolve_source(src, what="TinyLLaVA checkpoint")
        vlm, manifest = _convert(source, dtype)
        with guard.build() as tmp:
            vlm.write(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _convert(source: Source, dtype: str):
    """The converted ``VLM`` and the conversion manifest (nothing written)."""
    target_dtype = resolve_dtype(dtype)
    ckpt = read_checkpoint(source.path)
    strategy = check_supported(ckpt)
    tokenizer, token_added = load_tokenizer(ckpt.path)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    state, counts = map_state_dict(ckpt.tensors)
    scale_visual_rows(state, ckpt.text_config)
    tied = resolve_tied_head(state, ckpt.text_config)
    source_vocab = state[EMBED_KEY].shape[0]
    grow_vocab(state, max(len(tokenizer), image_token_id + 1), tied)
    config = build_llava_config(ckpt, state, tied, image_token_id, strategy)
    model = load_strict(config, state, tied)
    if target_dtype == "auto":
        target_dtype = source_dtype(ckpt.tensors)
    model = model.to(target_dtype).eval()
    aspect = ckpt.config.get("image_aspect_ratio")
    text_type = ckpt.text_config["model_type"]
    processor = build_processor(
        ckpt.path, ckpt.vision_config, tokenizer, strategy, aspect, text_type
    )

    manifest = _manifest(ckpt, source, model, processor, counts, tied, token_added, source_vocab)
    return VLM(model, processor), manifest


# ---- reading ------------------------------------------------------------------------------
def read_checkpoint(src: str | os.PathLike) -> TinyLlavaCheckpoint:
    """Read config.json and all weights of a TinyLLaVA checkpoint, without running its code."""
    path = Path(src).expanduser()
    if not path.is_dir():
        raise ModelError(f"TinyLLaVA checkpoint '{path}' is not a directory")
    config = read_json(path / "config.json", what="a TinyLLaVA checkpoint")
    model_type = config.get("model_type")
    if model_type != "tinyllava":
        raise ModelError(
            f"'{path}' is not a TinyLLaVA Factory checkpoint: config.json has model_type "
            f"'{model_type}', expected 'tinyllava'"
        )
    text = _sub_config(path, config, "text_config", "language_model", "llm_model_name_or_path")
    vision = _sub_config(path, config, "vision_config", "vision_tower", "vision_model_name_or_path")
    tensors, layout, files = load_tensors(path)
    return TinyLlavaCheckpoint(path, config, text, vision, tensors, layout, files)


def _sub_config(path: Path, config: dict, key: str, folder: str, name_key: str) -> dict:
    """A nested config from config.json, else the pre-train layout's ``{folder}/config.json``."""
    nested = config.get(key)
    if isinstance(nested, dict) and nested:
        return dict(nested)
    if (path / folder / "config.json").is_file():
        return read_json(path / folder / "config.json", what="a TinyLLaVA part")
    raise ModelError(
        f"'{path}/config.json' has no '{key}' and there is no {folder}/config.json; TinyLLaVA "
        f"would fetch it from '{config.get(name_key) or '?'}' on the hub, which edgekd does not "
        f"do: add the {key} of that model to config.json"
    )


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """All tensors by source name, from one file, a sharded index, or the pre-train subfolders."""
    found = load_weight_dir(path)
    if found is not None:
        tensors, files = found
        return tensors, ("sharded" if len(files) > 1 else "single"), files
    tensors, files = {}, []
    for folder, prefix in SUBFOLDERS.items():
        part = load_weight_dir(path / folder) if (path / folder).is_dir() else None
        if part is None:
            continue
        tensors.update({prefix + k: v for k, v in part[0].items()})
        files += [f"{folder}/{f}" for f in part[1]]
    if not tensors:
        raise ModelError(
            f"no weights in '{path}': expected model.safetensors, model.safetensors.index.json, "
            f"pytorch_model.bin, or {'/, '.join(SUBFOLDERS)}/ subfolders with pytorch_model.bin"
        )
    return tensors, "subfolders", files


def load_weight_dir(path: Path) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """Every tensor of a sharded index or a single weights file in ``path`` (safetensors, or a
    ``.bin`` read with ``weights_only``) and the files read; None when ``path`` has neither."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            index = read_json(path / index_name, what="a sharded checkpoint")
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise ModelError(f"'{path / index_name}' has an empty weight_map")
            tensors = {}
            for shard in shards:
                tensors.update(_load_file(path / shard))
            return tensors, shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_file(path / name), [name]
    return None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weight file '{path}' is missing (named in the shard index)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except pickle.UnpicklingError:
        raise pickle_refused(path) from None
    except Exception as e:  # safetensors and torch raise assorted types for bad files
        raise ModelError(f"cannot read weights '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ModelError(f"'{path}' does not hold a state dict")
    return state


# ---- checking and mapping -----------------------------------------------------------------
def check_supported(ckpt: TinyLlavaCheckpoint) -> str:
    """Refuse what Llava cannot represent, all problems at once; return Llava's select strategy."""
    cfg, problems = ckpt.config, []
    connector = cfg.get("connector_type")
    if connector not in SUPPORTED_CONNECTORS:
        problems.append(
            f"connector_type '{connector}' is not supported (supported: "
            f"{', '.join(SUPPORTED_CONNECTORS)}; Llava's projector is Linear-GELU-Linear)"
        )
    select = cfg.get("vision_feature_select_strategy", "patch")
    if select not in SELECT_STRATEGY:
        problems.append(
            f"vision_feature_select_strategy '{select}' is unknown (valid: "
            f"{', '.join(SELECT_STRATEGY)})"
        )
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        problems.append(f"vision_feature_layer {layer!r} must be one integer")
    vision_type = ckpt.vision_config.get("model_type", "siglip_vision_model")
    if vision_type not in SUPPORTED_VISION:
        problems.append(
            f"vision tower '{vision_type}' is not supported (supported: "
            f"{', '.join(SUPPORTED_VISION)})"
        )
    text_problem = _text_model_problem(ckpt.text_config)
    if text_problem:
        problems.append(text_problem)
    aspect = aspect_ratio_problem(cfg.get("image_aspect_ratio"))
    if aspect:
        problems.append(aspect)
    if problems:
        raise ModelError(f"cannot convert '{ckpt.path}': " + "; ".join(problems))
    return SELECT_STRATEGY[select]


def _text_model_problem(text_config: dict) -> str | None:
    """Why the language model cannot be converted (the real obstacle), or None when it can."""
    kind = text_config.get("model_type")
    if kind in SUPPORTED_TEXT:
        return None
    if kind == "phi":
        return (
            "language model 'phi' (Phi-2) is not supported: its LM head has a bias "
            "(language_model.lm_head.bias) that LlavaForConditionalGeneration's bias-free lm_head "
            "cannot hold (its TinyLLaVA template, phi, equals qwen2_base: that is no obstacle)"
        )
    return (
        f"language model '{kind}' is not supported (supported: {', '.join(SUPPORTED_TEXT)}): "
        "a TinyLLaVA checkpoint does not record its prompt template, and edgekd renders the "
        "templates of those language models only"
    )


def scale_visual_rows(state: dict[str, torch.Tensor], text_config: dict) -> None:
    """Gemma: fold sqrt(hidden_size) into the projector's last layer.

    transformers 4.x's ``GemmaModel`` (TinyLLaVA's) multiplies every input embedding, the
    visual tokens included, by sqrt(hidden_size); transformers 5 scales only the token
    embeddings (``GemmaTextScaledWordEmbedding``). Scaling ``linear_2`` (weight and bias) gives
    the converted model the source's visual rows.
    """
    if text_config.get("model_type") != "gemma":
        return
    scale = float(text_config.get("hidden_size", 3072)) ** 0.5  # GemmaConfig's default width
    for key in ("weight", "bias"):
        name = f"model.multi_modal_projector.linear_2.{key}"
        if name in state:
            state[name] = state[name].float() * scale  # not rounded back to the source dtype


def map_state_dict(
    tensors: dict[str, torch.Tensor],
    key_map: tuple[tuple[str, str], ...] = KEY_MAP,
    skip: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Rename source keys to Llava keys by ``key_map`` (first matching prefix); keys ending in
    ``skip`` (buffers older transformers saved) are dropped; any other key no rule takes is
    an error. Returns the state and how many keys each source prefix took."""
    state, counts, unmatched = {}, {s: 0 for s, _ in key_map}, []
    for name, tensor in tensors.items():
        if skip and name.endswith(skip):
            continue
        rule = next(((s, t) for s, t in key_map if name.startswith(s)), None)
        if rule is None:
            unmatched.append(name)
            continue
        state[rule[1] + name[len(rule[0]) :]] = tensor
        counts[rule[0]] += 1
    if unmatched:
        raise ModelError(
            f"{len(unmatched)} source tensors have no place in the Llava model (unexpected): "
            f"{some(unmatched)}; known prefixes: {', '.join(s for s, _ in key_map)}"
        )
    return state, counts


def resolve_tied_head(state: dict[str, torch.Tensor], text_config: dict) -> bool:
    """Decide whether lm_head is tied to the embeddings, dropping a redundant saved copy."""
    tied = bool(text_config.get("tie_word_embeddings", False))
    if EMBED_KEY not in state and tied and HEAD_KEY in state:
        state[EMBED_KEY] = state.pop(HEAD_KEY)  # the saver kept the head's name for the shared one
    if tied and HEAD_KEY in state:
        if torch.equal(state[HEAD_KEY], state.get(EMBED_KEY, state[HEAD_KEY])):
            del state[HEAD_KEY]
        else:
            tied = False  # a trained, separate head: keep it
    if EMBED_KEY not in state:
        raise ModelError(
            "missing tensor language_model.model.embed_tokens.weight (the token embeddings); "
            "the checkpoint is incomplete"
        )
    return tied


def grow_vocab(state: dict[str, torch.Tensor], rows: int, tied: bool) -> None:
    """Grow the embedding (and an untied head) to ``rows``, new rows = mean of the existing ones."""
    for key in (EMBED_KEY,) if tied else (EMBED_KEY, HEAD_KEY):
        if key not in state or state[key].shape[0] >= rows:
            continue
        weight = state[key]
        extra = weight.float().mean(0, keepdim=True).to(weight.dtype)
        state[key] = torch.cat([weight, extra.expand(rows - weight.shape[0], -1)], dim=0)


def build_llava_config(
    ckpt: TinyLlavaCheckpoint, state: dict, tied: bool, image_token_id: int, strategy: str
):
    """A LlavaConfig equal in architecture to the TinyLLaVA one."""
    from transformers import CONFIG_MAPPING, LlavaConfig, SiglipVisionConfig

    text = {k: v for k, v in ckpt.text_config.items() if k not in _DROP_SUBCONFIG_KEYS}
    text.pop("model_type", None)
    text.update(vocab_size=state[EMBED_KEY].shape[0], tie_word_embeddings=tied)
    vision = {k: v for k, v in ckpt.vision_config.items() if k not in _DROP_SUBCONFIG_KEYS}
    vision.pop("model_type", None)
    if not any(k.startswith("model.vision_tower.head.") for k in state):
        vision["vision_use_head"] = False
    try:
        text_config = CONFIG_MAPPING[ckpt.text_config["model_type"]](**text)
        vision_config = SiglipVisionConfig(**vision)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot rebuild the sub-configs of '{ckpt.path}': {e}") from None
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=patches - (strategy == "default"),
        projector_hidden_act="gelu",  # nn.GELU() in TinyLLaVA == exact erf GELU
        vision_feature_layer=ckpt.config.get("vision_feature_layer", -2),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )


def load_strict(config, state: dict[str, torch.Tensor], tied: bool):
    """Build the Llava model and fill every tensor from ``state``; report any gap or extra."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config)
    expected = model.state_dict()
    if tied:
        expected = {k: v for k, v in expected.items() if k != HEAD_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (not in the checkpoint): {some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (no place in Llava): {some(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (checkpoint vs config): {some(shapes)}")
    if problems:
        raise ModelError("the source tensors do not fill the Llava model: " + "; ".join(problems))
    if tied:
        state = {**state, HEAD_KEY: state[EMBED_KEY]}
    model.load_state_dict(state, strict=True)
    if tied:
        model.tie_weights()
    return model


# ---- helpers ------------------------------------------------------------------------------
def _manifest(
    ckpt: TinyLlavaCheckpoint,
    source: Source,
    model: Any,
    processor: Any,
    counts: dict[str, int],
    tied: bool,
    token_added: bool,
    source_vocab: int,
) -> dict[str, Any]:
    """What edgekd_convert.json records: the source, its hash and how every part was mapped."""
    config = model.config
    return {
        "source": source.hub_id or str(ckpt.path.resolve()),
        "source_revision": source.revision,
        "source_config_sha256": sha256_file(ckpt.path / "config.json"),
        "source_layout": ckpt.layout,
        "source_files": ckpt.files,
        "source_dtype": str(source_dtype(ckpt.tensors)).removeprefix("torch."),
        "source_transformers_version": ckpt.config.get("transformers_version"),
        "key_mapping": {f"{s}* -> {t}*": counts[s] for s, t in KEY_MAP},
        "tensors": len(ckpt.tensors),
        "tied_lm_head": tied,
        "image_token": {
            "token": IMAGE_TOKEN,
            "id": config.image_token_id,
            "added": token_added,
            "tinyllava_index": ckpt.config.get("image_token_index", -200),
        },
        "vocab_size": {"source": source_vocab, "converted": config.text_config.vocab_size},
        "connector_type": ckpt.config.get("connector_type"),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": {
            "tinyllava": ckpt.config.get("vision_feature_select_strategy", "patch"),
            "llava": config.vision_feature_select_strategy,
        },
        "image_seq_length": config.image_seq_length,
        "image_aspect_ratio": ckpt.config.get("image_aspect_ratio") or "square",
        "image_processor": type(processor.image_processor).__name__,
        "chat_template": {"qwen2": "qwen2_base"}.get(
            ckpt.text_config["model_type"], ckpt.text_config["model_type"]
        ),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def source_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The most common floating dtype of the source tensors (float32 when there are none)."""
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def some(names: list[str], n: int = 5) -> str:
    """The first ``n`` names, and how many more, for an error line."""
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
