"""Will a distillation run fit its GPUs, and how long is a step at best? Arithmetic from shapes.

``plan_train`` answers, per process (one per GPU), for a teacher, a student, a parallelism
strategy and a device profile. Sizes are decimal bytes. Symbols: ``N`` processes; ``S = N``
for ``fsdp`` / ``deepspeed-zero3`` (sharded) and 1 for ``none`` / ``ddp`` (replicated);
``P`` parameters, ``P_tr`` the student's trainable ones (its vision tower past the feature
layer never gets a gradient and is frozen; the whole tower when ``train_vision_tower`` is off,
the language model and its head when ``train_language_model`` is off);
``T = batch x seq_len`` tokens per process, one image per sequence.

State, per parameter (``precision``):

=================  ========  ======  =====================================  ===========
precision          weights   grads   optimizer (AdamW)                      teacher
=================  ========  ======  =====================================  ===========
fp32 (CPU)         4         4       8 (m, v)                               4
bf16-mixed (GPU)   4         4       8; ZeRO-3: 2 + 2 + 12 (fp32 master)    2
bf16 (pure)        2         2       4 (m, v in bf16)                       2
=================  ========  ======  =====================================  ===========

``bf16`` (pure) is not what ``edgekd distill`` trains (its student is fp32): it describes the
paper-shape benchmark, which fits a CPU machine only so. Weights, gradients and optimizer state
are divided by ``S`` (ZeRO-3 in fp32 keeps an fp32 partition of its own as well: 12 bytes of
optimizer state); DDP adds one more gradient-sized buffer (its reducer's
buckets). Gathered parameters: FSDP2 holds the largest layer twice (the current one and the
prefetched one); a ZeRO-3 engine keeps up to ``stage3_max_live_parameters`` (1e9 in edgekd's
config) gathered while they will be used again, and the teacher's two routes reuse every
layer: ``min(P, 1e9)`` per model.

Activations, kept for the backward pass (values per token and layer, measured with autograd's
saved-tensor hooks on transformers' SDPA layers, which these match exactly):

* decoder layer (pre-norm, gated MLP: Qwen2, Llama): ``8 h + 2 kv + 4 I + heads + 2``;
* vision layer (SigLIP, CLIP): ``8 h + 2 I + heads + 4`` (CLIP's two-op quick_gelu: ``3 I``)
  per token (CLIP: the patches and its class token), for every layer of a trained tower (layers
  past the feature layer run too), plus the image and the pooling head;
* with gradient checkpointing each layer keeps only its input (``h``) and one layer's full set
  exists again while it is recomputed;
* the switch route keeps the teacher's decoder activations for the rows with an image (the
  backward reaches the student's tower through them), checkpointed like the student's.

Logits: the trainer computes them only at the positions whose next token is supervised in some
row of the micro-batch, at most ``P = min(L - 1, B * answer_tokens)`` of the ``L``: student, teacher
and switch logits ``(B, P, V)`` with the dense gradients of the student and switch logits that
the backward creates, plus the cross-entropy's fp32 copy and log-softmax of the supervised rows
(``answer_tokens`` per sequence). The distillation terms work in chunks (a few ``(chunk, V)``
buffers). The output heads' FLOPs count those ``B * P`` rows too.

Peak = weights + optimizer + teacher + gathered layers + DDP buckets (all persistent) + the
larger of (activations + logits working set + the output head's gradient, or all gradients
when they accumulate over micro-steps or under ZeRO-3), the backward's start, and (gradients +
one trainable-sized optimizer temporary), the optimizer step.

Step time (a lower bound): FLOPs over the profile's dense peak. A matmul costs ``2 P_mm`` per
token forward and twice that backward; attention ``4 L h`` per token and layer forward. The
student runs forward and backward (+1 forward with checkpointing), the teacher route forward
only, the switch route forward and a backward to its inputs only (no weight gradients: 1x
forward, +1 forward with checkpointing). Communication is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from edgekd.distill import methods
from edgekd.distill.methods import logit_method
from edgekd.errors import ModelError
from edgekd.models.dims import TextDims, vision_mlp_width
from edgekd.plan import GB
from edgekd.plan.inference import fit_verdict, meta_vlm, reserve_gb
from edgekd.profiles import load_device_profile
from edgekd.profiles.schema import LossConfig

if TYPE_CHECKING:
    from edgekd.models import VLM
    from edgekd.profiles import DeviceProfile

_LOSS = LossConfig()  # a recipe's loss defaults
Strategy = Literal["none", "ddp", "fsdp", "deepspeed-zero3"]
STRATEGIES = ("none", "ddp", "fsdp", "deepspeed-zero3")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
# distill/configs/deepspeed_zero3.json: stage3_max_live_parameters (and a reuse distance as
# large), so a ZeRO-3 engine keeps up to this many parameters gathered between their uses; the
# teacher's two routes reuse every layer.
ZERO3_MAX_LIVE = 1_000_000_000


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one VLM (read off a model on the meta device)."""

    name: str
    params: int  # all, tied weights once
    lm_matmul_params: int  # decoder + output head (the embedding lookup costs no FLOPs)
    lm_params: int  # the language model with its head (tied weights once)
    vision_params: int
    unused_vision_params: int  # past the feature layer
    largest_layer_params: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    heads: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_tokens: int  # tokens through the tower per image: patches (+ CLIP's class token)
    vision_act_values: int  # values the MLP activation keeps per intermediate unit (see below)
    image_size: int
    image_tokens: int  # visual tokens in the sequence (after the select strategy)


@dataclass(frozen=True)
class TrainSetup:
    """The run being planned (a recipe's values, or the CLI's)."""

    strategy: Strategy = "none"
    processes: int = 1
    batch: int = 1  # sequences per process and micro-step
    seq_len: int = 2048
    answer_tokens: int = 256  # supervised tokens per sequence
    precision: str = "bf16-mixed"
    gradient_checkpointing: bool = True
    train_vision_tower: bool = True
    train_language_model: bool = True
    method: str = "switch-kd"
    loss_chunk: int = _LOSS.chunk_size  # a recipe's loss.chunk_size
    gradient_accumulation_steps: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            valid = ", ".join(STRATEGIES)
            problems.append(f"strategy '{self.strategy}' is unknown; valid: {valid}")
        if self.precision not in PRECISIONS:
            problems.append(
                f"precision '{self.precision}' is unknown; valid: {', '.join(PRECISIONS)}"
            )
        keys = ("processes", "batch", "seq_len", "answer_tokens", "loss_chunk",
                "gradient_accumulation_steps")  # fmt: skip
        for key in keys:
            if getattr(self, key) < 1:
                problems.append(f"{key} must be at least 1 (got {getattr(self, key)})")
        if self.strategy == "fsdp" and self.processes < 2:
            problems.append("strategy fsdp needs at least 2 processes (edgekd distill refuses 1)")
        if problems:
            raise ModelError("; ".join(problems))

    @property
    def shards(self) -> int:
        return self.processes if self.strategy in ("fsdp", "deepspeed-zero3") else 1


@dataclass
class TrainPlan:
    """Per-process memory (bytes, by part), the verdict and the step-time roofline."""

    teacher: str
    student: str
    profile: str
    setup: TrainSetup
    usable_bytes: float
    parts: dict[str, float] = field(default_factory=dict)
    peak_phase: str = ""
    peak_bytes: float = 0.0
    step_flops: dict[str, float] = field(default_factory=dict)
    peak_tflops: float | None = None

    @property
    def margin_gb(self) -> float:
        return (self.usable_bytes - self.peak_bytes) / GB

    @property
    def fits(self) -> bool:
        return self.margin_gb >= 0

    @property
    def verdict(self) -> str:
        return fit_verdict(self.margin_gb, " per process")

    @property
    def step_seconds(self) -> float | None:
        """The compute roofline of one optimizer micro-step, or None without a peak."""
        if not self.peak_tflops:
            return None
        return sum(self.step_flops.values()) / (self.peak_tflops * 1e12)


def model_shape(model: str | VLM) -> ModelShape:
    """A :class:`ModelShape` of a preset, a checkpoint (config only) or a loaded VLM."""
    from edgekd.models import VLM  # torch

    if isinstance(model, str):
        vlm, name = meta_vlm(model), model
    elif isinstance(model, VLM):
        vlm, name = model, type(model.model).__name__
    else:
        raise TypeError(f"model must be a name or a VLM, got {type(model).__name__}")
    text, vision = vlm.config.text_config, vlm.config.vision_config
    embedding = vlm.language_model.get_input_embeddings().weight
    tied = vlm.lm_head.weight is embedding
    lm = sum(p.numel() for p in vlm.language_model.parameters())
    if not tied:
        lm += vlm.lm_head.weight.numel()
    lm_mm = lm - (0 if tied else embedding.numel())

    dims = TextDims.from_config(text)
    named = dict(vlm.model.named_parameters())
    unused = sum(named[n].numel() for n in vlm.unused_vision_parameters())
    layer_sizes = [
        sum(p.numel() for p in m.parameters())
        for m in vlm.model.modules()
        if type(m).__name__ in set(getattr(vlm.model, "_no_split_modules", None) or ())
    ]
    return ModelShape(
        name=name,
        params=sum(p.numel() for p in vlm.model.parameters()),
        lm_matmul_params=lm_mm,
        lm_params=lm,
        vision_params=sum(p.numel() for p in vlm.vision_tower.parameters()),
        unused_vision_params=unused,
        largest_layer_params=max(layer_sizes, default=0),
        layers=dims.layers,
        hidden=dims.hidden,
        kv_dim=dims.kv_heads * dims.head_dim,
        intermediate=int(text.intermediate_size),
        heads=int(text.num_attention_heads),
        vocab=dims.vocab,
        vision_layers=int(vision.num_hidden_layers),
        vision_hidden=int(vision.hidden_size),
        vision_intermediate=vision_mlp_width(vision),
        vision_heads=int(vision.num_attention_heads),
        vision_tokens=vlm.vision_tokens(),
        vision_act_values=ACTIVATION_VALUES.get(str(vision.hidden_act), 2),
        image_size=int(vision.image_size),
        image_tokens=vlm.num_image_tokens(),
    )


# ---- per-token activation counts (values) ------------------------------------------------
def decoder_layer_values(m: ModelShape) -> int:
    """Values one decoder layer keeps per token for the backward (see the module docstring)."""
    return 8 * m.hidden + 2 * m.kv_dim + 4 * m.intermediate + m.heads + 2


def vision_layer_values(m: ModelShape) -> int:
    mlp = (1 + m.vision_act_values) * m.vision_intermediate  # fc1's output + the activation's
    return 8 * m.vision_hidden + mlp + m.vision_heads + 4


# Values a vision MLP's activation keeps per intermediate unit, beside fc1's output: a fused op
# (SigLIP's gelu_pytorch_tanh, gelu) keeps its output for fc2; CLIP's quick_gelu,
# x * sigmoid(1.702 x), keeps the sigmoid too. Unknown activations count as two.
ACTIVATION_VALUES = {"gelu_pytorch_tanh": 1, "gelu": 1, "quick_gelu": 2}


def _stack(layers: int, tokens: int, full: int, hidden: int, checkpointed: bool) -> int:
    """Values a stack of layers keeps: all of them, or inputs plus one layer recomputed."""
    if checkpointed:
        return tokens * (layers * hidden + full)
    return tokens * layers * full


def _bytes(setup: TrainSetup) -> dict[str, float]:
    """Bytes per value of each kind of tensor for ``setup.precision``."""
    zero3 = setup.strategy == "deepspeed-zero3"
    if setup.precision == "fp32":  # ZeRO-3 keeps an fp32 partition beside the model's own
        return {"weight": 4, "grad": 4, "optim": 12 if zero3 else 8, "act": 4, "teacher": 4}
    if setup.precision == "bf16":
        return {"weight": 2, "grad": 2, "optim": 4, "act": 2, "teacher": 2}
    if zero3:  # bf16 partitions + fp32 master, m and v (the ZeRO paper's 16 bytes)
        return {"weight": 2, "grad": 2, "optim": 12, "act": 2, "teacher": 2}
    return {"weight": 4, "grad": 4, "optim": 8, "act": 2, "teacher": 2}


def plan_train(
    teacher: str | VLM | ModelShape | None,
    student: str | VLM | ModelShape,
    profile: str | DeviceProfile,
    setup: TrainSetup,
) -> TrainPlan:
    """Per-process memory and step roofline of distilling ``teacher`` into ``student``.

    Args:
        teacher: Preset, checkpoint (config only), loaded VLM or shape; None for sft.
        student: The same for the student.
        profile: Device profile name, YAML path or loaded profile (memory and FLOP/s).
        setup: Strategy, processes, batch, sequence length, precision, checkpointing.

    Raises:
        ModelError: a bad setup value, or a method that needs a teacher without one.
        ProfileError: an unknown profile.
    """
    device = profile if not isinstance(profile, str) else load_device_profile(profile)
    s = student if isinstance(student, ModelShape) else model_shape(student)
    t = None
    if methods.get(setup.method).reads_teacher_logits:
        if teacher is None:
            raise ModelError(f"method '{setup.method}' needs a teacher; pass --teacher")
        t = teacher if isinstance(teacher, ModelShape) else model_shape(teacher)
    b, by, n = setup, _bytes(setup), setup.shards
    ckpt = b.gradient_checkpointing
    # the switch route keeps activations only when its gradient has a tower to reach
    switch = methods.get(b.method).switch and t is not None and b.train_vision_tower
    frozen = s.unused_vision_params if b.train_vision_tower else s.vision_params
    if not b.train_language_model:  # the projector alone (LLaVA's stage 1): no LM gradients
        frozen += s.lm_params
    trainable = s.params - frozen
    tokens = b.batch * b.seq_len
    images = b.batch

    parts: dict[str, float] = {
        "student weights": s.params * by["weight"] / n,
        "student gradients": trainable * by["grad"] / n,
        "optimizer state": trainable * by["optim"] / n,
        "DDP buckets": trainable * by["grad"] if b.strategy == "ddp" else 0.0,
        "teacher weights": (t.params * by["teacher"] / n) if t else 0.0,
        "gathered layers": 0.0,
    }
    if b.strategy == "deepspeed-zero3":  # each engine keeps up to max_live params gathered
        parts["gathered layers"] = min(s.params, ZERO3_MAX_LIVE) * by["weight"]
        if t:
            parts["gathered layers"] += min(t.params, ZERO3_MAX_LIVE) * by["teacher"]
    elif n > 1:  # FSDP2 reshards after each layer: the current one and the prefetched one
        largest = s.largest_layer_params * by["weight"]
        if t:
            largest = max(largest, t.largest_layer_params * by["teacher"])
        parts["gathered layers"] = 2.0 * largest

    act = by["act"]
    student_act = _stack(s.layers, tokens, decoder_layer_values(s), s.hidden, ckpt)
    student_act += tokens * (2 * s.hidden + 1)  # final norm; its output is the head's input
    if b.train_vision_tower:
        v_tokens = images * s.vision_tokens
        student_act += _stack(
            s.vision_layers, v_tokens, vision_layer_values(s), s.vision_hidden, ckpt
        )
        student_act += images * (3 * s.image_size**2 + 4 * s.vision_tokens * s.vision_hidden)
        student_act += images * s.image_tokens * (2 * s.vision_hidden + 2 * s.hidden)  # projector
    parts["student activations"] = student_act * act
    switch_act = 0
    if switch:
        switch_act = _stack(t.layers, tokens, decoder_layer_values(t), t.hidden, ckpt)
        switch_act += tokens * (2 * t.hidden + 1)
        switch_act += images * t.image_tokens * (2 * s.vision_hidden + 2 * t.hidden)
    parts["switch-route activations"] = switch_act * by["teacher"]

    head_rows = logit_rows(b)
    logits_s = head_rows * s.vocab * act
    logits_t = head_rows * s.vocab * by["teacher"] if t else 0.0
    logits_v = head_rows * s.vocab * by["teacher"] if switch else 0.0
    supervised = b.batch * min(b.answer_tokens, b.seq_len)
    ce = supervised * s.vocab * 4 * 2  # fp32 copy and log-softmax of the supervised rows
    chunk = 4 * min(b.loss_chunk, supervised) * s.vocab * 4 if t else 0.0
    parts["logits working set"] = 2 * logits_s + logits_t + 2 * logits_v + ce + chunk

    persistent = ("student weights", "optimizer state", "teacher weights", "gathered layers",
                  "DDP buckets")  # fmt: skip
    static = sum(parts[k] for k in persistent)
    # gradients outlive the backward when they accumulate over micro-steps, and ZeRO-3 keeps
    # its gradient partition; otherwise they appear as the activations are freed
    kept = b.gradient_accumulation_steps > 1 or b.strategy == "deepspeed-zero3"
    head_grad = s.vocab * s.hidden * by["grad"] / n if b.train_language_model else 0.0
    backward_start = (
        parts["student activations"]
        + parts["switch-route activations"]
        + parts["logits working set"]
        + (parts["student gradients"] if kept else head_grad)
    )
    step = parts["student gradients"] + trainable * by["grad"] / n  # + one optimizer temporary
    phase, transient = (
        ("backward start", backward_start) if backward_start >= step else ("optimizer step", step)
    )
    usable = (device.memory_gb - reserve_gb(device)) * GB
    plan = TrainPlan(
        teacher=t.name if t else "-",
        student=s.name,
        profile=device.name,
        setup=b,
        usable_bytes=usable,
        parts=parts,
        peak_phase=phase,
        peak_bytes=static + transient,
    )
    plan.step_flops = step_flops(t, s, b)
    # bf16 math at the profile's bf16 peak, else its fp16 one, else (CPUs) its fp32 one
    chain = ("fp32",) if b.precision == "fp32" else ("bf16", "fp16", "fp32")
    plan.peak_tflops = next((device.peak(p) for p in chain if device.peak(p)), None)
    return plan


def logit_rows(b: TrainSetup) -> int:
    """Rows the heads run on per micro-batch: every sequence at the union of the rows'
    supervised positions."""
    positions = min(b.seq_len - 1, b.batch * min(b.answer_tokens, b.seq_len - 1))
    return b.batch * positions


def step_flops(t: ModelShape | None, s: ModelShape, b: TrainSetup) -> dict[str, float]:
    """FLOPs of one micro-step per process, by phase (see the module docstring)."""
    tokens, images = b.batch * b.seq_len, b.batch
    extra = 1 if b.gradient_checkpointing else 0

    head_rows = logit_rows(b)

    def lm_forward(m: ModelShape) -> float:
        head = m.vocab * m.hidden  # the output head runs on the supervised positions only
        body = 2.0 * (m.lm_matmul_params - head) * tokens + 2.0 * head * head_rows
        return body + 4.0 * b.seq_len * m.hidden * m.layers * tokens

    def vision_forward(m: ModelShape) -> float:
        attention = 4.0 * m.vision_tokens * m.vision_hidden * m.vision_layers
        per_token = 2.0 * m.vision_params + attention
        return per_token * m.vision_tokens * images

    flops = {
        # a frozen language model still passes gradients back to the projector: its input
        # gradients (1x forward), not its weight gradients (another 1x)
        "student": lm_forward(s) * ((3 if b.train_language_model else 2) + extra)
        + vision_forward(s) * ((3 + extra) if b.train_vision_tower else 1)
    }
    if t is not None:
        flops["teacher route"] = lm_forward(t) + vision_forward(t)
        if methods.get(b.method).switch:
            flops["switch route"] = lm_forward(t) * (2 + extra)
    return flops


def setup_from_recipe(
    recipe,
    device: DeviceProfile,
    *,
    strategy: str | None = None,
    processes: int | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    precision: str | None = None,
    gradient_checkpointing: bool | None = None,
    answer_tokens: int = 256,
) -> TrainSetup:
    """A :class:`TrainSetup` with the recipe's values where the caller gives none.

    The precision follows ``edgekd distill``: ``bf16-mixed`` when the recipe asks for bf16 and
    the device is a GPU (or a Jetson), else ``fp32``.
    """
    t = recipe.training
    if precision is None:
        precision = "bf16-mixed" if t.bf16 and device.kind != "cpu" else "fp32"
    processes = recipe.distributed.num_processes if processes is None else processes
    strategy = recipe.distributed.strategy if strategy is None else strategy
    if strategy == "none" and processes > 1:
        strategy = "ddp"  # as edgekd distill runs it under a launcher
    batch = t.per_device_batch_size if batch is None else batch
    # the recipe's global batch over the planned processes and micro-batch
    accumulation = max(1, t.global_batch_size // max(1, batch * processes))
    method = recipe.method
    if methods.get(method).switch and recipe.loss.w_vsd == 0:
        method = logit_method(method, recipe.loss.logit_loss)  # no switch route without its loss
    return TrainSetup(
        strategy=strategy,
        processes=processes,
        batch=batch,
        seq_len=t.max_length if seq_len is None else seq_len,
        gradient_accumulation_steps=accumulation,
        answer_tokens=answer_tokens,
        precision=precision,
        gradient_checkpointing=t.gradient_checkpointing
        if gradient_checkpointing is None
        else gradient_checkpointing,
        train_vision_tower=bool(t.train_vision_tower),
        train_language_model=bool(t.train_language_model),
        method=method,
        loss_chunk=recipe.loss.chunk_size,
    )
