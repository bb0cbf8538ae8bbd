"""The onnxruntime backend: equals PyTorch greedy generation, refuses tampered artifacts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_prompts import PROMPTS, image_for

from edgekd.artifact import ArtifactError
from edgekd.evaluate import greedy_reference
from edgekd.runtime.base import BackendError
from edgekd.runtime.onnxruntime import OnnxRuntimeBackend, resolve_providers
from edgekd.runtime.prompt import encode_prompt


@pytest.fixture(scope="module")
def backend(onnx_fp32_artifact):
    return OnnxRuntimeBackend(onnx_fp32_artifact, providers=("cpu",), threads=1)


def _torch_generate(vlm, image, prompt, max_new_tokens):
    ids, pixels = encode_prompt(vlm.processor, image, prompt)
    return greedy_reference(vlm, ids, pixels, max_new_tokens)


@pytest.mark.parametrize("spec,prompt", PROMPTS)
def test_generate_equals_torch_greedy_token_for_token(backend, tiny_vlm, spec, prompt):
    got = backend.generate(image_for(spec), prompt, max_new_tokens=12)
    assert got.token_ids == _torch_generate(tiny_vlm, image_for(spec), prompt, 12)
    assert got.prompt_tokens > (16 if spec else 0)
    assert got.prefill_ms > 0 and (got.vision_ms > 0) == (spec is not None)
    assert got.text == tiny_vlm.tokenizer.decode(got.token_ids, skip_special_tokens=True).strip()


def test_generate_stops_at_eos(backend, monkeypatch):
    image, prompt = image_for(PROMPTS[0][0]), PROMPTS[0][1]
    first = backend.generate(image, prompt, max_new_tokens=5).token_ids
    assert len(first) == 5
    monkeypatch.setattr(backend, "eos_token_ids", {first[0]})
    assert backend.generate(image, prompt, 5).token_ids == first[:1]  # eos kept, as HF does


def test_decode_steps_through_the_kv_cache_match_a_full_forward(backend, tiny_vlm):
    ids, pixels = backend.encode(image_for(PROMPTS[0][0]), PROMPTS[0][1])
    forced = [5, 77, 300, 12, 9]
    got = backend.incremental_logits(ids, pixels, forced)
    full = torch.from_numpy(np.concatenate([ids, [forced]], axis=1))
    with torch.no_grad():
        ref = tiny_vlm.forward_stages(full, None, torch.from_numpy(pixels))[0, ids.shape[1] - 1 :]
    assert got.shape == ref.shape and np.abs(got - ref.numpy()).max() < 1e-4


def test_preprocessing_and_prompt_logits_match_pytorch(backend, tiny_vlm):
    image, prompt = Image.new("RGB", (90, 70), "teal"), "What shape?"
    ids, pixels = backend.encode(image, prompt)
    ref = tiny_vlm.processor(
        text=[backend_text(backend, prompt)], images=[image], return_tensors="np"
    )
    assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(pixels, ref["pixel_values"])
    with torch.no_grad():
        logits = tiny_vlm.forward_stages(torch.from_numpy(ids), None, torch.from_numpy(pixels))
    assert np.abs(backend.logits(image, prompt) - logits.numpy()).max() < 1e-4


def backend_text(backend, prompt):
    from edgekd.runtime.prompt import render_prompt

    return render_prompt(backend.processor, prompt, has_image=True)


def _copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "artifact")


def test_tampered_file_is_named_at_load(onnx_fp32_artifact, tmp_path):
    root = _copy(onnx_fp32_artifact, tmp_path)
    path = root / "decoder_model_merged.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="'decoder_model_merged.onnx' fails its sha256 check"):
        OnnxRuntimeBackend(root)


def test_truncated_file_is_named_at_load(onnx_fp32_artifact, tmp_path):
    root = _copy(onnx_fp32_artifact, tmp_path)
    path = root / "vision_encoder.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"'vision_encoder.onnx' has \d+ bytes.*truncated"):
        OnnxRuntimeBackend(root)


def test_missing_manifest_is_refused(onnx_fp32_artifact, tmp_path):
    root = _copy(onnx_fp32_artifact, tmp_path)
    (root / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        OnnxRuntimeBackend(root)


def test_providers_by_name_and_missing_gpu_provider_names_the_package():
    import onnxruntime as ort

    assert resolve_providers(("cpu",)) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="valid: cpu, cuda, tensorrt"):
        resolve_providers("tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(
        BackendError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"
    ):
        resolve_providers(("cuda",))


def test_bad_optimization_level_lists_the_valid_ones(onnx_fp32_artifact):
    with pytest.raises(BackendError, match="valid: disable, basic, extended, all"):
        OnnxRuntimeBackend(onnx_fp32_artifact, graph_optimization_level="max")
