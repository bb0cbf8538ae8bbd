"""Assembling a VLM from a vision tower and a language model: the parts' own numbers, exactly.

Every tower (SigLIP, CLIP, DINOv2) and language model (a Llama and a Qwen2 directory, a GGUF
file written with the ``gguf`` library) is tiny and random; the assembled model's logits must
equal the parts run by hand: tower -> projector -> the LM's embeddings with the visual rows in
place of the ``<image>`` tokens -> the LM.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_parts import PATCH, SIZE, causal_lm, tiny_assembled, tiny_language, tiny_tower

from edgekd.errors import ModelError
from edgekd.models import VLM, build_vlm
from edgekd.models.assemble import RECORD, TOWERS, assemble, resize_positions


def _by_hand(vlm: VLM, tower, lm, ids, pixels, select: str, layer: int):
    """The parts run by hand on ``ids`` (with ``<image>`` runs) and ``pixels``."""
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[layer]
        if select == "default":
            hidden = hidden[:, 1:]
        visual = vlm.projector(hidden)
        embeds = lm.get_input_embeddings()(ids).clone()
        embeds[ids == vlm.image_token_id] = visual.reshape(-1, visual.shape[-1])
        return lm(inputs_embeds=embeds).logits


def _inputs(vlm: VLM):
    torch.manual_seed(0)
    n = vlm.num_image_tokens()
    ids = torch.randint(5, 200, (1, n + 6))
    ids[0, 2 : 2 + n] = vlm.image_token_id
    pixels = torch.randn(
        1, 3, vlm.config.vision_config.image_size, vlm.config.vision_config.image_size
    )
    return ids, pixels


@pytest.mark.parametrize(
    "tower_kind,lm_kind,select,layer",
    [
        ("dinov2", "llama", "default", -2),
        ("siglip", "qwen2", "full", -1),
        ("clip", "llama", "default", 1),
    ],
)
def test_assembled_logits_equal_the_parts(tmp_path, tokenizer, tower_kind, lm_kind, select, layer):
    tower = tiny_tower(tower_kind, tmp_path / "tower")
    lm = tiny_language(lm_kind, tmp_path / "lm", tokenizer)
    record = assemble(
        tmp_path / "tower", tmp_path / "lm", tmp_path / "vlm", select=select, feature_layer=layer
    )
    vlm = VLM.from_pretrained(tmp_path / "vlm")
    class_token = tower_kind in ("clip", "dinov2")  # SigLIP has none
    patches = (SIZE // PATCH) ** 2
    assert vlm.num_image_tokens() == patches + class_token - (select == "default")
    assert record["visual_tokens"] == vlm.num_image_tokens()
    assert json.loads((tmp_path / "vlm" / RECORD).read_text())["select"] == select
    ids, pixels = _inputs(vlm)
    with torch.no_grad():
        got = vlm.model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    torch.testing.assert_close(got, _by_hand(vlm, tower, lm, ids, pixels, select, layer))
    # the processor expands <image> to as many tokens as the tower gives, with the LM's template
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>" in text and text.startswith("<|im_start|>user")
    batch = vlm.processor(images=[Image.new("RGB", (40, 30))], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == vlm.image_token_id).sum()) == vlm.num_image_tokens()
    assert tuple(batch["pixel_values"].shape[-2:]) == (SIZE, SIZE)


def test_a_gguf_language_model_is_dequantized_with_its_tokenizer(tmp_path, tokenizer):
    """An LM given as a GGUF file (written here with the gguf library, f32) assembles to the
    same logits as the LM itself, with the tokenizer read from the file's metadata."""
    pytest.importorskip("gguf")
    from edgekd.export.gguf_write import write_lm

    source = build_vlm("tiny", tokenizer=tokenizer, decoder="llama", seed=3)
    write_lm(source, tmp_path / "lm.gguf", "f32")
    tower = tiny_tower("dinov2", tmp_path / "tower")
    assemble(tmp_path / "tower", tmp_path / "lm.gguf", tmp_path / "vlm")
    vlm = VLM.from_pretrained(tmp_path / "vlm")
    assert "quantization_config" not in (tmp_path / "vlm" / "config.json").read_text()
    text = "What shape is in the image? A red circle."
    assert vlm.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids, pixels = _inputs(vlm)
    with torch.no_grad():
        got = vlm.model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    want = _by_hand(vlm, tower, causal_lm(source), ids, pixels, "default", -2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_another_image_size_resizes_the_position_table_once(tmp_path, tokenizer):
    """At 48 px a 32 px DINOv2 tower gets a 6x6 table, equal to what transformers resamples
    per call; the assembled tower then needs no resampling and equals the original at 48 px."""
    tower = tiny_tower("dinov2", tmp_path / "tower")
    tiny_language("qwen2", tmp_path / "lm", tokenizer)
    assemble(tmp_path / "tower", tmp_path / "lm", tmp_path / "vlm", image_size=48)
    vlm = VLM.from_pretrained(tmp_path / "vlm")
    table = vlm.vision_tower.embeddings.position_embeddings
    assert tuple(table.shape) == (1, 1 + 36, 32) and vlm.num_image_tokens() == 36
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = tower(pixels).last_hidden_state
        got = vlm.vision_tower(pixels).last_hidden_state
    torch.testing.assert_close(got, want)
    resized = resize_positions(
        tower.embeddings.position_embeddings, TOWERS["dinov2"], tower.config, 48
    )
    torch.testing.assert_close(table, resized)


@pytest.mark.parametrize(
    "case,message",
    [
        ("not_vision", "is not a vision tower Llava can host (model_type 'qwen2')"),
        ("size", "--image-size 36 is not a multiple of the tower's patch size 8"),
        ("no_template", "has no chat template"),
        ("gguf_no_tokenizer", "has no tokenizer in its metadata"),
        ("gguf_truncated", "is not a complete GGUF file (truncated or corrupt"),
        ("gguf_garbage", "is not a complete GGUF file (truncated or corrupt"),
        ("gguf_not_gguf", "is not a GGUF file (no GGUF magic in its first bytes)"),
        ("layer", "--feature-layer 9: the tower has 3 layers"),
        ("projector", "projector 'linear' is not built; valid: mlp2x_gelu"),
    ],
)
def test_bad_parts_are_refused_in_one_line_and_nothing_is_written(
    tmp_path, tokenizer, case, message
):
    tiny_tower("siglip", tmp_path / "tower")
    tiny_language("qwen2", tmp_path / "lm", tokenizer)
    vision, language, kwargs = tmp_path / "tower", tmp_path / "lm", {}
    if case == "not_vision":
        vision = tmp_path / "lm"
    elif case == "size":
        kwargs["image_size"] = 36
    elif case == "no_template":
        config = json.loads((tmp_path / "lm" / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (tmp_path / "lm" / "tokenizer_config.json").write_text(json.dumps(config))
        (tmp_path / "lm" / "chat_template.jinja").unlink(missing_ok=True)
    elif case.startswith("gguf"):
        language = _bad_gguf(tmp_path, tokenizer, case)
    elif case == "layer":
        kwargs["feature_layer"] = 9
    elif case == "projector":
        kwargs["projector"] = "linear"
    with pytest.raises(ModelError) as err:
        assemble(vision, language, tmp_path / "out", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def _bad_gguf(tmp_path, tokenizer, case: str):
    import gguf

    from edgekd.export.gguf_write import write_lm

    path = tmp_path / "lm.gguf"
    if case == "gguf_garbage":
        path.write_bytes(b"GGUF" + b"\x00" * 64)
        return path
    if case == "gguf_not_gguf":  # e.g. a safetensors file given as --language
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
        return path
    if case == "gguf_truncated":
        write_lm(build_vlm("tiny", tokenizer=tokenizer, decoder="llama"), path, "f32")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 4096])
        return path
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_cli_assembles_and_refuses_bad_parts_in_one_line(cli, tokenizer, tmp_path):
    tiny_tower("dinov2", tmp_path / "tower")
    tiny_language("llama", tmp_path / "lm", tokenizer)
    out = tmp_path / "vlm"
    args = ("models", "assemble", "--vision", tmp_path / "tower", "--language", tmp_path / "lm")
    result = cli(*args, "-o", out, "--image-size", "48")
    assert result.code == 0, result.err
    said = " ".join(result.out.split())  # the console wraps long paths at its width
    assert "dinov2 + mlp2x_gelu + llama" in said and "36 visual tokens" in said
    assert (out / RECORD).is_file()
    bad = tmp_path / "bad"
    cli(*args, "-o", bad, "--image-size", "50").one_line_error("--image-size 50")
    cli(*args, "-o", bad, "--select", "cls").one_line_error("--select 'cls'; valid: default, full")
    assert not bad.exists()
    cli(*args, "-o", out).one_line_error("pass --overwrite")


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_a_full_image_text_model_gives_its_vision_half(tmp_path, tokenizer, kind):
    """A SigLIP/CLIP image-text checkpoint: its vision model is the tower, at its own size and
    at another (the 2-D position table resized as transformers resamples it per call)."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH,
    )  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    cls, config = (SiglipModel, SiglipConfig) if kind == "siglip" else (CLIPModel, CLIPConfig)
    torch.manual_seed(0)
    full = cls(config(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path / "full")
    tiny_language("qwen2", tmp_path / "lm", tokenizer)
    for size in (SIZE, 48):
        out = tmp_path / f"vlm-{size}"
        assemble(tmp_path / "full", tmp_path / "lm", out, image_size=size, select="full")
        vlm = VLM.from_pretrained(out)
        pixels = torch.randn(1, 3, size, size)
        with torch.no_grad():
            want = full.vision_model(pixels, interpolate_pos_encoding=size != SIZE)
            got = vlm.vision_tower(pixels)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        assert vlm.num_image_tokens() == (size // PATCH) ** 2 + (kind == "clip")


def test_a_dinov2_towers_mlp_width_is_its_ratio(tmp_path, tokenizer):
    """DINOv2's MLP is mlp_ratio x hidden wide (its config has no intermediate_size): the
    width the planners count is the width the tower has."""
    from edgekd.models.dims import vision_mlp_width

    vlm = VLM.from_pretrained(tiny_assembled(tmp_path, tokenizer, tower="dinov2"))
    fc1 = vlm.vision_tower.encoder.layer[0].mlp.fc1
    assert vision_mlp_width(vlm.config.vision_config) == fc1.out_features
    siglip = VLM.from_pretrained(tiny_assembled(tmp_path / "s", tokenizer, tower="siglip"))
    fc1 = siglip.vision_tower.encoder.layers[0].mlp.fc1
    assert vision_mlp_width(siglip.config.vision_config) == fc1.out_features


def test_a_language_model_llava_cannot_host_is_refused_in_one_line(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    tiny_tower("siglip", tmp_path / "tower")
    with pytest.raises(ModelError, match="Llava cannot host a 'gpt2' language model") as e:
        assemble(tmp_path / "tower", tmp_path / "lm", tmp_path / "vlm")
    assert "\n" not in str(e.value) and not (tmp_path / "vlm").exists()
