"""Original LLaVA-1.5 (LlavaLlamaForCausalLM) -> transformers Llava, with identical logits.

A tiny checkpoint in LLaVA's own layout (a LlamaConfig with the ``mm_*`` keys at the top level,
``model.mm_projector.{0,2}``, a BOS-adding tokenizer without ``<image>``), its CLIP tower either
inside (``model.vision_tower.vision_tower.vision_model.*``) or apart as a CLIP checkpoint, as
released. LLaVA's own forward is re-implemented here from its source: hidden_states[layer],
class token dropped for ``patch``, the projector, the features spliced in at the -200 placeholder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.errors import ModelError
from edgekd.models import VLM
from edgekd.models.llava15 import convert_llava15

IMAGE_TOKEN_INDEX = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "What shape is in the image?"


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<unk>", "<s>", "</s>"],
    )
    tok.train_from_iterator([SYSTEM, "USER: ASSISTANT: " + QUESTION + " A red circle."], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True,
    )  # fmt: skip
    fast.save_pretrained(path)
    return fast


def write_llava15(path: Path, *, tower_inside: bool, select: str = "patch", aspect="pad"):
    """A random tiny LLaVA-1.5 checkpoint (fp16, as released); its modules for the reference."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True)
    tokenizer = _tokenizer(path)
    text = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tokenizer) + 8, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    lm, tower = LlamaForCausalLM(text).eval(), CLIPVisionModel(vision).eval()
    projector = torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48)
    ).eval()
    with torch.no_grad():  # the reference computes with the saved, fp16-rounded weights
        for module in (lm, tower, projector):
            for p in module.parameters():
                p.copy_(p.half())
    state = {k: v for k, v in lm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    tower_state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    tower_dir = path.parent / "clip-tower"
    if tower_inside:
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tower_state.items()})
        (path / "vision_tower").mkdir()
        (path / "vision_tower" / "config.json").write_text(json.dumps(vision.to_dict()))
    else:  # as released: the tower is openai's CLIP checkpoint, with its text half, and the
        # buffers older transformers saved (recomputed now, skipped by the converter)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
        tower_state["vision_model.embeddings.position_ids"] = torch.arange(17)[None].float()
        tower_dir.mkdir()
        clip_state = {
            **tower_state,
            "text_model.embeddings.token_embedding.weight": torch.ones(4, 2),
        }
        save_file(
            {k: v.half().contiguous() for k, v in clip_state.items()},
            str(tower_dir / "model.safetensors"),
        )
        clip_config = {"model_type": "clip", "vision_config": vision.to_dict(), "text_config": {}}
        (tower_dir / "config.json").write_text(json.dumps(clip_config))
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = {
        **{k: v for k, v in text.to_dict().items() if k not in ("architectures", "dtype")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": select,
        "mm_vision_tower": str(tower_dir),
        "image_aspect_ratio": aspect,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "torch_dtype": "float16",
    }
    (path / "config.json").write_text(json.dumps(config))
    return {"lm": lm, "tower": tower, "projector": projector, "tokenizer": tokenizer,
            "select": select, "tower_dir": tower_dir}  # fmt: skip


def llava_prompt(question: str) -> str:
    """conv_vicuna_v1.get_prompt() for one open question (llava/conversation.py)."""
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def llava_ids(prompt: str, tokenizer) -> list[int]:
    """tokenizer_image_token: chunks tokenized apart, BOS kept once, -200 in between."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk[1:]  # each later chunk's BOS dropped
    return ids


def llava_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """process_images with 'pad': expand2square with the CLIP mean colour, then CLIP's
    preprocessing (shortest edge, centre crop, normalise)."""
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    pixels = np.asarray(square.resize((size, size), resample=Image.BICUBIC), np.float32) / 255
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).astype(np.float32))[None]


@torch.no_grad()
def llava_logits(parts: dict, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    hidden = parts["tower"](pixels, output_hidden_states=True).hidden_states[-2]
    if parts["select"] == "patch":
        hidden = hidden[:, 1:]
    features = parts["projector"](hidden)[0]
    ids_t = torch.tensor(ids)
    at = int((ids_t == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    embed = parts["lm"].get_input_embeddings()
    embeds = torch.cat([embed(ids_t[:at]), features, embed(ids_t[at + 1 :])])
    return parts["lm"](inputs_embeds=embeds[None]).logits


@pytest.mark.parametrize(
    "tower_inside,select", [(False, "patch"), (True, "cls_patch")], ids=["released", "tower-in"]
)
def test_converted_logits_equal_llava_forward(tmp_path, tower_inside, select):
    parts = write_llava15(tmp_path / "src", tower_inside=tower_inside, select=select)
    convert_llava15(tmp_path / "src", tmp_path / "out")
    vlm = VLM.from_pretrained(tmp_path / "out")
    assert vlm.config.vision_config.model_type == "clip_vision_model"
    assert vlm.config.text_config.model_type == "llama"
    n_visual = 16 + 1 - (select == "patch")  # CLIP's class token, dropped by 'patch'
    assert vlm.num_image_tokens() == n_visual

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>" + llava_prompt(QUESTION)  # BOS first, as LLaVA's tokenizer adds it
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8))
    inputs = vlm.processor(text=prompt, images=image, return_tensors="pt")
    ref_ids = llava_ids(llava_prompt(QUESTION), parts["tokenizer"])
    expanded = []
    for i in ref_ids:
        expanded += [vlm.image_token_id] * n_visual if i == IMAGE_TOKEN_INDEX else [i]
    assert inputs["input_ids"][0].tolist() == expanded  # one BOS, the image run in place
    ref_pixels = llava_pixels(image, 32)
    np.testing.assert_allclose(inputs["pixel_values"].numpy(), ref_pixels.numpy(), atol=1e-6)

    before = llava_logits(parts, ref_ids, ref_pixels)
    with torch.no_grad():
        after = vlm.model(**inputs).logits
    v = before.shape[-1]
    assert (after[..., :v] - before).abs().max().item() <= 5e-6
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    assert manifest["vision_tower"] == (
        "in the checkpoint" if tower_inside else str(parts["tower_dir"])
    )


def test_loading_the_original_layout_says_to_convert(tmp_path):
    write_llava15(tmp_path / "src", tower_inside=True)
    with pytest.raises(ModelError, match="original LLaVA checkpoint.*edgekd convert llava15"):
        VLM.from_pretrained(tmp_path / "src")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type 'linear'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
    ],
)
def test_unsupported_parts_refused_in_one_line(tmp_path, change, message):
    write_llava15(tmp_path / "src", tower_inside=True)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError, match=message) as e:
        convert_llava15(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
