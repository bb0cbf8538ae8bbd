"""Typed schemas of edgekd profiles: device profiles (hardware) and recipe profiles (distillation).

Profiles are data (``profiles/devices/*.yaml``, ``profiles/recipes/*.yaml``); these pydantic models
are their only definition. Single fields are checked by pydantic constraints. Cross-field checks
collect every problem they find and raise them together as :class:`Problems`, each with the key
path the user would edit, so that the loader can report all of them in one line.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgekd import targets
from edgekd.distill import methods
from edgekd.distill.methods import logit_method
from edgekd.errors import EdgeKDError

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
LogitLoss = Literal["dbild", "kd"]  # switch-kd's loss between logits (kd: an ablation)

_NAME = r"^[a-z0-9][a-z0-9._-]*$"
_RELEASE = r"^\d+(\.(\d+|x))*$"
_Positive = Annotated[float, Field(gt=0)]
_Peaks = dict[Precision, _Positive]


class ProfileError(EdgeKDError, ValueError):
    """A profile is unknown, unreadable or invalid; the message is one line naming file and keys."""


class Problems(ValueError):
    """Cross-field problems found by a validator, as (key path relative to the model, message)."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        super().__init__("; ".join(f"{key}: {msg}" if key else msg for key, msg in items))


# Validation context key set by the loader: blocks leave their cross-field checks to the profile,
# which then reports the problems of all blocks and its own in one go.
CHECKS_BY_PROFILE = "edgekd_checks_by_profile"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Block(_Model):
    """A profile block with cross-field checks of its own."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems as (key relative to the block, message); empty when consistent."""
        return []

    @model_validator(mode="after")
    def _check_block(self, info: ValidationInfo) -> _Block:
        if not (info.context or {}).get(CHECKS_BY_PROFILE) and (problems := self.problems()):
            raise Problems(problems)
        return self


def _nested(key: str, block: _Block | None) -> list[tuple[str, str]]:
    return [(f"{key}.{sub}", msg) for sub, msg in block.problems()] if block is not None else []


# ---------------------------------------------------------------------------------------------
# Device profiles
# ---------------------------------------------------------------------------------------------


class PowerMode(_Model):
    """One nvpmodel power mode; figures left out are the profile's own."""

    name: str = Field(min_length=1, description="Mode name as `nvpmodel -q` prints it, e.g. '15W'.")
    watts: float = Field(
        gt=0,
        description="Module power budget in W; for uncapped MAXN modes, the highest budget the "
        "data sheet gives (see notes).",
    )
    id: int | None = Field(
        None,
        ge=0,
        description="nvpmodel id (`nvpmodel -m ID`). Ids differ between boards and JetPack "
        "releases: look a mode up by name first.",
    )
    memory_bandwidth_gbps: float | None = Field(
        None, gt=0, description="Peak memory bandwidth in this mode (GB/s), if not the profile's."
    )
    peak_tflops: _Peaks | None = Field(
        None, description="Dense peak TFLOP/s (TOPS for int8) in this mode, if not the profile's."
    )
    notes: str = Field("", description="Where the mode's figures come from, caveats.")


class JetsonInfo(_Model):
    """How to recognise the board and which software line the profile was written for."""

    module: str = Field(
        min_length=1,
        description="Substring of /proc/device-tree/model naming the module, "
        "e.g. 'NVIDIA Jetson Orin Nano'.",
    )
    jetpack: str = Field(pattern=_RELEASE, description="JetPack release line, e.g. '6.x' or '6.2'.")
    l4t: str = Field(
        pattern=_RELEASE,
        description="Jetson Linux release line (/etc/nv_tegra_release), e.g. '36.x'.",
    )


class TensorRTSettings(_Block):
    """Engine-build settings; the exporter derives TensorRT optimisation profiles from them.

    Prefill shapes run from 1 to ``max_seq_len`` tokens, tuned for ``opt_seq_len`` (a TinyLLaVA
    prompt is ~730 image tokens plus the text); decode steps see 1 to ``max_past_len`` past tokens.
    """

    workspace_gb: float = Field(gt=0, description="Builder workspace limit in GB (tactic memory).")
    max_batch: int = Field(ge=1, description="Largest batch size the engine accepts.")
    opt_seq_len: int = Field(ge=1, description="Prefill length the kernels are tuned for.")
    max_seq_len: int = Field(ge=1, description="Longest prefill (prompt + image tokens).")
    max_past_len: int = Field(ge=1, description="Longest KV cache (past tokens) while decoding.")

    def problems(self) -> list[tuple[str, str]]:
        if self.opt_seq_len > self.max_seq_len:
            limit = f"max_seq_len ({self.max_seq_len})"
            return [("opt_seq_len", f"must be <= {limit}, got {self.opt_seq_len}")]
        return []


class DeviceProfile(_Model):
    """A device edgekd exports to and benchmarks on.

    ``memory_bandwidth_gbps`` and ``peak_tflops`` are the figures in ``default_power_mode``; a power
    mode may override them. Peaks are dense (no structured sparsity), from vendor data sheets.
    """

    name: str = Field(pattern=_NAME, description="Profile name; equals the YAML file's stem.")
    description: str = Field(min_length=1, description="One line: what the device is.")
    kind: Literal["jetson", "gpu", "cpu"] = Field(description="Device family.")
    arch: Literal["aarch64", "x86_64"] = Field(description="CPU architecture of the host.")
    memory_gb: float = Field(gt=0, description="Memory a model can use, in GB (physical capacity).")
    unified_memory: bool = Field(
        False, description="True when CPU and GPU share one DRAM (Jetson): memory_gb is shared."
    )
    memory_bandwidth_gbps: float = Field(gt=0, description="Peak DRAM bandwidth in GB/s.")
    peak_tflops: _Peaks = Field(
        default_factory=dict,
        description="Dense peak per precision: TFLOP/s for floats, TOPS for int8.",
    )
    supported_precisions: list[Precision] = Field(
        min_length=1, description="Precisions edgekd may export for this device."
    )
    preferred_precision: Precision = Field(description="Precision used when none is asked for.")
    preferred_target: str = Field(
        description="Export target used when none is asked for (a registered target)."
    )
    power_modes: list[PowerMode] = Field(
        default_factory=list, description="nvpmodel modes (Jetson); empty for other devices."
    )
    default_power_mode: str | None = Field(
        None, description="Mode the profile's figures describe; names one of power_modes."
    )
    jetson: JetsonInfo | None = Field(None, description="Required iff kind is 'jetson'.")
    tensorrt: TensorRTSettings | None = Field(None, description="TensorRT engine-build settings.")
    notes: str = Field("", description="Sources, derived figures and caveats.")

    @model_validator(mode="after")
    def _check(self) -> DeviceProfile:
        problems = self._kind_problems() + self._precision_problems() + self._power_mode_problems()
        problems += _nested("tensorrt", self.tensorrt)
        if problems:
            raise Problems(problems)
        return self

    def _kind_problems(self) -> list[tuple[str, str]]:
        out = []
        jetson = self.kind == "jetson"
        if jetson and self.jetson is None:
            out.append(("jetson", "required when kind is 'jetson' (module, jetpack, l4t)"))
        if not jetson and self.jetson is not None:
            out.append(("jetson", f"only allowed when kind is 'jetson', got kind '{self.kind}'"))
        if jetson and self.arch != "aarch64":
            out.append(("arch", f"Jetson boards are 'aarch64', got '{self.arch}'"))
        if jetson and not self.unified_memory:
            out.append(("unified_memory", "must be true for Jetson (CPU and GPU share one DRAM)"))
        out += _target_problems(self.kind, self.preferred_target)
        if self.kind == "cpu" and self.tensorrt is not None:
            out.append(("tensorrt", "only for kind 'jetson' or 'gpu'"))
        if self.tensorrt is not None and self.tensorrt.workspace_gb >= self.memory_gb:
            out.append(
                (
                    "tensorrt.workspace_gb",
                    f"must be < memory_gb ({self.memory_gb:g}), got {self.tensorrt.workspace_gb:g}",
                )
            )
        return out

    def _precision_problems(self) -> list[tuple[str, str]]:
        supported = self.supported_precisions
        unsupported = f"is not in supported_precisions ({', '.join(dict.fromkeys(supported))})"
        twice = [p for p in PRECISIONS if supported.count(p) > 1]
        out = [("supported_precisions", f"lists '{p}' twice") for p in twice]
        if self.preferred_precision not in supported:
            out.append(("preferred_precision", f"'{self.preferred_precision}' {unsupported}"))
        tables = [("peak_tflops", self.peak_tflops)]
        for i, mode in enumerate(self.power_modes):
            tables.append((f"power_modes.{i}.peak_tflops", mode.peak_tflops or {}))
        for key, table in tables:
            out += [(f"{key}.{p}", f"'{p}' {unsupported}") for p in table if p not in supported]
        return out

    def _power_mode_problems(self) -> list[tuple[str, str]]:
        names = [m.name for m in self.power_modes]
        ids = [m.id for m in self.power_modes if m.id is not None]
        valid = ", ".join(dict.fromkeys(names)) or "none, power_modes is empty"
        out = [
            ("power_modes", f"name '{n}' appears twice")
            for n in sorted(set(names))
            if names.count(n) > 1
        ]
        out += [
            ("power_modes", f"id {i} appears twice") for i in sorted(set(ids)) if ids.count(i) > 1
        ]
        if self.kind == "jetson" and not names:
            out.append(("power_modes", "a Jetson profile lists its nvpmodel modes"))
        default = self.default_power_mode
        if names and default is None:
            out.append(("default_power_mode", f"required with power_modes; one of: {valid}"))
        elif default is not None and default not in names:
            out.append(("default_power_mode", f"'{default}' is not a power mode (valid: {valid})"))
        return out

    def power_mode(self, name: str | None = None) -> PowerMode | None:
        """The named power mode, or the default one (None when the device has no modes).

        Raises:
            ProfileError: ``name`` is not one of the profile's modes.
        """
        name = name or self.default_power_mode
        if name is None:
            return None
        for mode in self.power_modes:
            if mode.name == name:
                return mode
        valid = ", ".join(m.name for m in self.power_modes) or "none"
        raise ProfileError(f"unknown power mode '{name}' for device '{self.name}'; valid: {valid}")

    def bandwidth_gbps(self, mode: str | None = None) -> float:
        """Peak memory bandwidth in GB/s in ``mode`` (default: the default power mode)."""
        selected = self.power_mode(mode)
        if selected is not None and selected.memory_bandwidth_gbps is not None:
            return selected.memory_bandwidth_gbps
        return self.memory_bandwidth_gbps

    def peak(self, precision: str, mode: str | None = None) -> float | None:
        """Dense peak TFLOP/s (TOPS for int8) for ``precision`` in ``mode``; None if not listed."""
        selected = self.power_mode(mode)
        if selected is not None and selected.peak_tflops is not None:
            return selected.peak_tflops.get(precision)  # type: ignore[call-overload]
        return self.peak_tflops.get(precision)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------
# Recipe profiles
# ---------------------------------------------------------------------------------------------


class LossConfig(_Block):
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


class TrainingConfig(_Model):
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


class DistributedConfig(_Model):
    """How training is spread over processes (launched with accelerate)."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed-zero3"] = Field(
        "none", description="Data parallelism across processes."
    )
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) the batches are planned for.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file, relative to the recipe's folder."
    )


class DataConfig(_Model):
    """Training data."""

    dataset: str = Field(min_length=1, description="'easy-vqa', 'fashion-grid' or a dataset path.")
    image_root: str | None = Field(
        None, description="Folder that the dataset's image paths are relative to."
    )


class RecipeProfile(_Model):
    """A distillation setting: which models, which loss, how to train."""

    name: str = Field(pattern=_NAME, description="Profile name; equals the YAML file's stem.")
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
        problems = _nested("loss", self.loss) + self._method_problems() + self._batch_problems()
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


def _target_problems(kind: str, name: str) -> list[tuple[str, str]]:
    """``preferred_target`` must be a registered target that runs on this kind of device."""
    if name not in targets.TARGETS:
        valid = ", ".join(targets.names())
        return [("preferred_target", f"unknown target '{name}'; valid: {valid}")]
    runs_on = targets.get(name).devices
    if kind == "cpu" and "cpu" not in runs_on:
        usable = [t for t in targets.names() if "cpu" in targets.get(t).devices]
        return [
            (
                "preferred_target",
                f"{name} needs an NVIDIA GPU; use " + " or ".join(f"'{t}'" for t in usable),
            )
        ]
    return []
