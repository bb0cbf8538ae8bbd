"""Recipe profiles (``profiles/recipes/*.yaml``): how a student is distilled, the losses'
weights and DBiLD's settings. The method names and weights are checked against the method
registry. Cross-field checks collect every problem (:mod:`edgekd.profiles.schema_base`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgekd.distill import methods
from edgekd.distill.methods import logit_method
from edgekd.profiles.schema_base import (
    NAME,
    Block,
    Model,
    Problems,
    nested,
)

LogitLoss = Literal["dbild", "kd"]  # switch-kd's loss between logits (kd: an ablation)


class LossConfig(Block):
    """Loss weights and DBiLD settings (Switch-KD: w_ce*CE + w_align*L_Align + w_vsd*L_VSD).

    Weights 1/1/1, temperature 3 and top_n 256 are the defaults named in SWITCH_KD.md (the paper
    does not publish them). The T^2 scale, k_min 3 and leaving special tokens out of the
    distillation terms are edgekd's defaults: at T = 3 the unscaled DBiLD gradient is a tenth
    to a quarter of CE's, k = 2 gives a single pairwise difference whose softmax is 1 (a term
    that is exactly 0), and at the end-of-turn token the teacher is certain and the pairwise
    terms fit the order of irrelevant runner-up tokens (distilling it cost dbild 19 points on
    easy-vqa in the study of docs/results.md, a borderline interval on one task).
    """

    w_ce: float = Field(1.0, ge=0, description="Weight of cross-entropy on the answer tokens.")
    w_align: float = Field(
        1.0, ge=0, description="Weight of the student-vs-teacher logit loss (L_Align); not sft."
    )
    w_vsd: float = Field(
        1.0, ge=0, description="Weight of the visual-switch loss L_VSD; switch-kd only (else 0)."
    )
    temperature: float = Field(3.0, gt=0, description="Logit temperature of the distillation loss.")
    t2_scale: bool = Field(
        True,
        description="Multiply the softened logit losses (bild, dbild, switch-kd) by T^2, which "
        "keeps their gradient of the order of CE's (Hinton et al. 2015); kd/rkl run at T = 1.",
    )
    top_n: int = Field(256, ge=2, description="Kneedle search window: the top-N sorted logits.")
    k_min: int = Field(
        3,
        ge=2,
        description="Smallest dynamic k; at least 3 for dbild and switch-kd (k = 2 is one pair, "
        "whose softmax is 1).",
    )
    k_max: int = Field(64, ge=2, description="Largest dynamic k; at most top_n.")
    distill_special_tokens: bool = Field(
        False,
        description="Distil at positions whose target is a special token (end-of-turn, EOS); "
        "CE covers them either way.",
    )
    logit_loss: LogitLoss = Field(
        "dbild",
        description="switch-kd's loss between logits for L_Align and L_VSD: dbild (the paper) "
        "or kd (forward KL at T = 1, an ablation).",
    )
    chunk_size: int = Field(
        256,
        ge=1,
        description="Supervised positions per chunk of the distillation losses; bounds their "
        "fp32 temporaries to a few (chunk_size, vocabulary) tensors. Changes memory, not values.",
    )

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.k_max < self.k_min:
            out.append(("k_max", f"must be >= k_min ({self.k_min}), got {self.k_max}"))
        if self.k_max > self.top_n:
            out.append(("k_max", f"must be <= top_n ({self.top_n}), got {self.k_max}"))
        return out


class TrainingConfig(Model):
    """Optimisation settings; batch sizes are in samples."""

    global_batch_size: int = Field(ge=1, description="Samples per optimizer step, all processes.")
    per_device_batch_size: int = Field(ge=1, description="Samples per forward pass on one process.")
    gradient_accumulation_steps: int | None = Field(
        None,
        ge=1,
        description="Derived when absent: global / (per_device x distributed.num_processes).",
    )
    learning_rate: float = Field(gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides num_epochs.")
    max_length: int = Field(ge=1, description="Tokens per sample (image tokens included).")
    bf16: bool = Field(False, description="Train in bfloat16 autocast (GPUs with bf16 support).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, ge=0, description="Seed for data order and initialisation.")
    train_vision_tower: bool | None = Field(
        None, description="Train the student's vision tower; default true for switch-kd only."
    )
    train_language_model: bool = Field(
        True,
        description="Train the student's language model (embeddings and head included); false "
        "trains only the projector (and the vision tower if train_vision_tower): LLaVA's first "
        "stage for a freshly assembled model.",
    )
    vision_tower_init: Literal["student", "teacher"] = Field(
        "student",
        description="Where the student's vision tower starts: its own weights, or a copy of the "
        "teacher's (same tower shape; both start from one pretrained SigLIP in the paper).",
    )


class DistributedConfig(Model):
    """How training is spread over processes (launched with accelerate)."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed-zero3"] = Field(
        "none", description="Data parallelism across processes."
    )
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) the batches are planned for.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file, relative to the recipe's folder."
    )


class DataConfig(Model):
    """Training data."""

    dataset: str = Field(min_length=1, description="'easy-vqa', 'fashion-grid' or a dataset path.")
    image_root: str | None = Field(
        None, description="Folder that the dataset's image paths are relative to."
    )


class RecipeProfile(Model):
    """A distillation setting: which models, which loss, how to train."""

    name: str = Field(pattern=NAME, description="Profile name; equals the YAML file's stem.")
    description: str = Field(min_length=1, description="One line: what the recipe does.")
    teacher: str | None = Field(
        None, description="Hub id, local path or tiny model ('tiny:small'); not needed for sft."
    )
    student: str = Field(min_length=1, description="Hub id, local path or tiny model 'tiny:tiny'.")
    method: str = Field(description="Training objective (a registered method).")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss weights and settings.")
    training: TrainingConfig = Field(description="Optimisation settings.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Processes and parallelism."
    )
    data: DataConfig = Field(description="Training data.")
    notes: str = Field("", description="Sources and caveats.")

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        methods.get(method)  # ValueError: unknown, listing the valid ones
        return method

    @model_validator(mode="after")
    def _check(self) -> RecipeProfile:
        problems = nested("loss", self.loss) + self._method_problems() + self._batch_problems()
        if problems:
            raise Problems(problems)
        return self

    @property
    def reads_teacher(self) -> bool:
        """The run loads the teacher: to distil from it, or (sft) to copy its vision tower."""
        teacher_logits = methods.get(self.method).reads_teacher_logits
        return teacher_logits or self.training.vision_tower_init == "teacher"

    def _method_problems(self) -> list[tuple[str, str]]:
        """Resolve method-dependent defaults; report settings the method would silently ignore."""
        out = []
        loss, method, train = self.loss, self.method, self.training
        spec = methods.get(method)
        if spec.reads_teacher_logits and not self.teacher:
            out.append(("teacher", f"required for method '{method}'"))
        elif train.vision_tower_init == "teacher" and not self.teacher:
            out.append(("teacher", "required by training.vision_tower_init 'teacher'"))
        if not spec.switch and loss.logit_loss != "dbild":
            out.append(("loss.logit_loss", f"switch-kd only; method '{method}' has its own loss"))
        compared = methods.get(logit_method(method, loss.logit_loss))
        out += compared.problems(loss) if compared.problems else []
        for key in spec.unused_weights:
            if key in loss.model_fields_set and getattr(loss, key) > 0:
                out.append((f"loss.{key}", f"method '{method}' does not use it; set 0"))
            setattr(loss, key, 0.0)
        if loss.w_ce + loss.w_align + loss.w_vsd == 0:
            out.append(("loss", "all loss weights are 0: nothing to train"))
        if train.train_vision_tower is None:
            train.train_vision_tower = spec.switch
        elif spec.switch and not train.train_vision_tower:
            out.append(
                (
                    "training.train_vision_tower",
                    "switch-kd updates the student vision tower "
                    "through the visual switch; set true",
                )
            )
        return out

    def _batch_problems(self) -> list[tuple[str, str]]:
        """Check the batch arithmetic and derive gradient_accumulation_steps when absent."""
        train, dist = self.training, self.distributed
        if dist.strategy == "none" and dist.num_processes > 1:
            return [
                (
                    "distributed.num_processes",
                    f"strategy 'none' runs 1 process, got "
                    f"{dist.num_processes}; choose ddp, fsdp or deepspeed-zero3",
                )
            ]
        micro = train.per_device_batch_size * dist.num_processes
        formula = (
            f"per_device_batch_size x num_processes = "
            f"{train.per_device_batch_size} x {dist.num_processes}"
        )
        if train.global_batch_size % micro:
            return [
                (
                    "training.global_batch_size",
                    f"must be a multiple of {formula} = {micro}, got {train.global_batch_size}",
                )
            ]
        derived = train.global_batch_size // micro
        if train.gradient_accumulation_steps is None:
            train.gradient_accumulation_steps = derived
        elif train.gradient_accumulation_steps != derived:
            return [
                (
                    "training.gradient_accumulation_steps",
                    f"global_batch_size / ({formula}) = "
                    f"{derived}, got {train.gradient_accumulation_steps}; remove it to derive it",
                )
            ]
        return []
