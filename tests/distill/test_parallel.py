"""The pieces distributed training rests on, in one process: sharding units, ZeRO buckets,
tied weights in gathered state dicts, the frozen tail of the vision tower, the strategy guard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgekd.distill.run import check_parallelism
from edgekd.distill.switch import FeatureCapture, build_adapter, check_same_feature_layer
from edgekd.distill.trainer import DistillError, drop_tied_copies, wrap_classes, zero_buckets
from edgekd.errors import ModelError
from edgekd.models import build_vlm


def test_wrap_classes_are_the_layers_present(tiny_vlm, small_vlm):
    classes = wrap_classes(tiny_vlm.model)
    assert {"Qwen2DecoderLayer", "SiglipEncoderLayer"} <= set(classes)
    # the LLaVA class lists SigLIP's text embeddings too; a vision-only tower has none
    assert "SiglipTextEmbeddings" in tiny_vlm.model._no_split_modules
    assert "SiglipTextEmbeddings" not in classes
    assert wrap_classes(tiny_vlm.model, small_vlm.model) == wrap_classes(tiny_vlm.model)


def test_zero_buckets_follow_the_teacher_width_and_keep_set_values():
    config = {
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": 777,
        }
    }
    filled = zero_buckets(config, 2048)
    assert filled["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 2048 * 2048,
        "stage3_prefetch_bucket_size": int(0.9 * 2048 * 2048),
        "stage3_param_persistence_threshold": 777,
    }
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"  # not mutated


def test_tied_weights_are_saved_once(tiny_vlm):
    model = tiny_vlm.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    gathered = {
        name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)
    }
    assert "lm_head.weight" in gathered
    kept = drop_tied_copies(model, gathered)
    assert "lm_head.weight" not in kept
    assert "model.language_model.embed_tokens.weight" in kept
    assert len(kept) == len(gathered) - 1


def test_unused_vision_parameters_are_exactly_those_without_gradient(tokenizer):
    vlm = build_vlm("tiny", tokenizer=tokenizer, seed=0)
    size = vlm.config.vision_config.image_size
    vlm.vision_features(torch.randn(2, 3, size, size)).sum().backward()
    no_grad = {
        n
        for n, p in vlm.model.named_parameters()
        if n.startswith("model.vision_tower") and p.grad is None
    }
    assert no_grad and set(vlm.unused_vision_parameters()) == no_grad
    vlm.config.vision_feature_layer = -1  # the last layer: only the norm and the head are unused
    assert all("encoder.layers" not in n for n in vlm.unused_vision_parameters())


def test_unused_vision_parameters_of_a_clip_tower():
    from distill_helpers import clip_llama_vlm

    vlm, vision, _ = clip_llama_vlm()
    vlm.vision_features(torch.randn(1, 3, vision.image_size, vision.image_size)).sum().backward()
    no_grad = {
        n
        for n, p in vlm.model.named_parameters()
        if n.startswith("model.vision_tower") and p.grad is None
    }
    assert any("post_layernorm" in n for n in no_grad)  # CLIP: no pooling head, a final norm
    assert set(vlm.unused_vision_parameters()) == no_grad


def test_switch_needs_the_same_feature_layer(tokenizer):
    teacher = build_vlm("small", tokenizer=tokenizer, seed=1)
    student = build_vlm("tiny", tokenizer=tokenizer, seed=0)
    check_same_feature_layer(student, teacher)
    student.config.vision_feature_layer = 0
    with pytest.raises(
        ModelError, match=r"student vision_feature_layer 0 .* teacher vision_feature_layer -2"
    ):
        build_adapter(student, teacher)


def test_adapter_reaches_the_student_output_without_changing_it(tokenizer):
    student = build_vlm("tiny", tokenizer=tokenizer, seed=0)
    teacher = build_vlm("small", tokenizer=tokenizer, seed=1)
    size = student.config.vision_config.image_size
    n = student.num_image_tokens()
    ids = torch.full((1, n + 4), 5)
    ids[0, 1 : 1 + n] = student.image_token_id
    pixels = torch.randn(1, 3, size, size)
    plain = student.model(input_ids=ids, pixel_values=pixels).logits
    adapter = build_adapter(student, teacher, "linear")
    student.model.add_module("vsd_adapter", adapter)
    capture = FeatureCapture(student.model, adapter)
    out = student.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.sum().backward()  # the student's own loss: the edge carries a zero gradient
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().max() == 0
    assert capture.pop().shape == (1, n, teacher.vision_hidden_size)


@pytest.mark.parametrize(
    "strategy,flag", [("fsdp", "is_fsdp_enabled"), ("deepspeed-zero3", "is_deepspeed_enabled")]
)
def test_a_strategy_that_did_not_take_effect_is_refused(strategy, flag):
    trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    with pytest.raises(DistillError, match=f"{strategy} is not active on cpu.*plain DDP"):
        check_parallelism(trainer, strategy, "cpu")
    setattr(trainer, flag, True)
    check_parallelism(trainer, strategy, "cpu")
    check_parallelism(trainer, "ddp", "cpu")


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_every_micro_batch_gets_an_image_and_every_sample_once(batch):
    from edgekd.distill.trainer import ImageInEveryBatch

    has_image = [i % 3 != 0 for i in range(25)]  # 8 or 9 text-only samples of 25
    sampler = ImageInEveryBatch(has_image, batch, seed=7)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(25))
        runs = [order[i : i + batch] for i in range(0, 25, batch)]
        assert all(any(has_image[i] for i in run) for run in runs)
    sampler.set_epoch(0)
    assert list(sampler) == list(ImageInEveryBatch(has_image, batch, seed=7))  # every rank agrees
    assert list(sampler) != sorted(order)  # shuffled


def test_too_few_images_for_the_micro_batches_are_refused():
    from edgekd.distill.trainer import ImageInEveryBatch

    with pytest.raises(DistillError, match="need an image in every micro-batch.*8 of 10"):
        ImageInEveryBatch([True, True] + [False] * 8, 2)
    with pytest.raises(DistillError, match="per_device_batch_size is 1"):
        ImageInEveryBatch([True, False], 1)
