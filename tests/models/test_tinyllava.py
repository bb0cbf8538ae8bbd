"""TinyLLaVA Factory -> Llava conversion: tiny checkpoints in TinyLLaVA's real layout, converted and
compared with a forward pass written the way TinyLLaVA computes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.errors import ModelError, OutputError, OutputExistsError
from edgekd.models import VLM
from edgekd.models.tinyllava import QWEN2_BASE_SYSTEM, convert_tinyllava

IMAGE_TOKEN_INDEX = -200  # TinyLLaVA's placeholder id (tinyllava/utils/constants.py)
EOS = "<|endoftext|>"
SYSTEM = QWEN2_BASE_SYSTEM + " "


# ---- a tiny TinyLLaVA checkpoint, written as TinyLLaVA Factory writes one ------------------------
def _qwen_like_tokenizer():
    """Byte-level BPE with only <|endoftext|> special, like Qwen2's: no <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        [SYSTEM, "USER: ASSISTANT: What shape is in the image? A red circle."], trainer=trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _text_config(tokenizer, rows: int, tie: bool) -> dict:
    """A Qwen2 text_config as transformers 4.x nests it in TinyLLaVA's config.json."""
    return {
        "_name_or_path": "Qwen/Qwen2-0.5B",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "max_window_layers": 2,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "sliding_window": 256,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "vocab_size": rows,
    }


def _vision_config() -> dict:
    """SigLIP vision_config as TinyLLaVA nests it (with its model_name_or_path bookkeeping)."""
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "image_size": 32,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-06,
        "model_name_or_path": "google/siglip",
        "model_name_or_path2": "",
        "model_type": "siglip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "patch_size": 8,  # 16 patches; "patch" keeps 15
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
    connector_type="mlp2x_gelu",
    select="patch",
    tie=True,
    grow=False,
    layout="single",
    seed=0,
) -> dict:
    """Write a random tiny TinyLLaVA checkpoint; return its modules for the reference forward.

    ``grow``: the embedding has exactly len(tokenizer) rows, so <image> needs a new row.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    path.mkdir(parents=True)
    tokenizer = _qwen_like_tokenizer()
    rows = len(tokenizer) if grow else len(tokenizer) + 16  # Qwen2 pads its embedding, too
    text, vision = _text_config(tokenizer, rows, tie), _vision_config()
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(Qwen2Config(**_strip(text))).eval()
    tower = SiglipVisionModel(SiglipVisionConfig(**_strip(vision))).eval()
    connector = torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)
    ).eval()
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
    state = {prefixes[p] + k: v.clone() for p, sd in parts.items() for k, v in sd.items()}
    if layout == "single":
        save_file(state, str(path / "model.safetensors"))
    elif layout == "sharded":
        names = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2],
        }
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(path / shard))
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:  # the pre-train stage: one pytorch_model.bin per part, keys without the part prefix
        for part, sd in parts.items():
            (path / part).mkdir()
            torch.save({k: v.clone() for k, v in sd.items()}, path / part / "pytorch_model.bin")
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "cache_dir": None,
        "auto_map": {  # as on the hub: never followed (no trust_remote_code)
            "AutoConfig": "configuration.TinyLlavaConfig",
            "AutoModelForCausalLM": "modeling_tinyllava_qwen2.TinyLlavaForConditionalGeneration",
        },
        "connector_type": connector_type,
        "hidden_size": 32,
        "ignore_index": -100,
        "image_aspect_ratio": "square",
        "image_token_index": IMAGE_TOKEN_INDEX,
        "llm_model_name_or_path": "Qwen/Qwen2-0.5B",
        "model_type": "tinyllava",
        "pad_token": EOS,
        "pad_token_id": tokenizer.eos_token_id,
        "resampler_hidden_size": None,
        "num_queries": None,
        "num_resampler_layers": None,
        "text_config": text,
        "tokenizer_model_max_length": 2048,
        "tokenizer_name_or_path": "Qwen/Qwen2-0.5B",
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "torch_dtype": "float32",
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
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return {
        "lm": lm,
        "tower": tower,
        "connector": connector,
        "tokenizer": tokenizer,
        "select": select,
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


@torch.no_grad()
def tinyllava_logits(parts: dict, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """TinyLLaVA's forward: tower hidden_states[-2], drop token 0 for 'patch', connector, splice."""
    hidden = parts["tower"](pixel_values, output_hidden_states=True).hidden_states[-2]
    if parts["select"] == "patch":
        hidden = hidden[:, 1:]
    features = parts["connector"](hidden)[0]
    ids_t = torch.tensor(ids)
    at = int((ids_t == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    embed = parts["lm"].get_input_embeddings()
    embeds = torch.cat([embed(ids_t[:at]), features, embed(ids_t[at + 1 :])])
    return parts["lm"](inputs_embeds=embeds[None]).logits


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout,tie,grow,select",
    [
        ("single", True, False, "patch"),
        ("sharded", False, False, "cls_patch"),
        ("subfolders", True, True, "patch"),
    ],
)
def test_converted_logits_equal_tinyllava_forward(tmp_path, layout, tie, grow, select):
    parts = write_tinyllava(tmp_path / "src", layout=layout, tie=tie, grow=grow, select=select)
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    vlm = VLM.from_pretrained(tmp_path / "out")

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}],
        }
    ]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == tinyllava_prompt(["<image>\nWhat shape is in the image?"], [None])
    inputs = vlm.processor(text=prompt, images=_image(), return_tensors="pt")

    # Token for token what TinyLLaVA feeds its model, with -200 expanded to the visual tokens.
    ref_ids = tinyllava_ids(prompt, parts["tokenizer"])
    n_visual = 16 - (select == "patch")
    expanded = []
    for i in ref_ids:
        expanded += [vlm.image_token_id] * n_visual if i == IMAGE_TOKEN_INDEX else [i]
    assert inputs["input_ids"][0].tolist() == expanded
    assert vlm.num_image_tokens() == n_visual

    before = tinyllava_logits(parts, ref_ids, inputs["pixel_values"])
    with torch.no_grad():
        after = vlm.model(**inputs).logits
    v = before.shape[-1]
    assert after.shape[-1] == v + (1 if grow else 0)  # grow: the new <image> row is appended
    assert (after[..., :v] - before).abs().max().item() <= 1e-6


def test_manifest_records_source_and_mapping(tmp_path):
    write_tinyllava(tmp_path / "src", grow=True)
    convert_tinyllava(tmp_path / "src", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    from edgekd.io import sha256_file

    assert manifest["source"] == str((tmp_path / "src").resolve())
    assert manifest["source_config_sha256"] == sha256_file(tmp_path / "src" / "config.json")
    mapping = manifest["key_mapping"]
    assert mapping["connector._connector.0.* -> model.multi_modal_projector.linear_1.*"] == 2
    assert mapping["vision_tower._vision_tower.vision_model.* -> model.vision_tower.*"] > 0
    assert mapping["language_model.lm_head.* -> lm_head.*"] == 0  # tied: not saved
    assert manifest["tied_lm_head"] is True
    assert manifest["image_token"]["added"] is True
    assert manifest["vocab_size"]["converted"] == manifest["vocab_size"]["source"] + 1
    assert manifest["vision_feature_select_strategy"] == {"tinyllava": "patch", "llava": "default"}


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


def test_missing_text_config_named(tmp_path):
    write_tinyllava(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    del cfg["text_config"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"no 'text_config'.*Qwen/Qwen2-0\.5B"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out")


def test_dtype_is_applied_and_unknown_dtype_refused(tmp_path):
    write_tinyllava(tmp_path / "src")
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        convert_tinyllava(tmp_path / "src", tmp_path / "out", dtype="int3")
    convert_tinyllava(tmp_path / "src", tmp_path / "out", dtype="bfloat16")
    assert VLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == torch.bfloat16
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    assert manifest["dtype"] == "bfloat16"
