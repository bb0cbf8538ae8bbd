"""The teacher-student pair of a distillation run: loaded, checked for compatibility (vocabulary,
image preprocessing), and the student's vision tower started from the teacher's on request."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from edgekd.distill import methods
from edgekd.distill.setup import DistillJob, resolve_dataset
from edgekd.errors import ModelError
from edgekd.models import VLM, build_vlm, check_compatible
from edgekd.models.factory import corpus_texts
from edgekd.models.tokenizer import train_tokenizer


def load_models(recipe, job: DistillJob, device: str):
    """Teacher (None for sft) and student as ``VLM``s, checked for compatibility."""
    dtype = "bfloat16" if recipe.training.bf16 and device == "cuda" else "float32"
    teacher = None
    shared_tower = recipe.training.vision_tower_init == "teacher"
    teacher_logits = methods.get(recipe.method).reads_teacher_logits
    if recipe.reads_teacher:
        if recipe.teacher.startswith("tiny:"):
            raise ModelError(
                f"teacher '{recipe.teacher}' would be an untrained model; train a "
                "teacher with --method sft first and pass its directory as --teacher"
            )
        teacher = VLM.from_pretrained(
            recipe.teacher, dtype=dtype, device=device, trust_remote_code=job.trust_remote_code
        )
    student = _load_student(recipe, job, teacher, device)
    if teacher is not None:
        if teacher_logits:  # sft reads the teacher's tower, not its text side
            check_compatible(teacher, student)
        check_same_preprocessing(teacher, student)
    if shared_tower:
        share_vision_tower(teacher, student)
    if not teacher_logits:
        teacher = None  # read for its vision tower only
    return teacher, student


def share_vision_tower(teacher, student) -> None:
    """Start the student's vision tower as a copy of the teacher's (``vision_tower_init``).

    In the paper both models start from one pretrained SigLIP, so the visual switch begins with
    student features the teacher's projector was trained on. Under ZeRO-3 the partitioned
    parameters are gathered for the copy.

    Raises:
        ModelError: the towers differ in a parameter's name or shape (both are named).
    """
    src = dict(teacher.vision_tower.named_parameters())
    dst = dict(student.vision_tower.named_parameters())

    def shape(p: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape apart

    for name in sorted(set(src) | set(dst)):
        s_shape = shape(dst[name]) if name in dst else "absent"
        t_shape = shape(src[name]) if name in src else "absent"
        if s_shape != t_shape:
            raise ModelError(
                f"--vision-tower-init teacher: student vision tower parameter '{name}' is "
                f"{s_shape}, the teacher's is {t_shape}; it needs the same tower shape (use "
                "--vision-tower-init student to keep the student's own tower)"
            )
    gathered = nullcontext()
    if any(hasattr(p, "ds_tensor") for p in (*src.values(), *dst.values())):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(
            [*src.values(), *dst.values()], modifier_rank=0
        )
    with gathered, torch.no_grad():
        for name, param in dst.items():
            param.copy_(src[name].to(param.dtype))


def _load_student(recipe, job: DistillJob, teacher, device: str):
    spec = recipe.student
    if not spec.startswith("tiny:"):
        return VLM.from_pretrained(
            spec, dtype="float32", device=device, trust_remote_code=job.trust_remote_code
        )
    tokenizer = (
        teacher.tokenizer
        if teacher is not None
        else train_tokenizer(corpus_texts(resolve_dataset(recipe.data.dataset)))
    )
    vlm = build_vlm(spec.split(":", 1)[1], tokenizer=tokenizer, seed=recipe.training.seed)
    vlm.model.to(device)
    return vlm


def check_same_preprocessing(teacher, student) -> None:
    """Both models see the same pixels, so their image preprocessing must agree."""
    t_ip, s_ip = teacher.processor.image_processor, student.processor.image_processor
    t_steps, s_steps = preprocessing_steps(t_ip), preprocessing_steps(s_ip)
    for key, tv in t_steps.items():
        sv = s_steps[key]
        if tv != sv:
            raise ModelError(
                f"teacher image preprocessing {key}={tv} != student {key}={sv}; "
                "the visual switch needs both models to see the same pixels"
            )


def preprocessing_steps(image_processor) -> dict[str, Any]:
    """What decides an image processor's pixels, whatever its class (absent steps are off)."""
    steps = {
        key: getattr(image_processor, key, None)
        for key in ("size", "image_mean", "image_std", "rescale_factor", "resample")
    }
    steps["do_pad"] = bool(getattr(image_processor, "do_pad", False))  # pad to a square first
    crop = bool(getattr(image_processor, "do_center_crop", False))
    steps["crop_size"] = getattr(image_processor, "crop_size", None) if crop else None
    return steps
