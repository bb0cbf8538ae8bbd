"""``DistillTrainer``: transformers' ``Trainer`` with a frozen teacher and the Switch-KD objective.

Subclassing ``Trainer`` (as TRL's GKDTrainer does) keeps everything distributed standard:
launch with ``torchrun`` or ``accelerate launch`` and the student is wrapped by DDP, FSDP or
DeepSpeed ZeRO-3 as ``TrainingArguments`` say. The teacher is placed to match:

* none / DDP: moved to the device, frozen, never wrapped (it has nothing to synchronise);
* FSDP: sharded by ``accelerator.prepare_model(..., evaluation_mode=True)``;
* ZeRO-3: its own DeepSpeed engine with the trainer's ZeRO config minus the optimizer, so its
  parameters are partitioned like the student's (stage 3) or replicated (stages 0-2).

Phases of one step (:meth:`compute_loss`): student forward (its projector's input captured as
the vision features) -> teacher forward, both routes in one call -> the objective. Checkpoints
are written to a staging folder and renamed, so a ``checkpoint-N`` folder is always complete.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from edgekd.distill.objective import Objective
from edgekd.distill.switch import FeatureCapture, TeacherRoutes
from edgekd.errors import EdgeKDError
from edgekd.io import honour_umask, writing

STAGING = ".staging"


class DistillError(EdgeKDError, RuntimeError):
    """Training cannot go on (a non-finite loss, a bad dataset); the message says what to do."""


class DistillTrainer(Trainer):
    """Train a student VLM with ``objective``; the teacher (if any) stays frozen.

    Args:
        model: The student ``LlavaForConditionalGeneration`` (an optional ``vsd_adapter``
            submodule maps its vision features to the teacher's width).
        teacher_model: The teacher ``LlavaForConditionalGeneration``; None for sft.
        objective: The method and its loss settings.
        **kwargs: Passed to ``Trainer`` (args, train_dataset, data_collator, processing_class, ...).
    """

    def __init__(self, model, teacher_model=None, *, objective: Objective, **kwargs):
        super().__init__(model=model, **kwargs)
        # compute_loss returns a per-micro-batch mean: let Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        if objective.needs_teacher and teacher_model is None:
            raise DistillError(f"method '{objective.method}' needs a teacher; pass --teacher")
        self.capture = (
            FeatureCapture(model, getattr(model, "vsd_adapter", None))
            if objective.uses_switch
            else None
        )
        self.teacher = (
            self._place_teacher(teacher_model, getattr(model.config, "image_token_id", None))
            if objective.needs_teacher
            else None
        )
        self.resumable = True  # False: a failed run is discarded (it was replacing an old one)
        self._stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._tokens = 0
        self._clock = time.perf_counter()

    # ---- setup ----------------------------------------------------------------------------
    def _place_teacher(self, teacher_model, student_image_token_id: int | None) -> torch.nn.Module:
        # the teacher reads the student's input ids, its own image token in place of the student's
        routes = TeacherRoutes(teacher_model, input_image_token_id=student_image_token_id)
        if self.is_deepspeed_enabled:
            return _deepspeed_teacher(routes, self.accelerator)
        if self.is_fsdp_enabled:
            return self.accelerator.prepare_model(routes, evaluation_mode=True)
        return routes.to(self.args.device)

    # ---- the loss step --------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        pixels, has_image = inputs.get("pixel_values"), inputs.get("has_image")
        out = model(input_ids=ids, attention_mask=attn, pixel_values=pixels)
        features = self.capture.pop() if self.capture is not None else None
        teacher_logits = switch_logits = None
        if self.teacher is not None:
            t = self.teacher(ids, attn, pixels, has_image, features)
            teacher_logits, switch_logits = t.logits, t.switch_logits
        loss, stats = self.objective(
            out.logits, inputs["labels"], teacher_logits, switch_logits, has_image
        )
        self._stop_if_not_finite(loss)
        for key, value in stats.items():
            self._stats[key].append(value)
        self._tokens = self._tokens + attn.sum()  # a device tensor: read at log time
        return (loss, out) if return_outputs else loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        # the one device sync a step pays: a non-finite loss must stop at the step it appears
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.args.world_size > 1:  # every rank must stop together, or the others hang
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            step = self.state.global_step + 1
            if not self.resumable:
                raise DistillError(
                    f"the loss is not finite at step {step}; this run is discarded and the "
                    "output it was replacing is kept; lower the learning rate and run again"
                )
            last = (
                get_last_checkpoint(self.args.output_dir)
                if os.path.isdir(self.args.output_dir)
                else None
            )
            if last is None:
                raise DistillError(
                    f"the loss is not finite at step {step}, before the first checkpoint; "
                    "lower the learning rate and run again"
                )
            raise DistillError(
                f"the loss is not finite at step {step}; last good checkpoint: {last}; lower "
                "the learning rate and resume with --resume"
            )

    # ---- logging --------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:  # a training log: add the loss parts and throughput
            for key, values in self._stats.items():
                logs[key] = round(torch.stack(values).float().mean().item(), 4)
            tokens = torch.as_tensor(self._tokens, device=self.args.device).float().reshape(1)
            if self.args.world_size > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            now = time.perf_counter()
            logs["tokens_per_s"] = round(tokens.item() / max(now - self._clock, 1e-9), 1)
            self._stats.clear()
            self._tokens, self._clock = 0, now
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a staging folder, then rename it into place."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        name = f"checkpoint-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            with writing(staging):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            honour_umask(final)  # serializers write some files 0600
            shutil.rmtree(staging, ignore_errors=True)
            _rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _rotate(run_dir: str, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints (by step)."""
    if not limit:
        return
    steps = sorted(
        int(d.split("-")[1])
        for d in os.listdir(run_dir)
        if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
    )
    for step in steps[:-limit]:
        shutil.rmtree(os.path.join(run_dir, f"checkpoint-{step}"), ignore_errors=True)


def _deepspeed_teacher(routes: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A DeepSpeed inference engine for the teacher with the trainer's ZeRO settings."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}  # small teachers: replicate, no partitioning
    engine, *_ = deepspeed.initialize(model=routes, config=config)
    engine.eval()
    return engine
