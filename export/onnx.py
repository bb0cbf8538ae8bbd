"""ONNX export of LLaVA-family VLMs: three graphs that onnxruntime drives.

Artifact layout (the graph names and I/O names nanoLLaVA-style exports use)::

    vision_encoder.onnx          pixel_values (B, 3, H, W) -> image_features (B, N, D_text)
    embed_tokens.onnx            input_ids (B, L) -> inputs_embeds (B, L, D_text)
    decoder_model_merged.onnx    inputs_embeds, attention_mask (B, P + L), position_ids,
                                 logits_index (K,) positions whose logits are wanted,
                                 past_key_values.{i}.key/value (B, kv_heads, P, head_dim)
                                 -> logits (B, K, V),
                                    present.{i}.key/value (B, kv_heads, P + L, head_dim)
    shared_embedding.data        int8/int4 with tied embeddings: the int8 table + scales, stored
                                 once, external data of both embed_tokens and the decoder
    edgekd_onnx.json             edgekd's description of the graphs: I/O names, sizes, ids
    tokenizer + processor files  so runtimes need no checkpoint

The decoder is one graph for prefill and decode (``P`` may be 0). Only the positions in
``logits_index`` go through the lm_head: generation asks for the last one (a 151,936-word head
over every prompt token would cost a quarter of a 0.5B prefill's FLOPs and a 0.5 GB logits
tensor), parity for all. The vision encoder is the tower at the configured feature layer and
select strategy followed by the projector.

Why ``torch.onnx.export`` (dynamo) and not optimum: optimum-onnx cannot export LLaVA ("custom
or unsupported architecture") and pins ``transformers<4.58``, while edgekd runs on transformers
5.x, whose checkpoints load into 4.57 with a silently re-initialised vision tower. torch.onnx
exports vision + projector and the decoder with its KV cache, and onnxruntime reproduces
``generate`` token for token (measured, and checked by every export's parity step).
Which decoders and towers are taken is declared in :mod:`edgekd.export.family` (shared with the
GGUF writer); the graph facts (I/O names, dynamic axes, tolerances, what each precision stores)
are declared as data below, optimum-style.

Which runtimes open the artifact: onnxruntime (CPU, CUDA, TensorRT execution providers) through
edgekd's backend, or any program that feeds the three graphs as ``edgekd_onnx.json`` describes.
onnxruntime-genai does not: its vision-language model types are a fixed list without LLaVA,
and its parser refuses any key it does not know, so the description is edgekd's own format
rather than a ``genai_config.json`` that would not load.

Precisions: fp32; fp16 (weights and compute, fp32 graph I/O, norms and softmax fp32); int8
(8-bit weights in blocks of ``int8_block_size``, default 32, see :data:`INT8_SCHEMES`) and int4
(MatMulNBits, ``int4_block_size``, default 32, weights chosen by GPTQ on calibration prompts:
:mod:`edgekd.export.gptq`, option ``int4_method``) for the decoder, with the lm_head kept int8
(per-token activation scales) and the embedding table int8 per row; the vision encoder
stays fp32 in int8/int4 unless option ``vision_precision`` says otherwise (``int8``: see
:data:`VISION_PLANS`; its answer accuracy is measured and enforced on ``--eval-data``).
With tied embeddings the int8 table and its per-row scales are stored once, in
``shared_embedding.data``, which both ``embed_tokens.onnx`` and the decoder's lm_head
reference as ONNX external data (see :data:`SHARED_PLAN`); an untied model gets its own int8
lm_head. See :data:`PLANS`; the manifest records the same per component.

Opset (option ``opset``, default 23; ``--option opset=18`` for onnxruntime < 1.23, and the
TensorRT target builds from opset 18): from 23 the graphs use ONNX's own ``RMSNormalization``,
``RotaryEmbedding`` and ``Attention`` ops, and the decoder's attention is traced with grouped
key/value heads (:func:`_gqa_attention`), so a decode step reads the KV cache once instead of
copying it per query head (measured in docs/performance.md, "Runtime speed on CPU").
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import artifact, targets
from edgekd.export import gptq, onnx_parity, parity
from edgekd.export import onnx_graph as g
from edgekd.export import onnx_tied as tied
from edgekd.export.base import ExportConfig, ExportError, Registered
from edgekd.export.family import family_problems
from edgekd.export.onnx_precision import (  # noqa: F401 - the precision plans, re-exported
    GQA_OPSET,
    INT4_METHODS,
    INT8_SCHEMES,
    OPTIONS,
    PLANS,
    SHARED_PLAN,
    TOLERANCES,
    VISION_INT8_COSINE,
    VISION_INT8_DYNAMIC,
    VISION_INT8_MAX_DROP,
    VISION_PLANS,
    PrecisionPlan,
    convert,
    option_problems,
    tolerance,
    vision_precision,
)
from edgekd.export.onnx_trace import (  # noqa: F401 - the graph specs, re-exported
    DECODER,
    EMBED,
    GQA_ENV,
    GRAPHS,
    TRACE,
    VISION,
    GraphSpec,
    _gqa_attention,
    _trace,
)
from edgekd.io import atomic_write_json
from edgekd.models.dims import TextDims
from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

log = logging.getLogger(__name__)

# ---- the exporter -------------------------------------------------------------------------


class OnnxExporter(Registered):
    """``torch.onnx`` (dynamo) export to three graphs, then fp16 / int8 / int4 passes."""

    target = "onnx"

    def check(self, vlm, config: ExportConfig) -> None:
        """Refuse unsupported architectures, options and missing packages, all at once."""
        problems = family_problems(vlm.config, "onnx")
        problems += option_problems(config.options, config.eval_data)
        for module, extra in (("onnx", "onnx"), ("onnxruntime", "onnx"), ("onnxscript", "onnx")):
            try:
                __import__(module)
            except ImportError:
                problems.append(f"the onnx target needs '{module}': pip install 'edgekd[{extra}]'")
        if problems:
            raise ExportError("; ".join(problems))

    def export(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Trace the three graphs, convert them to ``config.precision``, write the artifact.

        One graph at a time (trace, convert, save, release), so peak memory is the model plus
        one graph's copies, not three.
        """
        options = {**OPTIONS, **config.options}
        n_layers = vlm.config.text_config.num_hidden_layers
        files, facts, head = {}, {}, ""
        # Tied table at int8/int4: quantized once, written once, read by embed and lm_head.
        table = _tied_table(vlm) if config.precision in ("int8", "int4") else None
        refs = tied.write_shared_table(out / tied.SHARED_DATA, *table) if table else None
        del table
        blocks, calibration = _gptq_blocks(vlm, config, options)
        for spec in GRAPHS:
            model = _trace(vlm, spec, n_layers, options["opset"])
            if spec is DECODER:
                baked = g.bake_transposed_weights(model)  # before any quantizer sees the head
                head = g.head_matmul(model)
                if refs:
                    _check_tied_head(vlm, model, head)
            model = convert(
                spec.component, model, config.precision, options, head, refs,
                blocks if spec is DECODER else None,
            )  # fmt: skip
            if spec is DECODER:
                facts = _graph_facts(model, baked, head)
            files[spec.component] = g.save(model, out / spec.file)
            del model
        vlm.processor.save_pretrained(out)
        _write_onnx_config(vlm, out, n_layers)
        return _components(
            config.precision, options, files, out, facts, shared=bool(refs),
            calibration=calibration,
        )  # fmt: skip

    def validate(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Compare the artifact with PyTorch (:mod:`edgekd.export.parity`, plus the onnx
        checks of :mod:`edgekd.export.onnx_parity`)."""
        options = {**OPTIONS, **config.options}
        tol = tolerance(config.precision, options)
        backend = OnnxRuntimeBackend(out, verify=False)  # manifest.json is written after this
        cases = parity.cases(vlm, config)
        first = next((c for c in cases if c.pixel_values is not None), cases[0])
        checks = {
            "preprocessing": lambda: onnx_parity.check_preprocessing(backend, cases),
            "kv_cache": lambda: onnx_parity.check_kv_cache(vlm, backend, first, tol),
        }
        if vision_precision(config.precision, options) == "int8" and config.eval_data:
            checks["vision_accuracy"] = lambda: parity.check_vision_accuracy(
                vlm, backend, config, VISION_INT8_MAX_DROP
            )
        try:
            return parity.validate(
                vlm, backend, config, tol, target_checks=checks, parity_cases=cases
            )
        finally:
            backend.close()


# ---- precisions ---------------------------------------------------------------------------


def _gptq_blocks(vlm, config: ExportConfig, options: dict[str, Any]):
    """int4 with ``int4_method=gptq``: the decoder's weight blocks and what calibrated them."""
    if config.precision != "int4" or options["int4_method"] != "gptq":
        return None, None
    return gptq.calibrate(
        vlm, config, options["calibration_data"], options["calibration_samples"],
        grid="zero_point", group=options["int4_block_size"],
    )  # fmt: skip


def _tied_table(vlm):
    """``(q_T [hidden, vocab] int8, scale [vocab] fp32)`` of a tied embedding, else ``None``.

    Tied = the lm_head has no bias and its weight is the embedding's (the same tensor, as
    ``tie_word_embeddings`` makes it, or an equal one).
    """
    import torch

    embed = vlm.language_model.get_input_embeddings().weight
    head = vlm.lm_head
    if getattr(head, "bias", None) is not None or head.weight.shape != embed.shape:
        return None
    if head.weight is not embed and not torch.equal(head.weight, embed):
        return None
    q, scale = g.quantize_rows_int8(embed.detach().float().cpu().numpy())
    return np.ascontiguousarray(q.T), scale


def _check_tied_head(vlm, model, head: str) -> None:
    """The traced lm_head multiplies by the embedding table (transposed), or the export stops."""
    embed = vlm.language_model.get_input_embeddings().weight.detach().float().cpu().numpy()
    if not np.array_equal(tied.head_weight(model, head), embed.T):
        raise ExportError(
            f"the lm_head '{head}' of the traced decoder is not the tied embedding table; "
            "cannot share one int8 copy"
        )


def _graph_facts(model, baked: list[str], head: str) -> dict[str, Any]:
    """What the manifest records of the converted decoder (read before saving it)."""
    left = g.float_weights(model, 100_000)
    ops = ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")
    return {
        "lm_head_node": head,
        "baked_transposes": baked,
        "float_weights_over_1e5": [[name, list(dims)] for name, dims in left],
        "ops": {op: g.count_ops(model, op) for op in ops},
    }


def _components(
    precision, options, files, out: Path, decoder_facts, shared: bool = False, calibration=None
) -> dict[str, Any]:
    calibration = calibration or {}
    plan = asdict(PLANS[precision])
    vision = vision_precision(precision, options)
    plan["vision"] = VISION_PLANS[vision].format(
        block=options["int8_block_size"], level=options["int8_accuracy_level"]
    )
    if vision == "int8" and options["int8_scheme"] == "dynamic":
        plan["vision"] = VISION_INT8_DYNAMIC
    if shared:
        plan.update(embed=SHARED_PLAN["embed"], lm_head=SHARED_PLAN["lm_head"])
    components = {
        spec.component: {"files": files[spec.component], "precision": plan[spec.component]}
        for spec in GRAPHS
    }
    components["decoder"]["precision"] = plan["decoder"].format(
        block=options["int4_block_size"],
        level=options["int4_accuracy_level"],
        int4=INT4_METHODS[options["int4_method"]].format(
            samples=calibration.get("samples"),
            source="synthetic image" if calibration.get("source") == "synthetic" else "LLaVA-JSON",
        ),
        int8=INT8_SCHEMES[options["int8_scheme"]].format(
            block=options["int8_block_size"], level=options["int8_accuracy_level"]
        ),
    )
    components["decoder"].update({"lm_head": plan["lm_head"], **decoder_facts})
    if calibration:
        components["decoder"]["calibration"] = calibration
    if shared:  # one file, one component; embed and decoder reference it
        components["shared_embedding"] = {
            "files": [tied.SHARED_DATA],
            "precision": SHARED_PLAN["table"],
            "tensors": [tied.SHARED_TABLE, tied.SHARED_SCALE],
            "used_by": ["embed", "decoder"],
        }
        for name in ("embed", "decoder"):
            components[name]["shares"] = tied.SHARED_DATA
    tokenizer_files = sorted(
        p.name
        for p in out.iterdir()
        if p.suffix in (".json", ".jinja") and p.name != targets.ONNX_CONFIG
    )
    components["tokenizer"] = {"files": tokenizer_files, "precision": "n/a"}
    components["onnx_config"] = {"files": [targets.ONNX_CONFIG], "precision": "n/a"}
    return components


# ---- edgekd_onnx.json ----------------------------------------------------------------------


def _write_onnx_config(vlm, out: Path, n_layers: int) -> None:
    """edgekd's description of the graphs and ids, read by its onnxruntime backend."""
    dims = TextDims.from_config(vlm.config.text_config)
    pre = artifact.preprocessing(vlm)
    context = dims.context
    decoder_inputs = {
        "inputs_embeds": "inputs_embeds",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "logits_index": "logits_index",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    decoder_outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    config = {
        "model": {
            "format": "edgekd-onnx/1",
            "text_model_type": vlm.config.text_config.model_type,
            "vision_model_type": vlm.config.vision_config.model_type,
            "bos_token_id": vlm.tokenizer.bos_token_id,
            "eos_token_id": pre["eos_token_ids"],
            "pad_token_id": pre["pad_token_id"],
            "image_token_id": vlm.image_token_id,
            "vocab_size": vlm.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": DECODER.file,
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden,
                "num_attention_heads": dims.heads,
                "num_hidden_layers": dims.layers,
                "num_key_value_heads": dims.kv_heads,
                "inputs": decoder_inputs,
                "outputs": decoder_outputs,
                "kv_cache_layout": "batch, kv_heads, sequence, head",
                "kv_cache_dtype": "float32",
            },
            "embedding": {
                "filename": EMBED.file,
                "inputs": {"input_ids": "input_ids"},
                "outputs": {"embeddings": "inputs_embeds"},
            },
            "vision": {
                "filename": VISION.file,
                "inputs": {"pixel_values": "pixel_values"},
                "outputs": {"image_features": "image_features"},
                "image_size": pre["image_size"],
                "image_mean": pre["image_mean"],
                "image_std": pre["image_std"],
                "rescale_factor": pre["rescale_factor"],
                "num_image_tokens": pre["image_tokens_per_image"],
                "feature_layer": vlm.config.vision_feature_layer,
                "select_strategy": vlm.config.vision_feature_select_strategy,
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "past_present_share_buffer": False,
        },
    }
    atomic_write_json(out / targets.ONNX_CONFIG, config)
