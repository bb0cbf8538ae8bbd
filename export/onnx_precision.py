"""What each ONNX precision stores and must reproduce: the plans, options and parity limits,
and the conversion of a traced fp32 graph to a precision.

Declared as data (optimum-style) and read by :mod:`edgekd.export.onnx`, which traces the
graphs, and by the TensorRT exporter (the int8 vision floors). The manifest records the plan per
component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekd.export import gptq
from edgekd.export import onnx_graph as g
from edgekd.export import onnx_tied as tied
from edgekd.export.parity import Tolerance, loosened

GQA_OPSET = 23  # ONNX Attention takes fewer key/value heads than query heads


@dataclass(frozen=True)
class PrecisionPlan:
    """How each component is stored for one precision (recorded in the manifest)."""

    vision: str
    embed: str
    decoder: str
    lm_head: str


TOLERANCES = {
    "fp32": Tolerance(1e-4, 0.99999, 1e-4, 0.99999, True, None),
    "fp16": Tolerance(2e-2, 0.999, 2e-2, 0.999, True, None),
    "int8": Tolerance(1e-4, 0.99999, None, 0.99, False, 0.03),
    "int4": Tolerance(1e-4, 0.99999, None, 0.95, False, 0.05),
}


PLANS = {
    "fp32": PrecisionPlan("fp32", "fp32", "fp32", "fp32"),
    # fp16 weights and compute; graph I/O (pixels, embeddings, logits, KV cache) stays fp32.
    "fp16": PrecisionPlan(
        "fp16 (fp32 I/O, norms/softmax fp32)",
        "fp16 (fp32 output)",
        "fp16 (fp32 I/O, norms/softmax fp32)",
        "fp16",
    ),
    # SigLIP stays fp32: it is outside the language-model size budget and int8 ViTs lose accuracy.
    "int8": PrecisionPlan(
        "fp32",
        "int8 per-row, fp32 scales",
        "{int8}; norms/biases fp32",
        "int8 per-channel, per-token int8 activations (baked, untied)",
    ),
    "int4": PrecisionPlan(
        "fp32",
        "int8 per-row, fp32 scales",
        "int4 weight-only (MatMulNBits, {int4}, block {block}, "
        "accuracy_level {level}); norms/biases fp32",
        "int8 per-channel, per-token int8 activations (baked, untied)",
    ),
}
# int8/int4 with tied embeddings: one int8 table + fp32 scales for the embedding and lm_head.
SHARED_PLAN = {
    "table": "int8 symmetric per vocab row, fp32 scales; [hidden, vocab] layout, stored once",
    "embed": "int8 per-row, fp32 scales (the tied table in shared_embedding.data)",
    "lm_head": "int8 per-channel, per-token int8 activations (tied: the embedding's table in "
    "shared_embedding.data)",
}
# The vision encoder at another precision than the plan's (option ``vision_precision``):
# ``int8`` runs the tower's MatMuls as the int8 decoder's (8-bit weight blocks, activations int8
# per block: on the real DINOv2 teacher per-tensor dynamic int8 cost 5 points of answers, the
# blocks 3, docs/performance.md "Real weights"); its answer accuracy is measured on
# ``--eval-data`` against the same artifact fed PyTorch's visual tokens and enforced
# (:data:`VISION_INT8_MAX_DROP`), and its visual tokens get the looser cosine floor below.
VISION_PLANS = {
    "fp32": "fp32",
    "fp16": "fp16 (fp32 I/O, norms/softmax fp32)",
    "int8": "int8 weight-only (MatMulNBits 8-bit, symmetric, block {block}, accuracy_level "
    "{level}); norms, conv and biases fp32",
}
# with ``int8_scheme=dynamic`` the tower is quantized as the decoder then is
VISION_INT8_DYNAMIC = (
    "int8 dynamic (MatMulInteger, per-channel weights); norms, conv and biases fp32"
)
# The int8 decoder (option ``int8_scheme``). ``blockwise`` (default): 8-bit weights with one
# scale per ``int8_block_size`` inputs, activations quantized to int8 per block at run time
# (``int8_accuracy_level`` 4, onnxruntime's fast integer kernels; 0 computes in fp32, 8x slower
# on CPU). ``dynamic``: onnxruntime's quantize_dynamic, one activation scale per tensor: a real
# LM's massive first-token activations (SmolLM2: |x| 3065 against a median 0.06) take the whole
# scale, and its logits fail parity (docs/performance.md, "Real weights").
INT8_SCHEMES = {
    "blockwise": "int8 weight-only (MatMulNBits 8-bit, symmetric, block {block}, "
    "accuracy_level {level})",
    "dynamic": "int8 dynamic (MatMulInteger, per-channel weights, one activation scale per tensor)",
}
# How int4 weights are chosen (option ``int4_method``). ``gptq`` (default): asymmetric blocks
# chosen by GPTQ on calibration prompts (:mod:`edgekd.export.gptq`); round-to-nearest moved a
# real LM's next-token distribution 0.4-0.8 nats and failed parity (docs/performance.md, "Real
# weights"). ``rtn``: onnxruntime's round-to-nearest, symmetric, no calibration.
INT4_METHODS = {
    "gptq": "GPTQ asymmetric, calibrated on {samples} {source} prompts",
    "rtn": "round-to-nearest symmetric",
}
VISION_INT8_MAX_DROP = 0.01  # normalised-match points the int8 vision encoder may cost
VISION_INT8_COSINE = 0.99  # per-token cosine floor of int8 visual tokens against PyTorch
OPTIONS: dict[str, Any] = {
    "int4_block_size": 32,
    "int4_accuracy_level": 4,
    "int4_method": "gptq",
    "calibration_data": None,  # LLaVA JSON for GPTQ's prompts; None: synthetic image prompts
    "calibration_samples": gptq.CALIBRATION_SAMPLES,
    "int8_scheme": "blockwise",
    "int8_block_size": 32,
    "int8_accuracy_level": 4,
    "opset": 23,
    "vision_precision": None,  # None: the precision plan's (fp16 for fp16, else fp32)
}


def option_problems(options: dict[str, Any], eval_data=None) -> list[str]:
    problems = []
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        problems.append(
            f"unknown onnx option(s) {', '.join(unknown)}; valid: {', '.join(sorted(OPTIONS))}"
        )
    block = options.get("int4_block_size", OPTIONS["int4_block_size"])
    if not isinstance(block, int) or not 16 <= block <= 256 or block & (block - 1):
        problems.append(
            f"int4_block_size {block!r} must be a power of two from 16 to 256 (onnxruntime's "
            "MatMulNBits range), e.g. 32, 64, 128"
        )
    for key in ("int4_accuracy_level", "int8_accuracy_level"):
        level = options.get(key, OPTIONS[key])
        if level is not None and level not in (0, 1, 2, 3, 4):
            problems.append(f"{key} {level!r} must be 0-4 or None")
    method = options.get("int4_method", OPTIONS["int4_method"])
    if method not in INT4_METHODS:
        problems.append(f"int4_method {method!r}; valid: {', '.join(INT4_METHODS)}")
    problems += gptq.calibration_problems(options)
    scheme = options.get("int8_scheme", OPTIONS["int8_scheme"])
    if scheme not in INT8_SCHEMES:
        problems.append(f"int8_scheme {scheme!r}; valid: {', '.join(INT8_SCHEMES)}")
    block = options.get("int8_block_size", OPTIONS["int8_block_size"])
    if not isinstance(block, int) or not 16 <= block <= 256 or block & (block - 1):
        problems.append(f"int8_block_size {block!r} must be a power of two from 16 to 256")
    vision = options.get("vision_precision")
    if vision is not None and vision not in VISION_PLANS:
        problems.append(
            f"vision_precision {vision!r} must be one of {', '.join(VISION_PLANS)} (default: "
            "the precision's own plan)"
        )
    elif vision == "int8" and eval_data is None:
        problems.append(
            "vision_precision=int8 needs --eval-data: the exporter measures what the int8 "
            "vision encoder costs in answers on it, and refuses more than "
            f"{VISION_INT8_MAX_DROP * 100:g} point"
        )
    opset = options.get("opset", OPTIONS["opset"])
    if not isinstance(opset, int) or not 17 <= opset <= GQA_OPSET:
        problems.append(
            f"opset {opset!r} must be from 17 (one LayerNormalization op per norm) to "
            f"{GQA_OPSET} (the newest this exporter writes)"
        )
    return problems


def convert(
    component: str,
    model,
    precision: str,
    options: dict[str, Any],
    head: str,
    refs: dict[str, Any] | None = None,
    blocks: dict[str, list[Any]] | None = None,
):
    """One traced graph to ``precision`` (see :data:`PLANS` for what each component keeps).

    ``refs`` (int8/int4 with tied embeddings): the shared table's external references; the
    embedding and the lm_head then read it instead of each quantizing its own copy.
    ``blocks``: precomputed weight blocks of the decoder's MatMuls (GPTQ, keyed by
    :func:`edgekd.export.gptq.weight_key`), written as they are instead of rounded here.
    """
    if component == "vision":
        vision = vision_precision(precision, options)
        if vision == "int8" and options["int8_scheme"] == "dynamic":
            return g.quantize_int8(model)
        if vision == "int8":  # the decoder's 8-bit blocks: one activation scale per block
            return g.quantize_nbits(
                model,
                bits=8,
                block_size=options["int8_block_size"],
                accuracy_level=options["int8_accuracy_level"],
                exclude=[],
            )
        return g.to_fp16(model) if vision == "fp16" else model
    if precision == "fp32":
        return model
    if precision == "fp16":
        return g.to_fp16(model)
    if component == "embed":
        if refs:
            tied.share_tied_embedding(model, refs)
        else:
            g.quantize_gather_int8(model)
        return model
    if precision == "int8" and options["int8_scheme"] == "dynamic":
        model = g.quantize_int8(model, exclude=[head])
    elif blocks is not None:  # precomputed weight blocks (MatMulNBits)
        level = options[f"{precision}_accuracy_level"]
        g.write_nbits(model, blocks, accuracy_level=level, exclude=[head])
    else:  # int8 blockwise or int4: weight blocks (MatMulNBits)
        model = g.quantize_nbits(
            model,
            bits=8 if precision == "int8" else 4,
            block_size=options[f"{precision}_block_size"],
            accuracy_level=options[f"{precision}_accuracy_level"],
            exclude=[head],
        )
    if not refs:
        tied.quantize_head_int8(model, head)  # the lm_head stays at 8 bits
        return model
    tied.share_tied_lm_head(model, head, refs)  # int8 per channel on the shared table
    return model


def vision_precision(precision: str, options: dict[str, Any]) -> str:
    """The vision encoder's precision: option ``vision_precision``, else the plan's."""
    chosen = options.get("vision_precision")
    return chosen or ("fp16" if precision == "fp16" else "fp32")


def tolerance(precision: str, options: dict[str, Any]) -> Tolerance:
    """The parity limits of an export: the precision's, with the int8 vision floor when the
    vision encoder is int8 (its answer accuracy is checked on its own, see ``validate``)."""
    tol = TOLERANCES[precision]
    vision = vision_precision(precision, options)
    if vision == "fp16" and precision != "fp16":  # the fp16 limits for what the tower feeds
        tol = loosened(tol, TOLERANCES["fp16"], token_exact=False)
    if vision == "int8":
        # image prompts' logits and greedy tokens now carry the int8 tower's error too: the
        # int8 floors for them, and the answers on the eval set (required) are the gate
        tol = loosened(
            tol, TOLERANCES["int8"], vision_max_rel=None, vision_cosine=VISION_INT8_COSINE,
            token_exact=False,
        )  # fmt: skip
    return tol
