"""The visual switch: gradients reach only the student vision tower; shapes are checked."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import saved_for_backward

from edgekd.data import LlavaCollator, LlavaDataset
from edgekd.distill.objective import Objective
from edgekd.distill.switch import FeatureCapture, TeacherRoutes, build_adapter
from edgekd.errors import ModelError
from edgekd.models import build_vlm


def _batch(vlm, data_path, n=6, start=0):
    ds = LlavaDataset(data_path, data_path.parent, vlm.processor, 64)
    return LlavaCollator(vlm.tokenizer.pad_token_id)([ds[i] for i in range(start, start + n)])


@pytest.fixture
def fresh(tokenizer):
    teacher = build_vlm("small", tokenizer=tokenizer, seed=3)
    student = build_vlm("tiny", tokenizer=tokenizer, seed=4)
    student.model.train()
    return teacher, student


def _vsd_backward(teacher, student, batch):
    capture = FeatureCapture(student.model)
    routes = TeacherRoutes(teacher.model)
    student.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    out = routes(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["has_image"],
        capture.pop(),
    )
    objective = Objective("switch-kd", w_ce=0.0, w_align=0.0, w_vsd=1.0, top_n=32, k_max=8)
    mask = batch["labels"][:, 1:] != -100
    loss = objective.distill(
        out.switch_logits[:, :-1], out.logits[batch["has_image"]][:, :-1], mask[batch["has_image"]]
    ).loss
    loss.backward()
    return loss


def test_vsd_gradient_reaches_only_the_student_vision_tower(fresh, distill_data):
    teacher, student = fresh
    loss = _vsd_backward(teacher, student, _batch(student, distill_data))
    assert loss.item() > 0
    assert all(p.grad is None for p in teacher.model.parameters()), "the teacher is frozen"
    assert not teacher.model.training
    tower = {id(p) for p in student.vision_tower.parameters()}
    got = [
        n
        for n, p in student.model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert got and all(id(dict(student.model.named_parameters())[n]) in tower for n in got)
    assert any(n.startswith("model.vision_tower.") for n in got)


def test_switch_logits_equal_teacher_route_when_features_are_the_teachers(fresh, distill_data):
    teacher, _ = fresh
    batch = _batch(teacher, distill_data)
    with torch.no_grad():
        feats = teacher.vision_features(batch["pixel_values"])
        out = TeacherRoutes(teacher.model)(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["has_image"],
            feats,
        )
    torch.testing.assert_close(out.switch_logits, out.logits[batch["has_image"]])
    full = teacher.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits
    torch.testing.assert_close(out.logits, full)


def test_samples_without_an_image_skip_vsd(fresh, distill_data):
    teacher, student = fresh
    batch = _batch(student, distill_data, n=6, start=22)  # 2 image samples, 4 text-only
    assert batch["has_image"].tolist() == [True, True, False, False, False, False]
    capture = FeatureCapture(student.model)
    student.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    out = TeacherRoutes(teacher.model)(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["has_image"],
        capture.pop(),
    )
    assert out.switch_logits.shape[0] == 2
    text_only = _batch(student, distill_data, n=3, start=24)
    assert text_only["pixel_values"] is None
    student.model(input_ids=text_only["input_ids"], attention_mask=text_only["attention_mask"])
    assert capture.pop() is None
    out = TeacherRoutes(teacher.model)(
        text_only["input_ids"], text_only["attention_mask"], None, text_only["has_image"], None
    )
    assert out.switch_logits is None


def test_teacher_stays_in_eval_mode(fresh):
    teacher, _ = fresh
    routes = TeacherRoutes(teacher.model)
    routes.train()
    assert not routes.training and not teacher.model.training
    assert not any(p.requires_grad for p in routes.parameters())


def test_vision_shape_mismatch_names_both_shapes_and_the_adapter(tokenizer):
    from edgekd.models import factory

    base = factory.SHAPES["tiny"]
    wide = factory.VisionShape(96, 128, 2, 4, image_size=64, patch_size=16)
    factory.SHAPES["tiny-wide"] = factory.VLMShape(wide, base.text)
    try:
        student = build_vlm("tiny-wide", tokenizer=tokenizer)
    finally:
        del factory.SHAPES["tiny-wide"]
    teacher = build_vlm("small", tokenizer=tokenizer)
    with pytest.raises(ModelError, match=r"\(N, 16, 96\).*\(N, 16, 64\).*--vsd-adapter linear"):
        build_adapter(student, teacher)
    adapter = build_adapter(student, teacher, "linear")
    assert isinstance(adapter, torch.nn.Linear)
    assert (adapter.in_features, adapter.out_features) == (96, 64)
    with pytest.raises(ModelError, match="unknown --vsd-adapter 'mlp'"):
        build_adapter(student, teacher, "mlp")


def test_identity_initialised_adapter_for_equal_widths(tiny_vlm, small_vlm):
    adapter = build_adapter(tiny_vlm, small_vlm, "linear")
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(adapter(x), x)


def test_checkpointed_switch_route_same_gradients_less_memory(tokenizer, distill_data):
    teacher = build_vlm("small", tokenizer=tokenizer, seed=3)
    student = build_vlm("tiny", tokenizer=tokenizer, seed=4)
    batch = _batch(student, distill_data)
    features = torch.randn(
        int(batch["has_image"].sum()), student.num_image_tokens(), student.vision_hidden_size
    )
    results = []
    for checkpoint in (False, True):
        routes = TeacherRoutes(teacher.model, checkpoint_switch=checkpoint)
        feats = features.clone().requires_grad_(True)
        outs = {}

        def run(routes=routes, feats=feats, outs=outs):
            outs["out"] = routes(
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                batch["has_image"],
                feats,
            )

        saved = sum(t.numel() * t.element_size() for t in saved_for_backward(teacher.model, run))
        outs["out"].switch_logits.square().mean().backward()
        results.append((saved, outs["out"].switch_logits.detach(), feats.grad))
        assert not any(m.training for m in teacher.model.modules())  # eval again afterwards
    (full, logits, grad), (ckpt, logits_c, grad_c) = results
    torch.testing.assert_close(logits_c, logits, rtol=0, atol=0)
    torch.testing.assert_close(grad_c, grad, rtol=1e-6, atol=1e-7)
    layers = teacher.config.text_config.num_hidden_layers
    assert ckpt < full * 0.6, f"checkpointing kept {ckpt} of {full} bytes ({layers} layers)"
