"""The objective's options change the loss as documented; the cut switch route keeps gradients."""

from __future__ import annotations

import json

import pytest
import torch
from distill_helpers import FAST

from edgekd.distill.losses import dbild, forward_kl
from edgekd.distill.objective import Objective, supervised_positions

V = 40


def _logits(seed: int = 0, rows: int = 3, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, length, V, generator=g) * 2
    teacher = torch.randn(rows, length, V, generator=g) * 3
    labels = torch.full((rows, length), -100)
    labels[:, 3] = torch.tensor([5, 6, 7])
    labels[:, 4] = 1  # the end-of-turn token of every row
    return student.requires_grad_(), teacher, labels


def test_t2_scale_multiplies_the_softened_terms_only():
    s, t, labels = _logits()
    scaled, parts = Objective("dbild", top_n=16, k_max=8)(s, labels, t)
    plain, parts_plain = Objective("dbild", top_n=16, k_max=8, t2_scale=False)(s, labels, t)
    assert parts["align"] == parts_plain["align"]  # the logged term is unscaled
    assert scaled.item() == pytest.approx(parts["ce"].item() + 9 * parts["align"].item(), rel=1e-6)
    assert plain.item() == pytest.approx(parts["ce"].item() + parts["align"].item(), rel=1e-6)
    # pinned: a regression check on these logits, not a truth
    assert parts["align"].item() == pytest.approx(0.90839, abs=1e-4)
    # kd runs at T = 1: the scale is 1 with or without the option
    kd, _ = Objective("kd")(s, labels, t)
    kd_plain, _ = Objective("kd", t2_scale=False)(s, labels, t)
    assert kd.item() == kd_plain.item()
    assert Objective("bild", temperature=2.0).scale == 4.0
    assert Objective("switch-kd", logit_loss="kd").scale == 1.0


def test_excluded_targets_leave_distillation_but_not_ce():
    s, t, labels = _logits()
    full, parts_full = Objective("dbild", top_n=16, k_max=8)(s, labels, t)
    cut, parts_cut = Objective("dbild", top_n=16, k_max=8, exclude_ids=frozenset({1}))(s, labels, t)
    assert parts_cut["ce"] == parts_full["ce"]  # CE keeps the end-of-turn positions
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 2] = True  # only the answer positions (targets 5, 6, 7) are distilled
    expected = dbild(s[:, :-1], t[:, :-1], mask, top_n=16, k_max=8).loss
    assert parts_cut["align"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts_cut["align"] != parts_full["align"]


def test_k_min_two_is_a_zero_term_and_the_clamp_shares_are_reported():
    s, t, labels = _logits()
    mask = labels[:, 1:] != -100
    assert dbild(s[:, :-1], t[:, :-1], mask, k_min=2, k_max=2).loss.item() == 0.0
    spike = torch.zeros(1, 1, V)
    spike[..., 0] = 50.0  # a knee at the first logit: k clamped up to k_min
    flat = torch.zeros(1, 1, V)  # no knee: k_max
    one = torch.ones(1, 1, dtype=torch.bool)
    out = dbild(spike, flat, one, top_n=16, k_min=3, k_max=8)
    assert (out.k_t.item(), out.k_s.item()) == (8.0, 3.0)  # teacher flat, student spiked
    assert (out.k_at_min.item(), out.k_at_max.item()) == (0.5, 0.5)
    _, stats = Objective("dbild", top_n=16, k_max=8)(s, labels, t)
    assert {"k_at_min", "k_at_max"} <= stats.keys()


def test_switch_kd_with_kd_as_logit_loss_is_forward_kl():
    s, t, labels = _logits()
    objective = Objective("switch-kd", logit_loss="kd", w_vsd=0.0)
    _, parts = objective(s, labels, t)
    mask = labels[:, 1:] != -100
    assert parts["align"].item() == pytest.approx(
        forward_kl(s[:, :-1], t[:, :-1], mask).loss.item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="logit_loss"):
        Objective("switch-kd", logit_loss="bild")


def test_recipe_defaults_and_refusals():
    from edgekd.profiles import load_recipe
    from edgekd.profiles.schema import ProfileError

    recipe = load_recipe("easyvqa-cpu")
    assert (
        recipe.loss.k_min == 3 and recipe.loss.t2_scale and not recipe.loss.distill_special_tokens
    )
    assert recipe.training.vision_tower_init == "student"
    with pytest.raises(ProfileError, match="loss.k_min: must be >= 3, got 2: at k = 2"):
        load_recipe("easyvqa-cpu", overrides={"loss.k_min": 2})
    # methods that never read k keep a recipe's old k_min
    kd = {"method": "kd", "loss.w_vsd": 0.0, "loss.k_min": 2}
    assert load_recipe("easyvqa-cpu", overrides=kd).loss.k_min == 2
    with pytest.raises(ProfileError, match="loss.logit_loss: switch-kd only"):
        overrides = {"method": "kd", "loss.w_vsd": 0.0, "loss.logit_loss": "kd"}
        load_recipe("easyvqa-cpu", overrides=overrides)
    with pytest.raises(ProfileError, match="teacher: required by training.vision_tower_init"):
        load_recipe(
            "easyvqa-cpu",
            overrides={"method": "sft", "teacher": None, "loss.w_align": 0.0, "loss.w_vsd": 0.0,
                       "training.vision_tower_init": "teacher"},
        )  # fmt: skip


def test_special_tokens_are_left_out_by_default(tokenizer):
    from edgekd.distill.run import build_objective, special_token_ids
    from edgekd.profiles import load_recipe

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in special_token_ids(tokenizer)
    recipe = load_recipe("easyvqa-cpu")
    assert im_end in build_objective(recipe, tokenizer).exclude_ids
    keep = load_recipe("easyvqa-cpu", overrides={"loss.distill_special_tokens": True})
    assert build_objective(keep, tokenizer).exclude_ids == frozenset()


# ---- the student's vision tower from the teacher's -------------------------------------------


def _tower(vlm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vlm.vision_tower.state_dict().items()}


@pytest.mark.parametrize("method", ["switch-kd", "sft"])
def test_vision_tower_init_teacher_copies_the_teachers_tower(job_factory, method, teacher_ckpt):
    from edgekd.distill.run import load_models, pick_device, resolve_recipe
    from edgekd.models import VLM

    job = job_factory(
        method,
        teacher=str(teacher_ckpt),
        overrides={"training.vision_tower_init": "teacher"},
    )
    recipe = resolve_recipe(job)
    teacher, student = load_models(recipe, job, pick_device("cpu"))
    assert (teacher is None) == (method == "sft")  # sft reads the teacher for its tower only
    expected = _tower(VLM.from_pretrained(teacher_ckpt))
    got = _tower(student)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    own = resolve_recipe(job_factory(method, teacher=str(teacher_ckpt)))
    _, untouched = load_models(own, job, "cpu")
    assert not all(torch.equal(_tower(untouched)[k], expected[k]) for k in expected)


def test_vision_tower_init_refuses_towers_of_other_shapes(tokenizer):
    from edgekd.distill.pair import share_vision_tower
    from edgekd.errors import ModelError
    from edgekd.models import build_vlm

    teacher = build_vlm("small", tokenizer=tokenizer, seed=0)
    student = build_vlm("tiny", tokenizer=tokenizer, seed=1)
    layer = student.vision_tower.encoder.layers[0]
    layer.mlp.fc1 = torch.nn.Linear(64, 96)
    with pytest.raises(
        ModelError, match=r"'encoder.layers.0.mlp.fc1.bias' is \(96,\), the teacher's is \(128,\)"
    ):
        share_vision_tower(teacher, student)


def test_options_work_through_the_cli(cli, tmp_path, teacher_ckpt, student_ckpt, distill_data):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in FAST.items()]
    result = cli(
        "distill", "--method", "switch-kd", "--teacher", teacher_ckpt,
        "--student", student_ckpt, "--data", distill_data, "--output", out,
        "--no-t2-scale", "--distill-special-tokens", "--logit-loss", "kd",
        "--vision-tower-init", "teacher", "--k-min", "4", "--logging-steps", "1",
        "--device", "cpu", *sets,
    )  # fmt: skip
    assert result.code == 0, result.err
    config = (out / "config.yaml").read_text()
    for line in ("t2_scale: false", "distill_special_tokens: true", "logit_loss: kd",
                 "vision_tower_init: teacher", "k_min: 4"):  # fmt: skip
        assert line in config
    logs = json.loads((out / "training_log.json").read_text())["log_history"]
    assert any("vsd" in entry for entry in logs)
    bad = cli(
        "distill", "--method", "kd", "--logit-loss", "kd", "--teacher", teacher_ckpt,
        "--student", student_ckpt, "--data", distill_data, "--output", tmp_path / "bad",
    )  # fmt: skip
    bad.one_line_error("loss.logit_loss", "switch-kd only")
    assert not (tmp_path / "bad").exists()


def test_dbild_runs_log_the_clamp_shares(job_factory):
    from edgekd.distill.run import run

    summary = run(job_factory("dbild"))
    assert {"k_at_min", "k_at_max", "k_t", "k_s"} <= summary["last_log"].keys()
    assert 0.0 <= summary["last_log"]["k_at_min"] <= 1.0


# ---- logits at the supervised positions only ------------------------------------------------


def test_supervised_positions_are_the_union_over_rows():
    labels = torch.full((2, 6), -100)
    labels[0, 3], labels[1, 5], labels[1, 4] = 1, 2, 3
    assert supervised_positions(labels).tolist() == [2, 3, 4]


@pytest.mark.parametrize("method", ["switch-kd", "kd"])
def test_logits_at_supervised_positions_give_the_same_loss_and_gradients(
    method, tokenizer, distill_data
):
    from edgekd.data import LlavaCollator, LlavaDataset
    from edgekd.distill.switch import FeatureCapture, TeacherRoutes
    from edgekd.distill.trainer import distill_step
    from edgekd.models import build_vlm

    teacher = build_vlm("small", tokenizer=tokenizer, seed=3)
    student = build_vlm("tiny", tokenizer=tokenizer, seed=4)
    ds = LlavaDataset(distill_data, distill_data.parent, student.processor, 64)
    # image rows and a text-only row, answers at different positions
    batch = LlavaCollator(tokenizer.pad_token_id)([ds[i] for i in (0, 1, 2, len(ds) - 1)])
    routes = TeacherRoutes(teacher.model)
    capture = FeatureCapture(student.model) if method == "switch-kd" else None
    objective = Objective(method, top_n=32, k_max=8)
    results = []
    for every in (True, False):
        student.model.zero_grad(set_to_none=True)
        loss, stats, out = distill_step(student.model, routes, capture, objective, batch, every)
        loss.backward()
        grads = {
            n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None
        }
        results.append((loss.detach(), stats, grads, out.logits.shape[1]))
    (l_full, s_full, g_full, n_full), (l_cut, s_cut, g_cut, n_cut) = results
    assert n_cut < n_full  # fewer logits computed
    torch.testing.assert_close(l_cut, l_full, rtol=1e-6, atol=1e-6)
    for key in s_full:
        torch.testing.assert_close(s_cut[key], s_full[key], rtol=1e-5, atol=1e-6)
    assert g_cut.keys() == g_full.keys()
    if method == "switch-kd":
        assert any(n.startswith("model.vision_tower.") for n in g_cut)  # through the switch
    for name in g_full:
        torch.testing.assert_close(g_cut[name], g_full[name], rtol=1e-4, atol=1e-6)


def test_progress_line_shows_the_clamp_shares():
    from edgekd.distill.callbacks import format_log

    line = format_log({"loss": 1.0, "k_t": 5.0, "k_at_min": 0.25, "k_at_max": 0.5})
    assert "k=min 25%" in line and "k=max 50%" in line


def test_a_shared_tower_teacher_is_checked_before_the_output_is_touched(
    job_factory, tmp_path, monkeypatch
):
    from edgekd.distill import run as run_module
    from edgekd.distill.run import run
    from edgekd.errors import EdgeKDError

    def too_late(*args, **kwargs):
        raise AssertionError("the models were loaded before the teacher's path was checked")

    monkeypatch.setattr(run_module, "load_models", too_late)
    job = job_factory(
        "sft",
        teacher=str(tmp_path / "no-such-teacher"),
        overrides={"training.vision_tower_init": "teacher"},
    )
    with pytest.raises(EdgeKDError, match="no-such-teacher"):
        run(job)
    assert not job.output.exists()
