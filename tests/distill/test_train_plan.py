"""``edgekd plan --train``: the activation counts match autograd, the arithmetic holds together."""

from __future__ import annotations

import copy

import pytest
import torch
from distill_helpers import saved_for_backward

from edgekd.errors import ModelError
from edgekd.plan.training import (
    GB,
    TrainSetup,
    decoder_layer_values,
    model_shape,
    plan_train,
    vision_layer_values,
)

TEACHER, STUDENT = "qwen2.5-3b-siglip-so400m", "qwen2-0.5b-siglip-so400m"


def _per_layer(config, make_input, layers_attr="num_hidden_layers") -> int:
    """Saved values of a 2-layer model minus a 1-layer one (real CPU tensors, SDPA)."""
    from transformers import AutoModel

    counts = []
    for n in (1, 2):
        cfg = copy.deepcopy(config)
        setattr(cfg, layers_attr, n)
        model = AutoModel.from_config(cfg, attn_implementation="sdpa").train()
        saved = saved_for_backward(model, lambda m=model, c=cfg: m(**make_input(c)))
        counts.append(sum(t.numel() for t in saved))
    return counts[1] - counts[0]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_layer_activation_counts_match_autograd(tokenizer, preset):
    from edgekd.models import build_vlm

    vlm = build_vlm(preset, tokenizer=tokenizer, seed=0)
    shape = model_shape(vlm)
    tokens = 48
    text = vlm.config.text_config
    got = _per_layer(
        text, lambda c: {"inputs_embeds": torch.randn(1, tokens, c.hidden_size, requires_grad=True)}
    )
    assert got == tokens * decoder_layer_values(shape)
    vision = vlm.config.vision_config
    size = vision.image_size
    got = _per_layer(vision, lambda c: {"pixel_values": torch.randn(1, 3, size, size)})
    assert got == shape.vision_tokens * vision_layer_values(shape)


def test_sharding_divides_state_and_checkpointing_cuts_activations():
    ddp = plan_train(TEACHER, STUDENT, "h100-80gb", TrainSetup("ddp", 8, 4, 2048))
    zero3 = plan_train(TEACHER, STUDENT, "h100-80gb", TrainSetup("deepspeed-zero3", 8, 4, 2048))
    assert zero3.parts["teacher weights"] == pytest.approx(ddp.parts["teacher weights"] / 8)
    assert zero3.parts["optimizer state"] < ddp.parts["optimizer state"] / 4
    assert ddp.parts["DDP buckets"] == pytest.approx(ddp.parts["student gradients"])
    assert zero3.parts["DDP buckets"] == 0 and zero3.parts["gathered layers"] > 0
    assert zero3.peak_bytes < ddp.peak_bytes
    off = plan_train(
        TEACHER, STUDENT, "h100-80gb",
        TrainSetup("deepspeed-zero3", 8, 4, 2048, gradient_checkpointing=False),
    )  # fmt: skip
    for part in ("student activations", "switch-route activations"):
        assert off.parts[part] > 5 * zero3.parts[part]
    # both routes and the student: the switch route (forward + backward to its inputs) costs most
    assert set(zero3.step_flops) == {"student", "teacher route", "switch route"}
    assert zero3.step_flops["switch route"] > zero3.step_flops["teacher route"]
    assert 0 < zero3.step_seconds < 10


def test_fit_verdict_names_the_gap():
    plan = plan_train(TEACHER, STUDENT, "jetson-orin-nano-8gb", TrainSetup("none", 1, 4, 2048))
    assert not plan.fits and plan.verdict.startswith("does not fit by ")
    assert plan.peak_bytes - plan.usable_bytes == pytest.approx(-plan.margin_gb * GB)
    sft = plan_train(None, STUDENT, "h100-80gb", TrainSetup(method="sft"))
    assert sft.parts["teacher weights"] == 0 and sft.parts["switch-route activations"] == 0
    assert sft.teacher == "-" and set(sft.step_flops) == {"student"}


def test_bad_setups_are_refused_at_once():
    with pytest.raises(ModelError, match="strategy 'zero9'.*precision 'fp8'.*batch must be"):
        TrainSetup("zero9", precision="fp8", batch=0)
    with pytest.raises(ModelError, match="needs a teacher"):
        plan_train(None, STUDENT, "h100-80gb", TrainSetup())


def test_cli_plans_a_training_run(cli):
    result = cli(
        "plan", "--train", "--profile", "h100-80gb", "--teacher", TEACHER, "--student", STUDENT
    )
    assert result.code == 0, result.err
    out = " ".join(result.out.split())
    for fragment in ("deepspeed-zero3", "8 x h100-80gb", "optimizer state", "peak", "fits,",
                     "step roofline"):  # fmt: skip
        assert fragment in out
    cli("plan", "--train", "--profile", "h100-80gb").one_line_error("placeholder", "--teacher")
    cli("plan", "--profile", "h100-80gb").one_line_error("--model is needed")
    cli(
        "plan", "--train", "--profile", "h100-80gb", "--teacher", TEACHER, "--student", STUDENT,
        "--strategy", "zero9",
    ).one_line_error("strategy 'zero9' is unknown")  # fmt: skip


def test_cli_refuses_the_other_plans_options(cli):
    cli("plan", "--profile", "h100-80gb", "--model", STUDENT, "--gpus", "8").one_line_error(
        "--gpus only applies to a training plan: add --train"
    )
    cli(
        "plan", "--train", "--profile", "h100-80gb", "--teacher", TEACHER, "--student", STUDENT,
        "--context", "4096", "--power-mode", "MAXN",
    ).one_line_error("--context, --power-mode only apply to an inference plan")  # fmt: skip


def test_tensor_memory_sees_allocations_and_phases():
    from edgekd.plan.memory import TensorMemory

    with TensorMemory("cpu") as mem:
        with mem.phase("big"):
            big = torch.empty(4_000_000, dtype=torch.uint8)
            del big
        with mem.phase("small"):
            small = torch.empty(1_000_000, dtype=torch.uint8)
    assert mem.peak_bytes >= 4_000_000
    assert mem.phases["big"] >= 4_000_000
    assert 1_000_000 <= mem.phases["small"] < 4_000_000
    assert mem.end_bytes >= 1_000_000
    del small


def test_setup_from_recipe_follows_what_distill_runs():
    from edgekd.plan.training import setup_from_recipe
    from edgekd.profiles import load_device_profile, load_recipe

    gpu, cpu = load_device_profile("h100-80gb"), load_device_profile("cpu-x86_64")
    paper = load_recipe("tinyllava-3b-to-0.5b")
    setup = setup_from_recipe(paper, gpu)
    assert (setup.strategy, setup.processes, setup.batch, setup.seq_len) == (
        "deepspeed-zero3", 8, 4, 2048,
    )  # fmt: skip
    assert setup.gradient_accumulation_steps == 4 and setup.precision == "bf16-mixed"
    assert setup_from_recipe(paper, gpu, processes=16).gradient_accumulation_steps == 2
    assert setup_from_recipe(paper, cpu).precision == "fp32"  # distill trains fp32 on CPU
    demo = load_recipe("easyvqa-cpu")
    assert setup_from_recipe(demo, cpu, processes=2).strategy == "ddp"  # as under a launcher
    no_vsd = load_recipe("easyvqa-cpu", overrides={"loss.w_vsd": 0.0})
    assert setup_from_recipe(no_vsd, cpu).method == "dbild"
    with pytest.raises(ModelError, match="batch must be at least 1"):
        setup_from_recipe(paper, gpu, batch=0)  # a zero is not replaced by the recipe's value


def test_clip_and_llama_activation_counts_match_autograd():
    """A family the presets do not use: CLIP (class token, quick_gelu) with a Llama decoder."""
    from distill_helpers import clip_llama_vlm

    vlm, vision, text = clip_llama_vlm()
    shape = model_shape(vlm)
    assert shape.vision_tokens == 16 + 1  # patches and the class token
    tokens = 48
    got = _per_layer(
        text, lambda c: {"inputs_embeds": torch.randn(1, tokens, c.hidden_size, requires_grad=True)}
    )
    assert got == tokens * decoder_layer_values(shape)
    size = vision.image_size
    got = _per_layer(vision, lambda c: {"pixel_values": torch.randn(1, 3, size, size)})
    assert got == shape.vision_tokens * vision_layer_values(shape)


def test_a_projector_only_stage_plans_gradients_for_the_projector_alone():
    """LLaVA's stage 1 (``training.train_language_model: false``, tower frozen): gradients and
    AdamW state for the projector only, activations kept (the gradient still passes through
    the language model), one forward fewer through it."""
    from edgekd.plan.inference import meta_vlm
    from edgekd.plan.training import setup_from_recipe
    from edgekd.profiles import load_device_profile, load_recipe

    projector = sum(p.numel() for p in meta_vlm(STUDENT).projector.parameters())
    full = TrainSetup(method="sft", train_vision_tower=False)
    stage1 = TrainSetup(method="sft", train_vision_tower=False, train_language_model=False)
    a = plan_train(None, STUDENT, "h100-80gb", full)
    b = plan_train(None, STUDENT, "h100-80gb", stage1)
    assert b.parts["student gradients"] == projector * 4  # bf16-mixed: fp32 gradients
    assert b.parts["optimizer state"] == projector * 8
    assert a.parts["student gradients"] > 100 * b.parts["student gradients"]
    assert b.parts["student activations"] == a.parts["student activations"]
    assert b.step_flops["student"] < a.step_flops["student"]
    recipe = load_recipe("easyvqa-cpu", overrides={"training.train_language_model": False})
    assert not setup_from_recipe(recipe, load_device_profile("cpu-x86_64")).train_language_model
