"""Will a VLM fit a device, and how fast can it decode there? Arithmetic from shapes, no weights.

``plan`` answers per precision the device profile supports::

    total       = weights + KV cache + activations            (decimal GB, 1 GB = 1e9 bytes)
    usable      = memory_gb - reserve                          fits = total <= usable
    decode tok/s <= min(bandwidth / bytes read per token,  peak FLOP/s / (2 x LM params))

Assumptions (all estimates are for a whole-model deployment: vision tower, projector and LM
resident together):

* **Weights.** fp32 4 bytes, fp16/bf16 2 bytes per parameter. Quantized precisions quantize
  every tensor of 2 or more dimensions (linear, embedding and conv weights) and keep 1-D tensors
  (biases, norms) in fp16: **int8** is 8 bits per weight plus one fp16 scale per output row
  (``shape[0]``); **int4** is 4.5 bits per weight, i.e. 4 bits plus an fp16 scale per block of
  32 (the q4_0 / MatMulNBits block-32 layout). Tied embeddings are counted once.
* **KV cache.** ``2 x layers x kv_heads x head_dim x context x batch`` elements in fp16 (fp32 for
  the fp32 plan): quantized plans keep an fp16 cache.
* **Activations.** The working set of one transformer layer at prefill of the whole context,
  assuming fused attention (SDPA / flash / TensorRT MHA: no ``context^2`` score matrix): residual
  in and out, q, k, v, attention output and the MLP's gate, up and product, i.e.
  ``batch x tokens x (4 x hidden + 2 x kv_dim + 3 x intermediate)`` elements in fp16 (fp32 for
  fp32). The larger of the LM layer (tokens = context) and a vision-tower layer (one image per
  sequence; kv_dim = hidden and ``2 x intermediate``: fc1 and its activation, no gate) counts,
  plus fp32 logits of the last position. Eager attention adds
  ``batch x heads x context^2`` elements.
* **Reserve.** Derived from memory size, not per profile: where the OS shares the memory
  (unified-memory Jetsons, CPUs) ``1.0 GB + memory_gb / 16`` (1.5 GB on 8 GB boards, 2 GB on
  16 GB, 5 GB on 64 GB) for the OS, the CUDA/TensorRT runtime and firmware carve-outs; on a
  discrete GPU 0.5 GB for the CUDA context and allocator slack.
* **Decode roofline.** Each decode step reads the language-model weights once (the input
  embedding table only when tied to the LM head, which reads it whole) and the KV cache of
  ``context`` tokens of every sequence, producing ``batch`` tokens. The compute bound takes
  ``2 x LM params`` FLOPs per token (attention-score FLOPs ignored) at the profile's dense peak:
  int8 at its INT8 TOPS (W8A8, as TensorRT builds it), int4 at the fp16 peak (weight-only: the
  math runs in fp16). Both are upper bounds; measured rates are lower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.errors import ModelError
from edgekd.io import checkpoint_dir, is_hub_id
from edgekd.models.checkpoint import load_config
from edgekd.models.dims import TextDims, vision_mlp_width
from edgekd.plan import GB

if TYPE_CHECKING:
    from edgekd.models import VLM
    from edgekd.profiles import DeviceProfile

STAGES = ("language_model", "vision_tower", "projector")
INT4_BITS = 4.5  # 4-bit weights + one fp16 scale per block of 32
SCALE_BYTES = 2  # fp16 scales (int8: one per output row)
VECTOR_BYTES = 2  # 1-D tensors of quantized plans stay in fp16
# Which dense peak of the profile bounds compute for each precision (int4 is weight-only).
PEAK_OF = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "int4": "fp16"}


@dataclass(frozen=True)
class TensorStats:
    """Parameter counts of a group of tensors, split as quantization treats them."""

    matrix_params: int = 0  # elements of tensors with >= 2 dimensions
    matrix_rows: int = 0  # sum of shape[0] over those tensors
    vector_params: int = 0  # elements of 1-D tensors

    @property
    def params(self) -> int:
        return self.matrix_params + self.vector_params

    def nbytes(self, precision: str) -> float:
        """Bytes of these tensors at ``precision`` (see the module docstring)."""
        if precision == "fp32":
            return 4.0 * self.params
        if precision in ("fp16", "bf16"):
            return 2.0 * self.params
        vectors = VECTOR_BYTES * self.vector_params
        if precision == "int8":
            return self.matrix_params + SCALE_BYTES * self.matrix_rows + vectors
        if precision == "int4":
            return self.matrix_params * INT4_BITS / 8 + vectors
        raise ValueError(f"unknown precision '{precision}'; valid: {', '.join(PEAK_OF)}")


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs from a model: tensor stats per stage and the layer shapes."""

    name: str
    stages: dict[str, TensorStats]  # language_model (with an untied lm_head), vision_tower, ...
    input_embedding: TensorStats
    tied_embeddings: bool
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    vision_tokens: int
    vision_hidden: int
    vision_intermediate: int

    @property
    def lm_params(self) -> int:
        return self.stages["language_model"].params


@dataclass(frozen=True)
class PrecisionPlan:
    """Memory and decode bounds of one precision; bytes are floats (int4 has half bytes)."""

    precision: str
    weight_bytes: dict[str, float]  # per stage
    kv_bytes: float
    activation_bytes: float
    usable_bytes: float
    memory_tok_s: float
    compute_tok_s: float | None  # None when the profile lists no peak for it

    @property
    def weights(self) -> float:
        return sum(self.weight_bytes.values())

    @property
    def total_bytes(self) -> float:
        return self.weights + self.kv_bytes + self.activation_bytes

    @property
    def margin_gb(self) -> float:
        """Usable minus needed, in GB: negative when it does not fit."""
        return (self.usable_bytes - self.total_bytes) / GB

    @property
    def fits(self) -> bool:
        return self.margin_gb >= 0

    @property
    def decode_tok_s(self) -> float:
        if self.compute_tok_s is None:
            return self.memory_tok_s
        return min(self.memory_tok_s, self.compute_tok_s)

    @property
    def bound(self) -> str:
        """``memory`` or ``compute``: which roofline binds decode."""
        return "memory" if self.decode_tok_s == self.memory_tok_s else "compute"

    @property
    def verdict(self) -> str:
        return fit_verdict(self.margin_gb)


def fit_verdict(margin_gb: float, per: str = "") -> str:
    """``fits, X GB spare`` or ``does not fit by X GB`` (``per``: e.g. " per process")."""
    if margin_gb >= 0:
        return f"fits, {margin_gb:.2f} GB spare{per}"
    return f"does not fit by {-margin_gb:.2f} GB{per}"


@dataclass(frozen=True)
class PlanResult:
    """``plan``'s answer: one :class:`PrecisionPlan` per supported precision."""

    model: str
    profile: str
    power_mode: str | None
    context: int
    batch: int
    memory_gb: float
    reserve_gb: float
    bandwidth_gbps: float
    params: dict[str, int]
    rows: list[PrecisionPlan] = field(default_factory=list)

    @property
    def usable_gb(self) -> float:
        return self.memory_gb - self.reserve_gb

    def row(self, precision: str) -> PrecisionPlan:
        for row in self.rows:
            if row.precision == precision:
                return row
        valid = ", ".join(r.precision for r in self.rows)
        raise KeyError(f"precision '{precision}' not planned for {self.profile}; valid: {valid}")


def plan(
    model: str | VLM,
    profile: str | DeviceProfile,
    *,
    context: int = 2048,
    batch: int = 1,
    power_mode: str | None = None,
) -> PlanResult:
    """Memory fit and decode roofline of ``model`` on ``profile`` at each supported precision.

    Args:
        model: A preset name (``qwen2-0.5b-siglip-so400m``), a checkpoint directory or hub id
            (only its config is read; the model is built on the meta device), or a loaded VLM.
        profile: A device profile name or YAML path, or a loaded profile.
        context: Tokens per sequence held in the KV cache (prompt, image tokens and output).
        batch: Sequences decoded together.
        power_mode: nvpmodel mode whose bandwidth and peaks apply (default: the profile's).

    Raises:
        ProfileError: Unknown profile or power mode.
        ModelError: Unknown preset, unreadable checkpoint, or context / batch below 1.
    """
    from edgekd.profiles import load_device_profile

    device = profile if not isinstance(profile, str) else load_device_profile(profile)
    device.power_mode(power_mode)  # unknown modes fail before the model is built
    if context < 1 or batch < 1:
        raise ModelError(f"context and batch must be >= 1, got context {context}, batch {batch}")
    facts = model_facts(model)
    reserve = reserve_gb(device)
    bandwidth = device.bandwidth_gbps(power_mode)
    rows = [
        _plan_precision(facts, device, p, context, batch, reserve, power_mode)
        for p in device.supported_precisions
    ]
    return PlanResult(
        model=facts.name,
        profile=device.name,
        power_mode=power_mode or device.default_power_mode,
        context=context,
        batch=batch,
        memory_gb=device.memory_gb,
        reserve_gb=reserve,
        bandwidth_gbps=bandwidth,
        params={k: v.params for k, v in facts.stages.items()},
        rows=rows,
    )


def reserve_gb(device: DeviceProfile) -> float:
    """Memory kept back for the OS and runtimes (see the module docstring)."""
    if device.kind == "gpu" and not device.unified_memory:
        return 0.5
    return 1.0 + device.memory_gb / 16


def kv_cache_bytes(facts: ModelFacts, context: int, batch: int, precision: str) -> int:
    """``2 x layers x kv_heads x head_dim x context x batch x (4 if fp32 else 2)`` bytes."""
    per = 4 if precision == "fp32" else 2
    return 2 * facts.layers * facts.kv_heads * facts.head_dim * context * batch * per


def activation_bytes(facts: ModelFacts, context: int, batch: int, precision: str) -> int:
    """One layer's prefill working set (LM or vision, the larger) plus last-position logits."""
    per = 4 if precision == "fp32" else 2
    kv_dim = facts.kv_heads * facts.head_dim
    lm = context * (4 * facts.hidden + 2 * kv_dim + 3 * facts.intermediate)
    vision = facts.vision_tokens * (6 * facts.vision_hidden + 2 * facts.vision_intermediate)
    return batch * max(lm, vision) * per + batch * facts.vocab * 4


def _plan_precision(
    facts: ModelFacts,
    device: DeviceProfile,
    precision: str,
    context: int,
    batch: int,
    reserve: float,
    mode: str | None,
) -> PrecisionPlan:
    weights = {stage: stats.nbytes(precision) for stage, stats in facts.stages.items()}
    kv = kv_cache_bytes(facts, context, batch, precision)
    read = weights["language_model"] + kv
    if not facts.tied_embeddings:  # a lookup reads one row of an untied table, not all of it
        read -= facts.input_embedding.nbytes(precision)
    peak = device.peak(PEAK_OF[precision], mode)
    return PrecisionPlan(
        precision=precision,
        weight_bytes=weights,
        kv_bytes=kv,
        activation_bytes=activation_bytes(facts, context, batch, precision),
        usable_bytes=(device.memory_gb - reserve) * GB,
        memory_tok_s=batch * device.bandwidth_gbps(mode) * GB / read,
        compute_tok_s=None if peak is None else peak * 1e12 / (2 * facts.lm_params),
    )


# ---------------------------------------------------------------------------------------------
# Model facts: from a preset, a checkpoint's config or a loaded VLM
# ---------------------------------------------------------------------------------------------


def model_facts(model: str | VLM) -> ModelFacts:
    """Tensor stats and shapes of a preset, checkpoint (config only) or loaded VLM."""
    if isinstance(model, str):
        return _facts_by_name(model)
    return facts_from_vlm(model, name=type(model).__name__)


@lru_cache(maxsize=8)
def _facts_by_name(name: str) -> ModelFacts:
    return facts_from_vlm(meta_vlm(name), name=name)


def meta_vlm(name: str) -> VLM:
    """A preset, or a checkpoint's config (no weights read), as a VLM on the meta device."""
    from edgekd.models import SHAPES, build_vlm  # torch

    if name in SHAPES:
        return build_vlm(name, device="meta")
    return _meta_vlm_from_checkpoint(name)


def _meta_vlm_from_checkpoint(src: str) -> VLM:
    import torch
    from transformers import LlavaForConditionalGeneration

    from edgekd.models import SHAPES, VLM

    local = Path(src).expanduser()
    if local.is_dir():
        src = str(checkpoint_dir(local) or local)  # a run directory holds its student in model/
    elif not local.exists() and not is_hub_id(src):
        raise ModelError(
            f"model '{src}' is neither a preset ({', '.join(SHAPES)}) nor a checkpoint "
            "directory or hub id"
        )
    config = load_config(src)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return VLM(model, processor=None)


def facts_from_vlm(vlm: VLM, name: str) -> ModelFacts:
    """Read :class:`ModelFacts` off a VLM (on any device, meta included)."""
    embedding = vlm.language_model.get_input_embeddings().weight
    tied = vlm.lm_head.weight is embedding
    lm = _stats(vlm.language_model.parameters())
    if not tied:
        lm = _add(lm, _stats([vlm.lm_head.weight]))

    text, vision = vlm.config.text_config, vlm.config.vision_config
    dims = TextDims.from_config(text)
    return ModelFacts(
        name=name,
        stages={
            "language_model": lm,
            "vision_tower": _stats(vlm.vision_tower.parameters()),
            "projector": _stats(vlm.projector.parameters()),
        },
        input_embedding=_stats([embedding]),
        tied_embeddings=tied,
        layers=int(text.num_hidden_layers),
        kv_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
        vision_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_hidden=int(vision.hidden_size),
        vision_intermediate=vision_mlp_width(vision),
    )


def _stats(params: Any) -> TensorStats:
    matrix = rows = vector = 0
    for p in params:
        if p.dim() >= 2:
            matrix, rows = matrix + p.numel(), rows + p.shape[0]
        else:
            vector += p.numel()
    return TensorStats(matrix, rows, vector)


def _add(a: TensorStats, b: TensorStats) -> TensorStats:
    return TensorStats(
        a.matrix_params + b.matrix_params,
        a.matrix_rows + b.matrix_rows,
        a.vector_params + b.vector_params,
    )
