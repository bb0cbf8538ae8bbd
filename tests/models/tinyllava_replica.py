"""Tiny TinyLLaVA Factory checkpoints in the published layout, and TinyLLaVA's side of the maths.

A replica has what the released checkpoints (Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP, fp16 in one
file; Zhang199/TinyLLaVA-Qwen2.5-3B-SigLIP, bf16 in shards with an index) ship: config.json with
nested ``text_config`` / ``vision_config``, the slow tokenizer files only (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, added_tokens.json: no tokenizer.json, no
``<image>`` token, no preprocessor config), and either Qwen2's 3 or Qwen2.5's 22 added tokens
after one shared byte-level BPE vocabulary. The embedding is shrunk (BASE + 64 rows instead of
151,936) but keeps the structure: ``<image>`` lands at BASE + 3 for Qwen2 and BASE + 22 for
Qwen2.5, where Qwen2.5 has ``<|object_ref_start|>`` at BASE + 3.

The reference functions re-implement, from TinyLLaVA's source, how it builds the prompt, the
token ids (-200 for the image), the pixels (expand2square, PIL bicubic, SigLIP scaling in
transformers 4.x's numerics) and the forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgekd.models.tinyllava import QWEN2_BASE_SYSTEM

IMAGE_TOKEN_INDEX = -200  # TinyLLaVA's placeholder id (tinyllava/utils/constants.py)
EOS = "<|endoftext|>"
SYSTEM = QWEN2_BASE_SYSTEM + " "
PAD_ROWS = 64  # embedding rows past the added tokens (151,936 - 151,643 = 293 in Qwen2)
QWEN2_ADDED = [(EOS, True), ("<|im_start|>", True), ("<|im_end|>", True)]
QWEN25_ADDED = (
    QWEN2_ADDED
    + [
        (f"<|{name}|>", True)
        for name in (
            "object_ref_start",
            "object_ref_end",
            "box_start",
            "box_end",
            "quad_start",
            "quad_end",
            "vision_start",
            "vision_end",
            "vision_pad",
            "image_pad",
            "video_pad",
        )
    ]
    + [(t, False) for t in ("<tool_call>", "</tool_call>")]
    + [
        (f"<|{name}|>", False)
        for name in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "repo_name", "file_sep")
    ]
)
ADDED = {"qwen2": QWEN2_ADDED, "qwen2.5": QWEN25_ADDED}
CORPUS = [
    SYSTEM,
    "USER: ASSISTANT: What shape is in the image? A red circle.",
    "What color is the shape? red green blue Is red a color? yes no",
]


# ---- the checkpoint, written as TinyLLaVA Factory (transformers 4.40) writes one --------------
def write_slow_tokenizer(path: Path, family: str = "qwen2", corpus: list[str] = CORPUS) -> int:
    """The slow Qwen2Tokenizer files of ``family``; returns the base (BPE) vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)  # deterministic: one vocabulary for both
    tok.model.save(str(path))  # vocab.json + merges.txt
    base = tok.get_vocab_size()
    added = {t: base + k for k, (t, _) in enumerate(ADDED[family])}
    specials = [t for t, special in ADDED[family] if special and t != EOS]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(added[t]): {"content": t, **flags, "special": special}
            for t, special in ADDED[family]
        },
        "additional_special_tokens": specials,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": EOS,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    eos = {"content": EOS, **flags}
    special_map = {"additional_special_tokens": specials, "eos_token": eos, "pad_token": eos}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (path / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True))
    return base


def load_source_tokenizer(path: Path):
    """The tokenizer TinyLLaVA would use: the checkpoint's own files, nothing added."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _text_config(eos_id: int, rows: int, tie: bool, hidden: int, model_type: str) -> dict:
    """A text_config as transformers 4.x nests it in TinyLLaVA's config.json (Qwen2's keys;
    Llama and Gemma ones without the sliding-window keys, Gemma with its legacy ``gelu``)."""
    config = {
        "_name_or_path": "Qwen/Qwen2-0.5B",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 512,
        "max_window_layers": 2,
        "model_type": model_type,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": rows,
    }
    if model_type in ("llama", "gemma"):
        for key in ("max_window_layers", "sliding_window", "use_sliding_window"):
            del config[key]
        config["architectures"] = [f"{model_type.capitalize()}ForCausalLM"]
    if model_type == "gemma":
        config.update(head_dim=hidden // 4, hidden_act="gelu", hidden_activation=None)
    return config


def _vision_config(image_size: int) -> dict:
    """SigLIP vision_config as TinyLLaVA nests it (with its model_name_or_path bookkeeping)."""
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "image_size": image_size,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-06,
        "model_name_or_path": "google/siglip-so400m-patch14-384",
        "model_name_or_path2": "",
        "model_type": "siglip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "patch_size": 8,  # 16 patches at 32 px; "patch" keeps 15
    }


def _strip(cfg: dict) -> dict:
    drop = {
        "_name_or_path",
        "architectures",
        "model_type",
        "model_name_or_path",
        "model_name_or_path2",
        "torch_dtype",
    }
    return {k: v for k, v in cfg.items() if k not in drop}


def write_tinyllava(
    path: Path,
    *,
    family: str = "qwen2",
    dtype: torch.dtype = torch.float16,
    layout: str = "single",
    tie: bool = True,
    grow: bool = False,
    select: str = "patch",
    aspect: str | None = "square",
    connector_type: str = "mlp2x_gelu",
    hidden: int = 32,
    text_model_type: str = "qwen2",
    image_size: int = 32,
    corpus: list[str] = CORPUS,
    seed: int = 0,
) -> dict:
    """Write a random tiny TinyLLaVA checkpoint; return its modules for the reference forward.

    The modules hold exactly the saved (``dtype``-rounded) weights, in float32.

    Args:
        family: ``qwen2`` (3 added tokens) or ``qwen2.5`` (22).
        dtype: Of the saved weights (the published files are fp16 or bf16).
        layout: ``single`` (model.safetensors), ``sharded`` (two shards and an index) or
            ``subfolders`` (the pre-train stage: one pytorch_model.bin per part).
        grow: The embedding has exactly as many rows as tokens, so ``<image>`` needs a new one.
        aspect: ``image_aspect_ratio`` (None: the key is absent).
        corpus: The text the BPE vocabulary is learnt from (replicas of one family share it).
    """
    from safetensors.torch import save_file
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    path.mkdir(parents=True)
    base = write_slow_tokenizer(path, family, corpus)
    n_tokens = base + len(ADDED[family])
    rows = n_tokens if grow else base + PAD_ROWS
    eos_id = base  # <|endoftext|> is the first added token
    text = _text_config(eos_id, rows, tie, hidden, text_model_type)
    vision = _vision_config(image_size)
    torch.manual_seed(seed)
    known = {k: v for k, v in _strip(text).items() if k != "hidden_activation"}
    lm = AutoModelForCausalLM.from_config(CONFIG_MAPPING[text_model_type](**known))
    tower = SiglipVisionModel(SiglipVisionConfig(**_strip(vision)))
    connector = torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
    )
    with torch.no_grad():  # the reference computes with the published weights (not buffers:
        for module in (lm, tower, connector):  # TinyLLaVA's rotary inv_freq stays float32)
            for param in module.parameters():
                param.copy_(param.to(dtype))
            module.eval()
    parts = {
        "language_model": {
            k: v for k, v in lm.state_dict().items() if not (tie and k == "lm_head.weight")
        },  # tied heads are not saved
        # transformers 4.x, which TinyLLaVA uses, nests SigLIP's weights under vision_model.
        "vision_tower": {"vision_model." + k: v for k, v in tower.state_dict().items()},
        "connector": {"_connector." + k: v for k, v in connector.state_dict().items()},
    }
    prefixes = {
        "language_model": "language_model.",
        "vision_tower": "vision_tower._vision_tower.",
        "connector": "connector.",
    }
    state = {
        prefixes[p] + k: v.to(dtype).contiguous() for p, sd in parts.items() for k, v in sd.items()
    }
    if layout == "single":
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        names = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2],
        }
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(path / shard), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:  # the pre-train stage: one pytorch_model.bin per part, keys without the part prefix
        for part, sd in parts.items():
            (path / part).mkdir()
            torch.save({k: v.to(dtype) for k, v in sd.items()}, path / part / "pytorch_model.bin")
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "cache_dir": None,
        "auto_map": {  # as on the hub: never followed (no trust_remote_code)
            "AutoConfig": "configuration.TinyLlavaConfig",
            "AutoModelForCausalLM": "modeling_tinyllava_qwen2.TinyLlavaForConditionalGeneration",
        },
        "connector_type": connector_type,
        "hidden_size": hidden,
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "llm_model_name_or_path": "Qwen/Qwen2-0.5B",
        "model_type": "tinyllava",
        "pad_token": EOS,
        "pad_token_id": eos_id,
        "resampler_hidden_size": None,
        "num_queries": None,
        "num_resampler_layers": None,
        "text_config": text,
        "tokenizer_model_max_length": 2048,
        "tokenizer_name_or_path": "Qwen/Qwen2-0.5B",
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.40.1",
        "tune_type_connector": "full",
        "tune_type_llm": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "use_cache": True,
        "vision_config": vision,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": select,
        "vision_hidden_size": 32,
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "vision_model_name_or_path2": "",
        "vocab_size": rows,
    }
    if aspect is not None:
        config["image_aspect_ratio"] = aspect
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "lm": lm,
        "tower": tower,
        "connector": connector,
        "tokenizer": load_source_tokenizer(path),
        "select": select,
        "aspect": aspect,
        "base": base,
        "image_size": vision["image_size"],
        "text_model_type": text_model_type,
    }


# ---- TinyLLaVA's side, re-implemented from its source -------------------------------------
def tinyllava_prompt(questions: list[str], answers: list[str | None]) -> str:
    """Template._prompt of qwen2_base (tinyllava/data/template/base.py, qwen2_base_template.py)."""
    msg = ""
    for i, (q, a) in enumerate(zip(questions, answers)):
        if i == 0:
            msg += SYSTEM
        if "<image>" in q:
            q = ("<image>\n" + q.replace("<image>", "").strip()).strip()
        msg += "USER: " + q + " "
        msg += "ASSISTANT:" if a is None else "ASSISTANT: " + a + EOS
    return msg


def tinyllava_ids(prompt: str, tokenizer) -> list[int]:
    """Template.tokenizer_image_token: pieces tokenized apart, -200 in between (no BOS here)."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk
    return ids


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """ImagePreprocess.expand2square (tinyllava/data/image_preprocess.py)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def tinyllava_pixels(image: Image.Image, size: int, aspect: str | None) -> torch.Tensor:
    """(1, 3, size, size) pixels as TinyLLaVA makes them from the raw image.

    ``pad``: expand2square with int(0.5 * 255) (SigLIP's mean); then transformers 4.x's
    SiglipImageProcessor: PIL bicubic resize, rescale in float64 cast to float32, normalize.
    """
    image = image.convert("RGB")
    if aspect == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in (0.5, 0.5, 0.5)))
    resized = np.asarray(image.resize((size, size), resample=Image.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = std = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())[None]


@torch.no_grad()
def tinyllava_logits(parts: dict, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """TinyLLaVA's forward: tower hidden_states[-2], drop token 0 for 'patch', connector, splice."""
    hidden = parts["tower"](pixel_values, output_hidden_states=True).hidden_states[-2]
    if parts["select"] == "patch":
        hidden = hidden[:, 1:]
    features = parts["connector"](hidden)[0]
    ids_t = torch.tensor(ids)
    at = int((ids_t == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    table = parts["lm"].get_input_embeddings().weight  # the raw rows (5.x's Gemma module scales)
    embeds = torch.cat([table[ids_t[:at]], features, table[ids_t[at + 1 :]]])
    if parts["text_model_type"] == "gemma":
        # transformers 4.x's GemmaModel.forward (TinyLLaVA's): every input row, the visual
        # ones included, times sqrt(hidden_size) in the rows' dtype; 5.x's forward scales none
        embeds = embeds * torch.tensor(embeds.shape[-1] ** 0.5, dtype=embeds.dtype)
    return parts["lm"](inputs_embeds=embeds[None]).logits


def non_square_image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """Random RGB noise, ``size`` = (height, width): resizing and padding both show in it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
