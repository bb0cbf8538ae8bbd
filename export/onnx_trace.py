"""Tracing the three ONNX graphs of an artifact: what each graph takes and gives (declared as
data) and the ``torch.onnx`` (dynamo) export of one graph to an in-memory ``onnx.ModelProto``.

Read by :mod:`edgekd.export.onnx`, which converts the traced graphs to a precision and writes
the artifact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgekd import targets
from edgekd.export import onnx_graph as g
from edgekd.export.onnx_precision import GQA_OPSET
from edgekd.models.dims import TextDims

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
