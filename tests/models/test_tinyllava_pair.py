"""The published TinyLLaVA pair, converted and distilled: a Qwen2.5 teacher (22 added tokens, bf16
shards) and a Qwen2 student (3 added tokens, fp16 single file) share the text vocabulary, but
their converted ``<image>`` tokens land at different ids (BASE + 22 and BASE + 3, where the
teacher has ``<|object_ref_start|>`` at BASE + 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from llava_samples import COLOURS, image_sample, text_sample, write_samples
from PIL import Image
from tinyllava_replica import write_tinyllava

from edgekd.data import LlavaCollator, LlavaDataset
from edgekd.errors import ModelError
from edgekd.models import VLM, check_compatible
from edgekd.models.tinyllava import convert_tinyllava


def write_data(root: Path, n: int = 8) -> Path:
    """``n`` colour questions about squares on non-square canvases, plus two text-only ones."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    samples = []
    colours = COLOURS
    for i in range(n):
        name = list(colours)[i % 3]
        pixels = np.full((40, 56, 3), 255, np.uint8)
        x, y = rng.integers(0, 20, size=2)
        pixels[y : y + 16, x : x + 16] = colours[name]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(image_sample(f"s{i}", f"images/{i}.png", "What color is the shape?", name))
    for i in range(2):
        samples.append(text_sample(f"t{i}", "Is red a color?", "yes"))
    return write_samples(root / "train.json", samples)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pair")
    teacher = write_tinyllava(
        root / "teacher-src", family="qwen2.5", dtype=torch.bfloat16, layout="sharded", hidden=64
    )
    write_tinyllava(root / "student-src", family="qwen2", dtype=torch.float16, seed=1)
    convert_tinyllava(root / "teacher-src", root / "teacher", dtype="auto")
    convert_tinyllava(root / "student-src", root / "student")
    return {"root": root, "base": teacher["base"], "data": write_data(root / "data")}


def test_converted_pair_has_different_image_tokens_and_is_compatible(pair):
    teacher = VLM.from_pretrained(pair["root"] / "teacher")
    student = VLM.from_pretrained(pair["root"] / "student")
    base = pair["base"]
    assert (teacher.image_token_id, student.image_token_id) == (base + 22, base + 3)
    assert teacher.tokenizer.convert_ids_to_tokens(base + 3) == "<|object_ref_start|>"
    assert teacher.vocab_size == student.vocab_size == base + 64
    check_compatible(teacher, student)  # no error: the text vocabularies agree


def _batch(vlm: VLM, data: Path) -> dict:
    ds = LlavaDataset(data, data.parent, vlm.processor, 256)
    return LlavaCollator(vlm.tokenizer.pad_token_id)([ds[i] for i in (0, 1, 8)])


def test_teacher_reads_the_students_ids_as_its_own(pair):
    from edgekd.distill.switch import TeacherRoutes

    teacher = VLM.from_pretrained(pair["root"] / "teacher")
    student = VLM.from_pretrained(pair["root"] / "student")
    s_batch, t_batch = _batch(student, pair["data"]), _batch(teacher, pair["data"])
    # each model's processor builds its own ids: the same text ids, the image slots aligned
    own = teacher.own_ids(s_batch["input_ids"], student.image_token_id)
    assert torch.equal(own, t_batch["input_ids"])
    assert torch.equal(s_batch["labels"], t_batch["labels"])
    assert torch.equal(s_batch["pixel_values"], t_batch["pixel_values"])

    routes = TeacherRoutes(teacher.model, input_image_token_id=student.image_token_id)
    args = (s_batch["input_ids"], s_batch["attention_mask"], s_batch["pixel_values"])
    with torch.no_grad():
        out = routes(*args, s_batch["has_image"])
        reference = teacher.model(
            input_ids=t_batch["input_ids"],
            attention_mask=t_batch["attention_mask"],
            pixel_values=t_batch["pixel_values"],
        ).logits
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-6)
    with pytest.raises(ModelError, match="image tokens but the images give"):
        TeacherRoutes(teacher.model)(*args, s_batch["has_image"])  # untranslated: misaligned


def test_switch_kd_steps_between_the_published_pair(pair, tmp_path):
    from safetensors.torch import load_file

    from edgekd.distill.run import DistillJob, run

    job = DistillJob(
        output=tmp_path / "run",
        recipe="easyvqa-cpu",
        method="switch-kd",
        teacher=str(pair["root"] / "teacher"),
        student=str(pair["root"] / "student"),
        data=pair["data"],
        overrides={
            "training.max_steps": 3,
            "training.global_batch_size": 4,
            "training.per_device_batch_size": 4,
            "training.max_length": 256,
            "training.learning_rate": 1e-3,
            "loss.top_n": 32,
            "loss.k_max": 8,
        },
        logging_steps=1,
        save_steps=10,
        device="cpu",
    )
    summary = run(job)
    assert summary["global_step"] == 3
    steps = [h for h in json.loads((job.output / "training_log.json").read_text())["log_history"]]
    steps = [h for h in steps if "loss" in h]
    assert len(steps) == 3 and all(np.isfinite(h["loss"]) for h in steps)
    assert all(h["vsd"] > 0 and h["align"] > 0 for h in steps)
    before = load_file(pair["root"] / "student" / "model.safetensors")
    after = load_file(job.output / "model" / "model.safetensors")
    tower = [k for k in before if "vision_tower." in k]
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in tower)
    distilled = VLM.from_pretrained(job.output / "model")
    assert distilled.image_token_id == pair["base"] + 3  # the student keeps its own ids


def test_reverse_pair_names_the_colliding_token_and_both_ids(pair):
    teacher = VLM.from_pretrained(pair["root"] / "student")  # Qwen2: <image> at BASE + 3
    student = VLM.from_pretrained(pair["root"] / "teacher")  # Qwen2.5: a text token there
    base = pair["base"]
    with pytest.raises(
        ModelError,
        match=rf"student token '<\|object_ref_start\|>' \(id {base + 3}\) is the teacher's image "
        rf"token \(teacher image token id {base + 3} != student image token id {base + 22}\)",
    ) as e:
        check_compatible(teacher, student)
    assert "\n" not in str(e.value)


def test_other_text_vocabulary_or_visual_tokens_refused_with_both_values(pair, tmp_path):
    write_tinyllava(
        tmp_path / "src",
        image_size=64,
        corpus=["Completely different words train another vocabulary entirely."] * 4,
    )
    convert_tinyllava(tmp_path / "src", tmp_path / "other")
    teacher = VLM.from_pretrained(pair["root"] / "teacher")
    other = VLM.from_pretrained(tmp_path / "other")
    with pytest.raises(ModelError) as e:
        check_compatible(teacher, other)
    message = str(e.value)
    assert "text vocabularies differ in" in message
    assert "for the student," in message and "for the teacher" in message
    assert "teacher visual tokens per image 15 != student visual tokens per image 63" in message


def test_padded_and_unpadded_preprocessing_refused_for_the_switch(pair, tmp_path):
    from edgekd.distill.pair import check_same_preprocessing

    write_tinyllava(tmp_path / "src", family="qwen2.5", aspect="pad")
    convert_tinyllava(tmp_path / "src", tmp_path / "padded")
    padded = VLM.from_pretrained(tmp_path / "padded")
    student = VLM.from_pretrained(pair["root"] / "student")
    with pytest.raises(ModelError, match="teacher image preprocessing do_pad=True != student"):
        check_same_preprocessing(padded, student)
    check_same_preprocessing(VLM.from_pretrained(pair["root"] / "teacher"), student)
