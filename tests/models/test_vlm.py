"""The VLM adapter: stages compose to the full forward, loading checks, compatibility checks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from edgekd.errors import ModelError
from edgekd.models import VLM, build_vlm, check_compatible, count_parameters, train_tokenizer


def _inputs(vlm: VLM, n_images: int = 2):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat shape?"}]}
    ]
    text = vlm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")[:n_images]]
    short, long = text, text + "a longer tail"
    return vlm.processor(
        text=[short, long][:n_images], images=images, return_tensors="pt", padding=True
    )


@torch.no_grad()
def test_stages_reproduce_full_forward_exactly(tiny_vlm):
    enc = _inputs(tiny_vlm)
    assert (enc["attention_mask"] == 0).any(), "the batch should exercise padding"
    full = tiny_vlm.model(**enc).logits
    staged = tiny_vlm.forward_stages(enc["input_ids"], enc["attention_mask"], enc["pixel_values"])
    assert torch.equal(full, staged)


@torch.no_grad()
def test_text_only_forward_matches(tiny_vlm):
    ids = tiny_vlm.tokenizer("What shape is it?", return_tensors="pt")["input_ids"]
    assert torch.equal(tiny_vlm.model(input_ids=ids).logits, tiny_vlm.forward_stages(ids))


@torch.no_grad()
def test_project_of_vision_features_matches_get_image_features(tiny_vlm):
    pv = _inputs(tiny_vlm)["pixel_values"]
    feats = tiny_vlm.vision_features(pv)
    assert feats.shape == (2, tiny_vlm.num_image_tokens(), tiny_vlm.vision_hidden_size)
    ref = tiny_vlm.model.model.get_image_features(pv).pooler_output
    assert torch.equal(tiny_vlm.project(feats), torch.stack(list(ref)))


@pytest.mark.parametrize("layer,strategy", [(-1, "default"), ([-2, -1], "full")])
@torch.no_grad()
def test_feature_layer_and_select_strategy(tokenizer, layer, strategy):
    from edgekd.models import factory

    shape = factory.SHAPES["tiny"]
    shape = factory.VLMShape(
        shape.vision, shape.text, vision_feature_layer=layer, select_strategy=strategy
    )
    factory.SHAPES["tiny-variant"] = shape
    try:
        vlm = build_vlm("tiny-variant", tokenizer=tokenizer)
        if isinstance(layer, list):  # the projector must take the concatenated features
            vlm = _with_projector_input(vlm, vlm.vision_hidden_size)
    finally:
        del factory.SHAPES["tiny-variant"]
    enc = _inputs(vlm, n_images=1)
    n_img = int((enc["input_ids"] == vlm.image_token_id).sum())
    assert n_img == vlm.num_image_tokens() == 16 - (strategy == "default")
    assert torch.equal(
        vlm.model(**enc).logits,
        vlm.forward_stages(enc["input_ids"], enc["attention_mask"], enc["pixel_values"]),
    )


def _with_projector_input(vlm: VLM, in_features: int) -> VLM:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(vlm.config).eval()
    lin = model.model.multi_modal_projector.linear_1
    model.model.multi_modal_projector.linear_1 = torch.nn.Linear(in_features, lin.out_features)
    return VLM(model, vlm.processor)


def test_merge_refuses_count_mismatch(tiny_vlm):
    enc = _inputs(tiny_vlm, n_images=1)
    embeds = tiny_vlm.embed(enc["input_ids"])
    feats = torch.zeros(1, tiny_vlm.num_image_tokens() - 1, embeds.shape[-1])
    with pytest.raises(ModelError, match="15 visual tokens"):
        tiny_vlm.merge(embeds, feats, enc["input_ids"])


@torch.no_grad()
def test_save_and_load_roundtrip(tiny_vlm, tiny_checkpoint):
    assert (tiny_checkpoint / "model.safetensors").exists()
    assert not list(tiny_checkpoint.glob("*.bin"))
    loaded = VLM.from_pretrained(tiny_checkpoint)
    enc = _inputs(tiny_vlm)
    assert torch.equal(tiny_vlm.model(**enc).logits, loaded.model(**enc).logits)
    assert loaded.fingerprint() == tiny_vlm.fingerprint()
    assert (
        loaded.processor(text="<image>", images=Image.new("RGB", (9, 9)))["input_ids"][0].count(
            loaded.image_token_id
        )
        == loaded.num_image_tokens()
    )


def test_load_dtype_option(tiny_checkpoint):
    assert VLM.from_pretrained(tiny_checkpoint, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        VLM.from_pretrained(tiny_checkpoint, dtype="fp8")


def test_save_refuses_existing_output(tiny_vlm, tiny_checkpoint):
    from edgekd.errors import OutputExistsError

    before = sorted(p.name for p in tiny_checkpoint.iterdir())
    with pytest.raises(OutputExistsError, match="--overwrite"):
        tiny_vlm.save_pretrained(tiny_checkpoint)
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == before


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        VLM.from_pretrained(tmp_path / "missing" / "dir")
    with pytest.raises(ModelError) as e:
        VLM.from_pretrained("no-such-org/no-such-model")  # hub offline in tests
    assert "\n" not in str(e.value)
    (tmp_path / "tl").mkdir()
    (tmp_path / "tl" / "config.json").write_text(
        json.dumps(
            {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"]}
        )
    )
    with pytest.raises(ModelError, match="edgekd convert tinyllava"):
        VLM.from_pretrained(tmp_path / "tl")


def test_non_llava_checkpoint_is_refused(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ModelError, match="not a LLaVA-family VLM .model_type 'qwen2'"):
        VLM.from_pretrained(tmp_path / "qwen")


def test_check_compatible_names_both_values(tiny_vlm, small_vlm):
    check_compatible(small_vlm, tiny_vlm)
    other = build_vlm(
        "tiny", tokenizer=train_tokenizer(["completely different words"] * 50, vocab_size=700)
    )
    with pytest.raises(
        ModelError,
        match=rf"teacher vocabulary size {small_vlm.vocab_size} != "
        rf"student vocabulary size {other.vocab_size}",
    ):
        check_compatible(small_vlm, other)
    shifted = build_vlm("tiny", tokenizer=tiny_vlm.tokenizer)
    shifted.model.config.image_token_id = 2
    with pytest.raises(ModelError, match="teacher image token id 3 != student image token id 2"):
        check_compatible(small_vlm, shifted)


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    text = "<|im_start|>user\n<image>\nIs there a red circle?<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (
        tokenizer.decode(tokenizer("any text, even ünïcode ✓")["input_ids"])
        == "any text, even ünïcode ✓"
    )


@pytest.mark.parametrize(
    "name,lm_params,n_visual",
    [
        ("qwen2-0.5b-siglip-so400m", 494_032_768, 728),
        ("qwen2.5-3b-siglip-so400m", 3_085_938_688, 728),
    ],
)
def test_presets_have_the_papers_shapes(tokenizer, name, lm_params, n_visual):
    vlm = build_vlm(name, tokenizer=tokenizer, device="meta")
    counts = count_parameters(vlm)
    assert counts["language_model"] == lm_params  # Qwen2(.5) published sizes, tied head
    assert counts["vision_tower"] == 428_225_600  # SigLIP-so400m vision tower
    assert vlm.num_image_tokens() == n_visual
    assert vlm.vocab_size == 151_936


def test_unknown_size_lists_valid(tokenizer):
    with pytest.raises(ModelError, match="valid: tiny, small, base"):
        build_vlm("huge", tokenizer=tokenizer)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_a_clip_tower_counts_its_class_token(tokenizer, strategy):
    vlm = build_vlm("tiny", tokenizer=tokenizer, tower="clip", decoder="llama")
    vision = vlm.config.vision_config
    vlm.config.vision_feature_select_strategy = strategy
    patches = (vision.image_size // vision.patch_size) ** 2
    assert vlm.vision_tokens() == patches + 1  # the class token
    with torch.no_grad():
        feats = vlm.vision_features(torch.zeros(1, 3, vision.image_size, vision.image_size))
    # as LLaVA-1.5: 577 tokens in the tower, 576 after "default" drops the class token
    assert feats.shape[1] == vlm.num_image_tokens() == patches + (strategy == "full")
