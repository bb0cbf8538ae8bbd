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
(MatMulNBits, ``int4_block_size``, default 32) for the decoder, with the lm_head kept int8
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

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import artifact, targets
from edgekd.export import onnx_graph as g
from edgekd.export import onnx_parity, parity
from edgekd.export import onnx_tied as tied
from edgekd.export.base import ExportConfig, ExportError, Registered
from edgekd.export.family import family_problems
from edgekd.export.onnx_precision import (  # noqa: F401 - the precision plans, re-exported
    GQA_OPSET,
    INT8_SCHEMES,
    OPTIONS,
    PLANS,
    SHARED_PLAN,
    TOLERANCES,
    VISION_INT8_COSINE,
    VISION_INT8_MAX_DROP,
    VISION_PLANS,
    PrecisionPlan,
    convert,
    option_problems,
    tolerance,
    vision_precision,
)
from edgekd.io import atomic_write_json
from edgekd.models.dims import TextDims
from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

# ---- per-architecture facts ---------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the artifact; ``{i}`` in a name expands to every decoder layer."""

    component: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def names(self, which: str, num_layers: int) -> list[str]:
        return _expand(getattr(self, which), num_layers)

    def axes(self, name: str) -> dict[int, str]:
        return self.dynamic_axes.get(_template(name), {})


VISION = GraphSpec(
    "vision",
    targets.ONNX_VISION,
    ("pixel_values",),
    ("image_features",),
    {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
)
EMBED = GraphSpec(
    "embed",
    targets.ONNX_EMBED,
    ("input_ids",),
    ("inputs_embeds",),
    {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
    },
)
DECODER = GraphSpec(
    "decoder",
    targets.ONNX_DECODER,
    (
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "logits_index",
        "past_key_values.{i}.key",
        "past_key_values.{i}.value",
    ),
    ("logits", "present.{i}.key", "present.{i}.value"),
    {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits_index": {0: "logits_length"},
        "past_key_values.{i}.key": {0: "batch_size", 2: "past_sequence_length"},
        "past_key_values.{i}.value": {0: "batch_size", 2: "past_sequence_length"},
        "logits": {0: "batch_size", 1: "logits_length"},
        "present.{i}.key": {0: "batch_size", 2: "total_sequence_length"},
        "present.{i}.value": {0: "batch_size", 2: "total_sequence_length"},
    },
)
GRAPHS = (VISION, EMBED, DECODER)

# Trace sizes: distinct and >= 2, so torch.export neither specialises nor equates the axes.
TRACE = {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5, "logits_length": 4}


# fp32 differences come from summation order (measured ~1e-6 relative); an off-by-one decode
# position on the tiny model is ~2e-3. int8/int4 keep the vision encoder fp32 unless the
# vision_precision option says otherwise (then tolerance() adapts these).
GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa attention at call time


def _template(name: str) -> str:
    parts = name.split(".")
    return ".".join("{i}" if p.isdigit() else p for p in parts)


def _expand(names: tuple[str, ...], num_layers: int) -> list[str]:
    """Fixed names first, then the per-layer names interleaved layer by layer (k0, v0, k1, ...)."""
    fixed = [n for n in names if "{i}" not in n]
    per_layer = [n for n in names if "{i}" in n]
    return fixed + [n.format(i=i) for i in range(num_layers) for n in per_layer]


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
        for spec in GRAPHS:
            model = _trace(vlm, spec, n_layers, options["opset"])
            if spec is DECODER:
                baked = g.bake_transposed_weights(model)  # before any quantizer sees the head
                head = g.head_matmul(model)
                if refs:
                    _check_tied_head(vlm, model, head)
            model = convert(spec.component, model, config.precision, options, head, refs)
            if spec is DECODER:
                facts = _graph_facts(model, baked, head)
            files[spec.component] = g.save(model, out / spec.file)
            del model
        vlm.processor.save_pretrained(out)
        _write_onnx_config(vlm, out, n_layers)
        return _components(config.precision, options, files, out, facts, shared=bool(refs))

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


# ---- tracing ------------------------------------------------------------------------------


def _modules(vlm):
    """torch wrappers with one forward per graph (built lazily: torch imports stay inside)."""
    import torch
    from transformers import DynamicCache

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.projector = vlm.vision_tower, vlm.projector

        def forward(self, pixel_values):
            return vlm.project(vlm.vision_features(pixel_values))

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = vlm.language_model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = vlm.language_model, vlm.lm_head

        def forward(
            self, inputs_embeds, attention_mask, position_ids, logits_index, past_key_values
        ):
            cache = DynamicCache(config=vlm.config.text_config)
            for i in range(len(past_key_values) // 2):
                cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
            out = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            # the lm_head runs only where logits are asked for: a prompt's last position when
            # generating (a 150k-word head over every prompt token is a quarter of a prefill)
            hidden = out.last_hidden_state.index_select(1, logits_index)
            return (self.lm_head(hidden), *present)

    return {"vision": Vision(), "embed": Embed(), "decoder": Decoder()}


def _sample_inputs(vlm, spec: GraphSpec, n_layers: int):
    import torch

    b, seq, past = TRACE["batch_size"], TRACE["sequence_length"], TRACE["past_sequence_length"]
    tc, vc = vlm.config.text_config, vlm.config.vision_config
    if spec is VISION:
        return (torch.randn(b, 3, vc.image_size, vc.image_size),)
    if spec is EMBED:
        return (torch.randint(0, vlm.vocab_size, (b, seq)),)
    dims = TextDims.from_config(tc)
    cache = [torch.randn(b, dims.kv_heads, past, dims.head_dim) for _ in range(2 * n_layers)]
    mask = torch.ones(b, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(b, seq)
    index = torch.arange(TRACE["logits_length"]) % seq
    return (torch.randn(b, seq, tc.hidden_size), mask, positions, index, cache)


def _dynamic_shapes(spec: GraphSpec, n_layers: int) -> tuple:
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def axes(name: str) -> dict[int, Any]:
        return {k: dims.setdefault(v, Dim(v)) for k, v in spec.axes(name).items()}

    # The per-layer inputs (the KV cache) are one list argument of the traced forward.
    names = spec.names("inputs", n_layers)
    n_fixed = sum("{i}" not in n for n in spec.inputs)
    shapes: list[Any] = [axes(n) for n in names[:n_fixed]]
    if n_fixed < len(names):
        shapes.append([axes(n) for n in names[n_fixed:]])
    return tuple(shapes)


def _trace(vlm, spec: GraphSpec, n_layers: int, opset: int):
    """``torch.onnx.export`` (dynamo) of one graph; returns the ``onnx.ModelProto``."""
    import torch

    module = _modules(vlm)[spec.component].eval()
    with torch.no_grad(), g.quiet(), _gqa_attention(opset):
        program = torch.onnx.export(
            module,
            _sample_inputs(vlm, spec, n_layers),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(spec, n_layers),
            input_names=spec.names("inputs", n_layers),
            output_names=spec.names("outputs", n_layers),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    _name_dims(model, spec, n_layers)
    g.strip_metadata(model)
    g.name_nodes(model)
    return model


@contextlib.contextmanager
def _gqa_attention(opset: int) -> Iterator[None]:
    """From opset 23, trace attention with ``enable_gqa`` (no ``repeat_kv``).

    transformers' sdpa attention repeats the key/value heads up to the query heads
    (``repeat_kv``: an Expand of the whole cache, per layer and per step, in the graph) unless
    ``TRANSFORMERS_SDPA_FORCE_GQA`` is set; then it passes ``enable_gqa=True`` and torch.onnx
    writes one ``Attention`` op that reads the kv heads as they are. Below opset 23 that op does
    not exist (torch.onnx would repeat the heads itself), so nothing changes there.
    """
    if opset < GQA_OPSET:
        yield
        return
    previous = os.environ.get(GQA_ENV)
    os.environ[GQA_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(GQA_ENV, None)
        else:
            os.environ[GQA_ENV] = previous


def _name_dims(model, spec: GraphSpec, n_layers: int) -> None:
    """Give graph I/O the declared axis names (torch names derived axes 'a + b')."""
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, name in spec.axes(value.name).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name


# ---- precisions ---------------------------------------------------------------------------


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
    precision, options, files, out: Path, decoder_facts, shared: bool = False
) -> dict[str, Any]:
    plan = asdict(PLANS[precision])
    plan["vision"] = VISION_PLANS[vision_precision(precision, options)]
    if shared:
        plan.update(embed=SHARED_PLAN["embed"], lm_head=SHARED_PLAN["lm_head"])
    components = {
        spec.component: {"files": files[spec.component], "precision": plan[spec.component]}
        for spec in GRAPHS
    }
    components["decoder"]["precision"] = plan["decoder"].format(
        block=options["int4_block_size"],
        level=options["int4_accuracy_level"],
        int8=INT8_SCHEMES[options["int8_scheme"]].format(
            block=options["int8_block_size"], level=options["int8_accuracy_level"]
        ),
    )
    components["decoder"].update({"lm_head": plan["lm_head"], **decoder_facts})
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
