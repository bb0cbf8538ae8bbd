"""The fp32 backends agree token for token with TorchBackend, and TorchBackend with HF greedy.

TorchBackend is the reference the exported backends are compared against, so it is pinned
to ``model.generate`` first; then fp32 ONNX and f32 GGUF artifacts must give its exact tokens
for the same (image, prompt). The model is the tiny VLM with weights x4 (``contrast_vlm``),
whose answers depend on the input, so agreement is not two stuck outputs compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_prompts import PROMPTS, image_for

from edgekd.evaluate import greedy_reference
from edgekd.runtime.base import BackendError, Generation
from edgekd.runtime.torch import TorchBackend


def _noise(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


@pytest.fixture(scope="module")
def torch_backend(contrast_checkpoint):
    return TorchBackend(contrast_checkpoint)


@pytest.fixture(scope="module")
def onnx_backend(contrast_onnx_artifact):
    from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(contrast_onnx_artifact, providers=("cpu",), threads=1)


def _hf_greedy(vlm, backend, image, prompt, max_new_tokens):
    ids, pixels = backend.encode(image, prompt)
    return greedy_reference(
        vlm, ids, pixels, max_new_tokens, stop_ids=sorted(backend.eos_token_ids)
    )


def _check_timed(gen: Generation, with_image: bool) -> None:
    assert isinstance(gen, Generation)
    assert gen.prefill_ms > 0 and (gen.vision_ms > 0) == with_image
    assert len(gen.token_ids) < 2 or gen.decode_ms > 0


@pytest.mark.parametrize("spec,prompt", PROMPTS)
def test_torch_backend_equals_hf_greedy_and_onnx_fp32(
    torch_backend, onnx_backend, contrast_vlm, spec, prompt
):
    vlm = contrast_vlm
    got = torch_backend.generate(image_for(spec), prompt, max_new_tokens=10)
    assert got.token_ids == _hf_greedy(vlm, torch_backend, image_for(spec), prompt, 10)
    assert got.text == vlm.tokenizer.decode(got.token_ids, skip_special_tokens=True).strip()
    _check_timed(got, spec is not None)
    onnx = onnx_backend.generate(image_for(spec), prompt, max_new_tokens=10)
    assert onnx.token_ids == got.token_ids and onnx.prompt_tokens == got.prompt_tokens


def test_answers_depend_on_the_input(torch_backend):
    answers = {tuple(torch_backend.generate(image_for(s), p, 10).token_ids) for s, p in PROMPTS}
    assert len(answers) > 1


def test_generation_stops_at_a_stop_token(torch_backend, monkeypatch):
    image, prompt = image_for(PROMPTS[0][0]), PROMPTS[0][1]
    first = torch_backend.generate(image, prompt, max_new_tokens=4).token_ids
    assert len(first) == 4
    monkeypatch.setattr(torch_backend, "eos_token_ids", {first[0]})
    assert torch_backend.generate(image, prompt, 4).token_ids == first[:1]  # kept, as HF does


@pytest.fixture(scope="module")
def contrast(contrast_vlm, contrast_checkpoint, gguf_f32_artifact):
    return contrast_vlm, contrast_checkpoint, gguf_f32_artifact


def test_gguf_f32_equals_torch_backend(contrast):
    from edgekd.runtime.llamacpp import LlamaCppBackend

    vlm, run_dir, artifact = contrast
    reference = TorchBackend(run_dir)  # a distill run directory: the student in model/
    llama = LlamaCppBackend(artifact, n_threads=1)
    answers = set()
    try:
        for seed, question in ((7, "What shape is in the image?"), (8, "Is there a red circle?")):
            for prompt in (question, f"<image>{question}"):  # image + newline first; marker
                ref = reference.generate(_noise(seed), prompt, max_new_tokens=8)
                assert ref.token_ids == _hf_greedy(vlm, reference, _noise(seed), prompt, 8)
                gen = llama.generate(_noise(seed), prompt, max_new_tokens=8)
                assert gen.token_ids == ref.token_ids and gen.prompt_tokens == ref.prompt_tokens
                _check_timed(ref, True)
                answers.add(tuple(ref.token_ids))
    finally:
        llama.close()
    assert len(answers) >= 2  # not stuck outputs compared


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_checkpoint):
    with pytest.raises(BackendError, match="no CUDA GPU") as err:
        TorchBackend(tiny_checkpoint, device="cuda")
    assert "\n" not in str(err.value)


def test_ignore_eos_decodes_exactly_max_new_tokens(
    torch_backend, onnx_backend, contrast, monkeypatch
):
    from edgekd.runtime.llamacpp import LlamaCppBackend

    image, prompt = image_for(PROMPTS[0][0]), PROMPTS[0][1]
    first = torch_backend.generate(image, prompt, max_new_tokens=1).token_ids[0]
    llama = LlamaCppBackend(contrast[2], n_threads=1)
    try:
        for backend, attr in (
            (torch_backend, "eos_token_ids"),
            (onnx_backend, "eos_token_ids"),
            (llama.session, "stop_ids"),
        ):
            monkeypatch.setattr(backend, attr, {first})  # the first answer token now stops
            assert len(backend.generate(image, prompt, 5).token_ids) == 1
            fixed = backend.generate(image, prompt, 5, ignore_eos=True)
            assert len(fixed.token_ids) == 5 and fixed.decode_tokens_per_s > 0
    finally:
        llama.close()


def test_a_prompt_past_the_context_length_is_refused(torch_backend, onnx_backend):
    image, prompt = image_for(PROMPTS[0][0]), PROMPTS[0][1]
    for backend in (torch_backend, onnx_backend):
        too_many = backend.context_length
        with pytest.raises(BackendError, match="exceed the context length"):
            backend.generate(image, prompt, max_new_tokens=too_many)
