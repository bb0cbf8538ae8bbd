"""Depth pruning: the kept layers are the teacher's own, exactly, and a bad choice is one line."""

from __future__ import annotations

import json

import pytest
import torch

from edgekd.errors import ModelError
from edgekd.models import VLM, build_vlm
from edgekd.models.prune import RECORD, evenly_spaced, layers_to_keep, prune


def _logits_skipping(vlm: VLM, layers: torch.nn.ModuleList, dropped: list[int]) -> torch.Tensor:
    """The model's logits with the ``dropped`` layers passing their input through (the
    teacher run by hand)."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hooks = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in dropped]
    try:
        return _logits(vlm)
    finally:
        for hook in hooks:
            hook.remove()


def _logits(vlm: VLM) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(5, vlm.vocab_size - 1, (1, vlm.num_image_tokens() + 8))
    ids[ids == vlm.image_token_id] = 5
    ids[0, 2 : 2 + vlm.num_image_tokens()] = vlm.image_token_id
    pixels = torch.randn(1, 3, *[vlm.config.vision_config.image_size] * 2)
    with torch.no_grad():
        return vlm.model(input_ids=ids, pixel_values=pixels, use_cache=False).logits


def test_evenly_spaced_keeps_the_first_and_last():
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1) == [0]
    assert (
        layers_to_keep(4, [3, 0], None, "x") == [0, 3]
        and layers_to_keep(4, None, None, "x") is None
    )


@pytest.mark.parametrize(
    "indices,count,message",
    [
        ([0, 9], None, "layer 9 out of range; the model has 0..3"),
        ([-1], None, "layer -1 out of range"),
        ([1, 1], None, "layer 1 given twice"),
        ([], None, "no layer index given"),
        ([0], 2, "not both"),
        (None, 5, "cannot keep 5 of 4 layers"),
        (None, 0, "cannot keep 0 of 4 layers"),
    ],
)
def test_a_bad_choice_of_layers_is_one_line(indices, count, message):
    with pytest.raises(ModelError, match=message):
        layers_to_keep(4, indices, count, "--keep-layers")


def test_pruned_decoder_is_the_teacher_without_the_dropped_layers(small_vlm, tmp_path):
    src = tmp_path / "teacher"
    small_vlm.save_pretrained(src)
    record = prune(src, tmp_path / "student", keep_layers=[0, 3])
    student = VLM.from_pretrained(tmp_path / "student")
    assert student.config.text_config.num_hidden_layers == 2
    assert record["text_layers"] == {"kept": [0, 3], "of": 4} and "vision_layers" not in record
    assert json.loads((tmp_path / "student" / RECORD).read_text()) == record
    assert record["parameters"]["after"] < record["parameters"]["before"]
    # the kept layers, the embeddings, the head, the tower and the processor are the teacher's
    teacher = small_vlm.language_model.layers
    for new, old in enumerate([0, 3]):
        for (name, a), b in zip(
            student.language_model.layers[new].state_dict().items(),
            teacher[old].state_dict().values(),
        ):
            assert torch.equal(a, b), name
    assert student.fingerprint() == small_vlm.fingerprint()
    # and the whole model computes what the teacher computes with layers 1 and 2 skipped
    expected = _logits_skipping(small_vlm, teacher, [1, 2])
    torch.testing.assert_close(_logits(student), expected, rtol=0, atol=0)
    assert not torch.equal(_logits(small_vlm), expected)  # the skipped layers did matter


def test_vision_layers_prune_with_a_feature_layer_from_the_end(tokenizer, tmp_path):
    teacher = build_vlm("tiny", tokenizer=tokenizer, seed=3, vision_feature_layer=-1)
    teacher.save_pretrained(tmp_path / "teacher")
    record = prune(tmp_path / "teacher", tmp_path / "student", keep_vision_layers=[1])
    student = VLM.from_pretrained(tmp_path / "student")
    assert record["vision_layers"] == {"kept": [1], "of": 2} and "text_layers" not in record
    assert student.config.vision_config.num_hidden_layers == 1
    expected = _logits_skipping(teacher, teacher.vision_tower.encoder.layers, [0])
    torch.testing.assert_close(_logits(student), expected, rtol=0, atol=0)


def test_vision_pruning_refuses_a_feature_layer_it_would_move(tiny_checkpoint, tmp_path):
    # the tiny tower has 2 layers and LLaVA's feature layer -2: one layer cannot hold it
    with pytest.raises(ModelError, match="needs at least 2 vision layers; 1 kept"):
        prune(tiny_checkpoint, tmp_path / "out", vision_layers=1)
    assert not (tmp_path / "out").exists()


def test_cli_prunes_and_refuses_bad_input_in_one_line(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "student"
    result = cli("models", "prune", tiny_checkpoint, "-o", out, "--layers", "1")
    assert result.code == 0, result.err
    assert "decoder layers 0 of 2 kept" in " ".join(result.out.split())
    assert VLM.from_pretrained(out).config.text_config.num_hidden_layers == 1
    bad = tmp_path / "bad"
    cli("models", "prune", tiny_checkpoint, "-o", bad, "--keep-layers", "0,x").one_line_error(
        "--keep-layers '0,x'", "comma-separated"
    )
    cli("models", "prune", tiny_checkpoint, "-o", bad, "--keep-layers", "0,2").one_line_error(
        "layer 2 out of range"
    )
    cli("models", "prune", tiny_checkpoint, "-o", bad).one_line_error("nothing to prune")
    cli("models", "prune", tiny_checkpoint, "-o", out, "--layers", "1").one_line_error(
        "already exists"
    )
    assert not bad.exists()


def test_a_dinov2_tower_prunes_and_reloads(tokenizer, tmp_path):
    """DINOv2's config names one backbone stage per layer: pruning renames them."""
    from tiny_parts import tiny_assembled

    from edgekd.models.vlm import VLM as Loaded

    ckpt = tiny_assembled(tmp_path, tokenizer)
    prune(ckpt, tmp_path / "student", layers=1, vision_layers=2)
    student = Loaded.from_pretrained(tmp_path / "student")
    assert student.config.vision_config.num_hidden_layers == 2
    assert student.config.vision_config.out_features == ["stage2"]
    assert student.num_image_tokens() == Loaded.from_pretrained(ckpt).num_image_tokens()
