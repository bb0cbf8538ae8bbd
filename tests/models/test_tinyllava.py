"""TinyLLaVA Factory -> Llava conversion: tiny checkpoints in the published layout (slow tokenizer
files, fp16 and bf16 weights), converted and compared with TinyLLaVA's own computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tinyllava_replica import (
    ADDED,
    IMAGE_TOKEN_INDEX,
    SYSTEM,
    non_square_image,
    tinyllava_ids,
    tinyllava_logits,
    tinyllava_pixels,
    tinyllava_prompt,
    write_tinyllava,
)

from edgekd.errors import ModelError, OutputError, OutputExistsError
from edgekd.models import VLM
from edgekd.models.tinyllava import convert_tinyllava
from edgekd.models.tinyllava_processor import TEMPLATE_EOS

QUESTION = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}],
    }
]


@pytest.mark.parametrize(
    "layout,dtype,family,tie,grow,select,aspect,text",
    [
        ("single", torch.float16, "qwen2", True, False, "patch", "square", "qwen2"),
        ("sharded", torch.bfloat16, "qwen2.5", False, False, "cls_patch", "pad", "qwen2"),
        ("subfolders", torch.float16, "qwen2", True, True, "patch", None, "qwen2"),
        ("single", torch.float16, "qwen2", False, False, "patch", "square", "llama"),
        ("single", torch.bfloat16, "qwen2", True, False, "patch", "pad", "gemma"),
    ],
)
def test_converted_logits_equal_tinyllava_forward(
    tmp_path, layout, dtype, family, tie, grow, select, aspect, text
):
    """Qwen2 backbones, and the Llama (TinyLlama) and Gemma ones: Gemma's visual rows are
    scaled by sqrt(hidden) in the source's forward and inside the converted projector."""
    parts = write_tinyllava(
        tmp_path / "src",
        layout=layout,
        dtype=dtype,
        family=family,
        tie=tie,
        grow=grow,
        select=select,
        aspect=aspect,
        text_model_type=text,
    )
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    vlm = VLM.from_pretrained(tmp_path / "out")
    assert vlm.image_token_id == parts["base"] + len(ADDED[family])  # the next free id

    prompt = vlm.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == tinyllava_prompt(["<image>\nWhat shape is in the image?"], [None])
    assert vlm.processor.apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "A circle."}]
    ).endswith("ASSISTANT: A circle." + TEMPLATE_EOS[text])
    image = non_square_image()
    inputs = vlm.processor(text=prompt, images=image, return_tensors="pt")

    # Token for token what TinyLLaVA feeds its model, with -200 expanded to the visual tokens.
    ref_ids = tinyllava_ids(prompt, parts["tokenizer"])
    n_visual = 16 - (select == "patch")
    expanded = []
    for i in ref_ids:
        expanded += [vlm.image_token_id] * n_visual if i == IMAGE_TOKEN_INDEX else [i]
    assert inputs["input_ids"][0].tolist() == expanded
    assert vlm.num_image_tokens() == n_visual
    ref_pixels = tinyllava_pixels(image, parts["image_size"], aspect)  # from the raw image
    assert torch.equal(inputs["pixel_values"], ref_pixels)

    before = tinyllava_logits(parts, ref_ids, ref_pixels)
    with torch.no_grad():
        after = vlm.model(**inputs).logits
    v = before.shape[-1]
    assert after.shape[-1] == v + (1 if grow else 0)  # grow: the new <image> row is appended
    assert (after[..., :v] - before).abs().max().item() <= (5e-7 if text != "gemma" else 5e-6)


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("size", [(40, 48), (48, 20), (33, 33)])
def test_pixels_equal_tinyllava_preprocessing_of_the_raw_image(tmp_path, aspect, size):
    parts = write_tinyllava(tmp_path / "src", aspect=aspect)
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    processor = VLM.from_pretrained(tmp_path / "out").processor.image_processor
    assert type(processor).__name__.endswith("Pil")
    image = non_square_image(seed=1, size=size)
    got = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, tinyllava_pixels(image, parts["image_size"], aspect))
    if aspect == "pad" and size[0] != size[1]:  # padding shows: the corners hold the mean colour
        unpadded = tinyllava_pixels(image, parts["image_size"], "square")
        assert not torch.equal(got, unpadded)


def test_processor_reloads_the_pil_backend_even_where_torchvision_is_installed(
    tmp_path, monkeypatch
):
    from transformers import AutoProcessor
    from transformers.models.auto import image_processing_auto as auto

    write_tinyllava(tmp_path / "src", aspect="pad")
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    asked = []
    original = auto._load_backend_class

    def spy(base_class_name, backend, *args, **kwargs):
        asked.append(backend)
        return original(base_class_name, "pil", *args, **kwargs)  # torchvision is absent here

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(auto, "_load_backend_class", spy)
    AutoProcessor.from_pretrained(tmp_path / "out")
    assert asked == ["torchvision"]  # what transformers alone would load with torchvision
    vlm = VLM.from_pretrained(tmp_path / "out")
    assert asked[1:] == ["pil"]
    assert type(vlm.processor.image_processor).__name__ == "LlavaImageProcessorPil"


def test_manifest_records_source_and_mapping(tmp_path):
    write_tinyllava(tmp_path / "src", grow=True, aspect="pad")
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    from edgekd.io import sha256_file

    assert manifest["source"] == str((tmp_path / "src").resolve())
    assert manifest["source_revision"] is None  # a local directory, not a hub snapshot
    assert manifest["source_config_sha256"] == sha256_file(tmp_path / "src" / "config.json")
    assert manifest["source_dtype"] == "float16" and manifest["dtype"] == "float32"
    mapping = manifest["key_mapping"]
    assert mapping["connector._connector.0.* -> model.multi_modal_projector.linear_1.*"] == 2
    assert mapping["vision_tower._vision_tower.vision_model.* -> model.vision_tower.*"] > 0
    assert mapping["language_model.lm_head.* -> lm_head.*"] == 0  # tied: not saved
    assert manifest["tied_lm_head"] is True
    assert manifest["image_token"]["added"] is True
    assert manifest["vocab_size"]["converted"] == manifest["vocab_size"]["source"] + 1
    assert manifest["vision_feature_select_strategy"] == {"tinyllava": "patch", "llava": "default"}
    assert manifest["image_aspect_ratio"] == "pad"
    assert manifest["image_processor"] == "LlavaImageProcessorPil"


def test_chat_template_renders_qwen2_base(tmp_path):
    write_tinyllava(tmp_path / "src")
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    render = VLM.from_pretrained(tmp_path / "out").processor.apply_chat_template
    one = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert render(one, add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is it? ASSISTANT:"
    )
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "What is it? "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    expected = SYSTEM + (
        "USER: <image>\nWhat is it? ASSISTANT: A circle.<|endoftext|>"
        "USER: And its colour? ASSISTANT: Red.<|endoftext|>"
    )
    assert render(turns) == expected
    assert render(turns) == tinyllava_prompt(
        ["What is it? <image>", "And its colour?"], ["A circle.", "Red."]
    )
    system = [{"role": "system", "content": "Be brief."}] + one
    assert render(system, add_generation_prompt=True).startswith("Be brief. USER: <image>\n")


@pytest.mark.parametrize("connector", ["mlp3x_gelu", "resampler", None])
def test_unknown_connector_refused(tmp_path, connector):
    write_tinyllava(tmp_path / "src", connector_type=connector)
    with pytest.raises(ModelError, match=r"connector_type '.*' is not supported.*mlp2x_gelu"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "aspect,shown",
    [
        ("anyres", r"image_aspect_ratio 'anyres' is not supported: .*grid of crops"),
        ("resize", r"image_aspect_ratio 'resize' is unknown \(supported: square, pad\)"),
    ],
)
def test_unsupported_aspect_ratio_refused(tmp_path, aspect, shown):
    write_tinyllava(tmp_path / "src", aspect=aspect)
    with pytest.raises(ModelError, match=shown) as e:
        convert_tinyllava(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model_type,reasons",
    [
        ("phi", ["LM head has a bias", "lm_head.bias", "equals qwen2_base"]),
        ("stablelm", ["does not record its prompt template", "qwen2, llama, gemma"]),
    ],
)
def test_other_language_models_refused_with_the_real_reason(tmp_path, model_type, reasons):
    write_tinyllava(tmp_path / "src", text_model_type=model_type)  # hidden_size 32
    with pytest.raises(ModelError, match=f"language model '{model_type}'") as e:
        convert_tinyllava(tmp_path / "src", tmp_path / "out")
    for reason in reasons:
        assert reason in str(e.value)
    if model_type == "phi":
        assert "only right for Qwen2" not in str(e.value)  # the template is not the obstacle


def _rewrite(src: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(src / "model.safetensors"))


def test_missing_tensor_reported(tmp_path):
    write_tinyllava(tmp_path / "src")
    _rewrite(tmp_path / "src", lambda s: s.pop("connector._connector.2.bias"))
    with pytest.raises(ModelError, match=r"1 missing.*multi_modal_projector\.linear_2\.bias"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")


@pytest.mark.parametrize(
    "extra,shown",
    [
        ("connector._connector.4.weight", r"unexpected.*connector\._connector\.4\.weight"),
        (
            "vision_tower._vision_tower.vision_model.extra.weight",
            r"unexpected.*model\.vision_tower\.extra\.weight",
        ),
    ],
)
def test_extra_tensor_reported(tmp_path, extra, shown):
    write_tinyllava(tmp_path / "src")
    _rewrite(tmp_path / "src", lambda s: s.__setitem__(extra, torch.zeros(2)))
    with pytest.raises(ModelError, match=shown):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")


def test_shape_mismatch_reported(tmp_path):
    write_tinyllava(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"shape mismatches.*mlp\.\w+_proj\.weight"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")


def test_existing_output_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        convert_tinyllava(tmp_path / "does-not-exist", out)
    assert (out / "keep.txt").read_text() == "mine"
    write_tinyllava(tmp_path / "src")
    convert_tinyllava(tmp_path / "src", out, overwrite=True)
    assert (out / "edgekd_convert.json").is_file() and not (out / "keep.txt").exists()
    with pytest.raises(OutputError, match="is the input"):
        convert_tinyllava(tmp_path / "src", tmp_path / "src", overwrite=True)
    assert (tmp_path / "src" / "model.safetensors").is_file()


def test_not_a_tinyllava_checkpoint_refused(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        convert_tinyllava(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelError, match="model_type 'llava', expected 'tinyllava'") as e:
        convert_tinyllava(tiny_checkpoint, tmp_path / "out")
    assert "\n" not in str(e.value)
    Image.new("RGB", (2, 2)).save(tmp_path / "file.png")
    with pytest.raises(ModelError, match="is not a directory"):
        convert_tinyllava(tmp_path / "file.png", tmp_path / "out")


def test_missing_text_config_named(tmp_path):
    write_tinyllava(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    del cfg["text_config"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"no 'text_config'.*Qwen/Qwen2-0\.5B"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")


@pytest.mark.parametrize(
    "layout,source,asked,written",
    [
        ("single", torch.float16, "float32", torch.float32),
        ("single", torch.float16, "auto", torch.float16),
        ("sharded", torch.bfloat16, "auto", torch.bfloat16),
        ("sharded", torch.bfloat16, "float16", torch.float16),
    ],
)
def test_dtype_of_the_written_checkpoint(tmp_path, layout, source, asked, written):
    from safetensors import safe_open

    write_tinyllava(tmp_path / "src", layout=layout, dtype=source)
    convert_tinyllava(tmp_path / "src", tmp_path / "out", dtype=asked)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {{torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[written]}
    assert VLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == written
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    assert manifest["dtype"] == str(written).removeprefix("torch.")
    assert manifest["source_dtype"] == str(source).removeprefix("torch.")


def test_unknown_dtype_refused_before_any_work(tmp_path):
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        convert_tinyllava(tmp_path / "does-not-exist", tmp_path / "out", dtype="int3")
    assert not (tmp_path / "out").exists()
