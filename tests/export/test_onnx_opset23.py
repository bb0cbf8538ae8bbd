"""ONNX export at opset 23: one Attention op per layer reading the kv heads as they are."""

from __future__ import annotations

import os

import onnx
import pytest

from edgekd.export import ExportConfig, export
from edgekd.export.onnx import GQA_ENV, _gqa_attention


@pytest.fixture(scope="module")
def opset23_artifact(tiny_vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("opset23")
    tiny_vlm.save_pretrained(root / "checkpoint")
    out = root / "fp32"
    config = ExportConfig(
        str(root / "checkpoint"),
        "onnx",
        "fp32",
        out,
        n_parity_prompts=2,
        max_new_tokens=6,
        options={"opset": 23},
    )
    return out, export(config)  # fp32: token-exact greedy parity with PyTorch is required


def test_opset23_decoder_attends_over_the_kv_heads_without_repeating_them(
    opset23_artifact, tiny_vlm
):
    out, manifest = opset23_artifact
    assert manifest["parity"]["passed"] and manifest["options"] == {"opset": 23}
    model = onnx.load(str(out / "decoder_model_merged.onnx"), load_external_data=False)
    layers = tiny_vlm.config.text_config.num_hidden_layers
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == layers
    # key and value inputs are the caches themselves (B, kv_heads, P + L, head_dim): no Expand
    assert [list(n.input[1:3]) for n in attention] == [
        [f"present.{i}.key", f"present.{i}.value"] for i in range(layers)
    ]
    ops = {n.op_type for n in model.graph.node}
    assert {"RMSNormalization", "RotaryEmbedding"} <= ops
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 23


def test_opset23_artifact_decodes_like_pytorch(opset23_artifact, tiny_vlm):
    from PIL import Image

    from edgekd.evaluate import greedy_reference
    from edgekd.runtime.onnxruntime import OnnxRuntimeBackend
    from edgekd.runtime.prompt import encode_prompt

    backend = OnnxRuntimeBackend(opset23_artifact[0], providers=("cpu",), threads=1)
    image, prompt = Image.new("RGB", (90, 70), "teal"), "What shape is it?"
    got = backend.generate(image, prompt, max_new_tokens=10, ignore_eos=True)
    ids, pixels = encode_prompt(tiny_vlm.processor, image, prompt)
    assert got.token_ids == greedy_reference(tiny_vlm, ids, pixels, 10, stop_ids=())


def test_gqa_switch_only_from_opset_23_and_restored(monkeypatch):
    monkeypatch.delenv(GQA_ENV, raising=False)
    with _gqa_attention(18):
        assert GQA_ENV not in os.environ
    with _gqa_attention(23):
        assert os.environ[GQA_ENV] == "1"
    assert GQA_ENV not in os.environ
    monkeypatch.setenv(GQA_ENV, "0")
    with _gqa_attention(23):
        assert os.environ[GQA_ENV] == "1"
    assert os.environ[GQA_ENV] == "0"
