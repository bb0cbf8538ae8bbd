"""GGUF export for llama.cpp: ``model.gguf`` (language model) + ``mmproj.gguf`` (vision).

``model.gguf`` holds the text decoder in the llama.cpp architecture its family declares
(:mod:`edgekd.export.family`: ``qwen2``, ``llama`` for Llama and Mistral-style configs,
``gemma``) with a byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``), merges,
special-token ids and the checkpoint's chat template. ``mmproj.gguf`` holds the vision tower
(SigLIP; CLIP with ``v.class_embd`` and ``v.pre_ln``; DINOv2 with ``v.class_embd`` and its
LayerScale folded) and the two-layer MLP projector in
llama.cpp's legacy image-encoder format (``general.architecture = "clip"``,
``clip.projector_type = "mlp"``), which llama-cpp-python's multimodal handler loads.

Facts this module relies on, read from the llama.cpp sources vendored in llama-cpp-python 0.3.36
(``tools/mtmd/clip.cpp``, ``clip-impl.h``, ``models/llava.cpp``, ``src/llama-quant.cpp``):

* The vision graph runs blocks ``0 .. L-1`` and takes the hidden state *before* block ``L`` for
  each ``L`` in ``clip.vision.feature_layer`` (non-negative, HF ``hidden_states[L]``); without
  that key it stops at ``block_count - 1``. ``v.post_ln`` is applied if present, so it is never
  written: HF's ``hidden_states`` are taken before SigLIP's ``post_layernorm``.
* clip.cpp skips a real class token itself (``v.class_embd``: CLIP, DINOv2; in the order the
  installed llama.cpp is measured to have, :mod:`edgekd.export.gguf_probe`), but with no class
  embedding it keeps every patch (``patch_offset = 0``): it cannot drop a SigLIP tower's first
  patch, as the ``default`` strategy (TinyLLaVA's ``patch``) does. The projector is token-wise
  and the drop comes after the encoder, so clip's rows minus the first are the model's visual
  tokens exactly: the mmproj is written as for ``full``, the drop is recorded in the manifest
  (``vision.drop_first_tokens``) and the mmproj (``edgekd.vision.drop_first_tokens``), and
  edgekd's llama.cpp backend drops the row and feeds the rest as embeddings. Stock llama.cpp
  tools feed every row (one extra visual token); the exporter measures what that costs.
* The MLP projector applies ``ggml_gelu`` (tanh approximation, an fp16 lookup table on CPU)
  between ``mm.0`` and ``mm.2``; HF's ``gelu`` is the erf form, so image embeddings carry a
  small, measured approximation error.
* clip.cpp swaps ``ffn_up``/``ffn_down`` of mlp-projector files whose ``ffn_down`` rows equal
  the embedding size (old converters named them the wrong way round): a square vision MLP is
  therefore written swapped, so that the loader swaps it back.
* K-quants need row sizes that are multiples of 256; llama.cpp falls back (Q4_K -> Q5_0,
  Q6_K -> Q8_0; the tied output/embedding matrix -> Q8_0) and we record which tensors did.
* Our byte-level BPE (``ByteLevel(use_regex=True)``, GPT-2's split regex) is reproduced id for
  id by llama.cpp's ``gpt-2`` pre-tokenizer; ``default``, ``qwen2`` and ``llama-bpe`` are not
  (tests/export/test_gguf_export.py checks all four). SentencePiece-style vocabularies (BPE
  over ``▁`` words with ``<0xXX>`` byte fallback) go to llama.cpp's SPM tokenizer
  (``tokenizer.ggml.model = "llama"``), which merges by token score: scores are minus the rank
  of the merge making each token (see :func:`edgekd.export.gguf_write.tokenizer_model`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from edgekd import artifact
from edgekd.export import gptq
from edgekd.export.base import ExportConfig, ExportError, Registered
from edgekd.export.family import family_problems, gguf_drop_rows, text_arch, vision_arch
from edgekd.export.gguf_probe import check_class_token_order
from edgekd.export.gguf_read import check_written, quant_report
from edgekd.export.gguf_validate import smoke_test, stock_feed, tolerance, validate
from edgekd.export.gguf_write import (
    LLAMA_CPP_USE,
    PRECISIONS,
    feature_layers,
    import_gguf,
    projector_scale,
    quantize,
    tokenizer_model,
    vocabulary,
    write_lm,
    write_mmproj,
)
from edgekd.export.parity import Tolerance
from edgekd.runtime.llamacpp import import_llama_cpp
from edgekd.targets import GGUF_MMPROJ as MMPROJ_FILE
from edgekd.targets import GGUF_MODEL as MODEL_FILE

log = logging.getLogger(__name__)


OPTIONS = {
    "vision_precision": "f32 or f16 for mmproj.gguf (default: f32 for f32 exports, else f16)",
    "calibration_data": "LLaVA JSON of GPTQ's prompts (q4_0, iq4_nl; default: synthetic)",
    "calibration_samples": f"GPTQ's prompts (q4_0, iq4_nl; default {gptq.CALIBRATION_SAMPLES})",
    "n_threads": "threads for quantization and validation (default: llama.cpp's choice)",
    "atol": "override the logits max-abs tolerance of this precision",
}


# ---- configuration checks --------------------------------------------------------------------
def config_problems(vlm, precision: str, options: dict[str, Any]) -> list[str]:
    """Everything about this model and config the GGUF format or llama.cpp cannot express."""
    cfg, problems = vlm.config, []
    if precision not in PRECISIONS:
        problems.append(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        problems.append(f"unknown option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    if options.get("vision_precision", "f16") not in ("f16", "f32"):
        problems.append(f"option vision_precision '{options['vision_precision']}'; valid: f16, f32")
    problems += _number_problems(options, {"atol": float, "n_threads": int})
    problems += gptq.calibration_problems(options)
    quant = PRECISIONS.get(precision)
    if quant is not None and quant.grid is not None:
        odd = sorted({m.in_features for _, m in gptq.linears(vlm) if m.in_features % quant.block})
        if odd:
            problems.append(
                f"{precision} needs rows of whole {quant.block}-weight blocks; the language "
                f"model has matrices {odd} inputs wide (use q8_0, f16 or f32)"
            )
    problems += family_problems(cfg, "gguf")
    problems += _size_problems(vlm)
    try:
        feature_layers(vlm)
    except ExportError as e:
        problems.append(str(e))
    problems.extend(tokenizer_problems(vlm.tokenizer))
    return problems


def _size_problems(vlm) -> list[str]:
    """clip.cpp encodes at the mmproj's image size with the stored position table; a tower
    whose processor feeds another size (transformers resamples the table per call) has no
    exact mmproj."""
    vc = vlm.config.vision_config
    size = artifact.image_size(vlm.processor.image_processor)[:2]
    if list(size) == [vc.image_size, vc.image_size]:
        return []
    return [
        f"the processor makes {size[0]}x{size[1]} images but the vision tower's image_size is "
        f"{vc.image_size} (transformers resamples its position table per call, clip.cpp "
        f"cannot): re-assemble it at --image-size {size[0]} (edgekd models assemble), or "
        "export with --target onnx"
    ]


def _number_problems(options: dict[str, Any], kinds: dict[str, type]) -> list[str]:
    """Each of ``kinds`` given in ``options`` must be a finite number > 0 of its kind."""
    problems = []
    for key, kind in kinds.items():
        if key not in options:
            continue
        value = options[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (kind is float or isinstance(value, int))
        if not ok or not math.isfinite(value) or value <= 0:
            what = "an integer" if kind is int else "a number"
            problems.append(f"option {key} {value!r} must be {what} > 0")
    return problems


def tokenizer_problems(tokenizer) -> list[str]:
    try:
        tokenizer_model(tokenizer)
    except ExportError as e:
        return [str(e)]
    return []


# max_rel: max-abs logits difference per unit of the largest reference logit (absolute below
# 1). Measured on the tiny model: f32 1.8e-4, f16 4.1e-4, q8_0 9.7e-3, q4_k_m 3.1e-2 max-abs
# on text prompts; the visual tokens carry clip's GELU approximations, so image prompts get
# twice that room. vision_cosine follows the mmproj's precision (gguf_validate.tolerance).
TOLERANCES = {
    "f32": Tolerance(logits_max_rel=4e-3, logits_cosine=0.99999, token_exact=True),
    "f16": Tolerance(logits_max_rel=2e-2, logits_cosine=0.9999),
    # q8_0 holds the same floor as ONNX int8 (8-bit weights in blocks of 32, activations
    # quantized per block): on SmolLM2 q8_0 moves the next-token distribution half as much
    # as ONNX int8 does (KL 0.0076 against 0.0153, top-1 0.973 / 0.974, centered cosine_min
    # 0.995 / 0.990), and the tiny model's 0.999 refused it (docs/performance.md, "Real weights")
    "q8_0": Tolerance(logits_max_rel=0.16, logits_cosine=0.99, max_accuracy_drop=0.03),
    "q4_k_m": Tolerance(logits_max_rel=0.6, logits_cosine=0.97, max_accuracy_drop=0.05),
    # the ONNX int4 floor (4-bit weights in blocks of 32, GPTQ on both)
    "q4_0": Tolerance(logits_max_rel=0.6, logits_cosine=0.95, max_accuracy_drop=0.05),
    # the same bits, the same floor
    "iq4_nl": Tolerance(logits_max_rel=0.6, logits_cosine=0.95, max_accuracy_drop=0.05),
    # 8 significant bits (f16: 11), the 8-bit floor: on the real teacher bf16 moves the
    # next-token distribution less than the accepted q8_0 (KL 0.0030 against 0.0073, top-1
    # 1.00 / 0.95) yet its text logits reach only 0.9984 centered cosine, so f16's or ONNX
    # fp16's 0.999 refused it (docs/performance.md, "Real weights")
    "bf16": Tolerance(logits_max_rel=0.16, logits_cosine=0.99, max_accuracy_drop=0.03),
}


class GgufExporter(Registered):
    """The ``gguf`` target: llama.cpp files for the language model and the vision part."""

    target = "gguf"
    tolerances = TOLERANCES

    def check(self, vlm, config: ExportConfig) -> None:
        problems = config_problems(vlm, config.precision, config.options)
        if problems:
            raise ExportError("gguf export refused: " + "; ".join(problems))
        import_gguf()
        import_llama_cpp(ExportError, LLAMA_CPP_USE)
        self.class_token_order(vlm)

    def class_token_order(self, vlm) -> dict[str, Any] | None:
        """The installed llama.cpp's class-token order, for a tower that has one (measured
        once per process; a shifted llama.cpp raises ExportError)."""
        if not vision_arch(vlm.config).class_token:
            return None
        return check_class_token_order(vlm.config.vision_config.model_type)

    def vision_precision(self, config: ExportConfig) -> str:
        default = "f32" if config.precision == "f32" else "f16"
        return config.options.get("vision_precision", default)

    def export(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        p, model = config.precision, out / MODEL_FILE
        quant = PRECISIONS[p]
        by_llama_cpp = quant is not None and quant.ftype is not None
        source = out / (".model-f32.gguf" if by_llama_cpp else MODEL_FILE)
        blocks, calibration = self._gptq(vlm, config, quant)
        try:
            tensors = write_lm(
                vlm, source, "f16" if p == "f16" else "f32", blocks,
                quant.file_type if blocks is not None else None,
            )  # fmt: skip
            log.info("✓ %s written (%s, %d tensors)", source.name, p, len(tensors))
            if by_llama_cpp:
                quantize(source, model, p, config.options.get("n_threads"))
                log.info("✓ quantized to %s", p)
        finally:
            if source != model:
                source.unlink(missing_ok=True)
        lm_table = check_written(model, tensors, "language-model")
        vdtype = self.vision_precision(config)
        vtensors, n_blocks = write_mmproj(vlm, out / MMPROJ_FILE, vdtype)
        v_table = check_written(out / MMPROJ_FILE, vtensors, "vision")
        log.info("✓ %s written (%s, %d tensors)", MMPROJ_FILE, vdtype, len(vtensors))
        smoke = smoke_test(vlm, out, config.options.get("n_threads"))
        log.info("✓ smoke test: %d visual tokens from mmproj", smoke["image_tokens"])
        vocab = vocabulary(vlm)
        return {
            "language_model": {
                "files": [MODEL_FILE],
                "precision": p,
                "architecture": text_arch(vlm.config).gguf_arch,
                "tokenizer": tokenizer_model(vlm.tokenizer),
                "vocab": {"tokenizer": vocab["n_tokenizer"], "gguf": len(vocab["tokens"])},
                "n_tensors": len(lm_table),
                "bytes": model.stat().st_size,
                **quant_report(lm_table, p),
                **({"calibration": calibration} if calibration else {}),
            },
            "vision": {
                "files": [MMPROJ_FILE],
                "precision": vdtype,
                "format": "clip (legacy mmproj)",
                "projector_type": "mlp",
                "feature_layers": feature_layers(vlm),
                "tower": vlm.config.vision_config.model_type,
                "select_strategy": vlm.config.vision_feature_select_strategy,
                # rows of clip's output the backend drops (mmproj key GGUF_DROP_KEY)
                "drop_first_tokens": gguf_drop_rows(vlm.config),
                "projector_scale": projector_scale(vlm),
                "blocks_written": n_blocks,
                "llama_cpp_class_token": self.class_token_order(vlm),
                "image_resample": int(getattr(vlm.processor.image_processor, "resample", 3)),
                "n_tensors": len(v_table),
                "bytes": (out / MMPROJ_FILE).stat().st_size,
                "tensor_types": {n: i["type"] for n, i in v_table.items()},
                "smoke_test": smoke,
            },
        }

    def _gptq(self, vlm, config: ExportConfig, quant):
        """GPTQ blocks of the decoder's matrices for an edgekd-written precision (``q4_0``,
        ``iq4_nl``)."""
        if quant is None or quant.grid is None:
            return None, None
        data = config.options.get("calibration_data")
        samples = config.options.get("calibration_samples", gptq.CALIBRATION_SAMPLES)
        return gptq.calibrate(vlm, config, data, samples, grid=quant.grid)

    def validate(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        tol = tolerance(TOLERANCES[config.precision], self.vision_precision(config), config.options)
        report = validate(vlm, config, Path(out), tol)
        if gguf_drop_rows(vlm.config):
            stock = report["stock_llama_cpp"] = stock_feed(vlm, config, Path(out))
            if stock["answers_identical"] is not None:
                log.info(
                    "stock llama.cpp tools (every clip row fed): %.0f%% of %d answers "
                    "identical to PyTorch's",
                    100 * stock["answers_identical"],
                    stock["samples"],
                )
        return report
