"""The llama.cpp backend: verified loading, greedy generation with an image, timings, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from edgekd.evaluate import greedy_reference
from edgekd.runtime.base import BackendError, Generation
from edgekd.runtime.prompt import user_content


@pytest.fixture(scope="module")
def artifact(gguf_f32_artifact):
    return gguf_f32_artifact


@pytest.fixture
def copy_of(artifact, tmp_path):
    import shutil

    def make():
        dst = tmp_path / "copy"
        shutil.copytree(artifact, dst)
        return dst

    return make


def _image(seed=7, size=64):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


def _pytorch_greedy(vlm, image, prompt, max_new_tokens):
    messages = [{"role": "user", "content": user_content(prompt, has_image=True)}]
    text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = vlm.processor(images=image, text=text, return_tensors="pt")
    ids = greedy_reference(vlm, enc["input_ids"], enc["pixel_values"], max_new_tokens)
    return ids, enc["input_ids"].shape[1]


def test_generate_is_token_exact_with_pytorch_and_timed(artifact, contrast_vlm):
    from edgekd.runtime.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(artifact, n_threads=1)
    answers = set()
    try:
        for seed, prompt in ((7, "What shape is in the image?"), (8, "Is there a red circle?")):
            image = _image(seed)
            gen = backend.generate(image, prompt, max_new_tokens=8)
            ref, n_prompt = _pytorch_greedy(contrast_vlm, image, prompt, 8)
            assert isinstance(gen, Generation)
            assert gen.token_ids == ref
            assert gen.prompt_tokens == n_prompt
            assert gen.text == contrast_vlm.tokenizer.decode(ref, skip_special_tokens=True).strip()
            assert gen.vision_ms > 0 and gen.prefill_ms > 0 and gen.decode_ms > 0
            answers.add(tuple(ref))
    finally:
        backend.close()
    assert len(answers) == 2  # the comparison is not between two stuck outputs


def test_larger_images_are_resized_like_the_processor(artifact, contrast_vlm):
    from edgekd.runtime.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(artifact, n_threads=1)
    try:
        image = _image(9, size=97)
        gen = backend.generate(image, "What color is the shape?", max_new_tokens=6)
        ref, _ = _pytorch_greedy(contrast_vlm, image, "What color is the shape?", 6)
        assert gen.token_ids == ref
    finally:
        backend.close()


@pytest.mark.parametrize("name,damage", [("model.gguf", "flip"), ("mmproj.gguf", "truncate")])
def test_tampered_or_truncated_file_is_named_at_load(copy_of, name, damage):
    from edgekd.artifact import ArtifactError
    from edgekd.runtime.llamacpp import LlamaCppBackend

    art = copy_of()
    path = art / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        LlamaCppBackend(art)


def test_other_targets_are_refused(copy_of):
    from edgekd.artifact import ArtifactError
    from edgekd.runtime.llamacpp import LlamaCppBackend

    art = copy_of()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"] = "onnx"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="gguf artifacts"):
        LlamaCppBackend(art)


def test_missing_llama_cpp_names_the_extra(monkeypatch, tmp_path):
    from edgekd.runtime.llamacpp import LlamaCppSession

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendError, match=r"pip install 'edgekd\[gguf\]'"):
        LlamaCppSession(tmp_path / "model.gguf", None, chat_template="", image_size=(64, 64))


def test_stage_methods_match_the_processor_and_pytorch(artifact, contrast_vlm):
    """The Backend protocol's stages: llama.cpp's own ids and pixels equal the processor's,
    and its visual tokens and greedy tokens from encoded inputs equal PyTorch's."""
    import torch

    from edgekd.export.parity import compare
    from edgekd.runtime.llamacpp import LlamaCppBackend
    from edgekd.runtime.prompt import encode_prompt

    backend = LlamaCppBackend(artifact, n_threads=1)
    try:
        image, prompt = _image(11, size=80), "What color is the shape?"
        ids, pixels = backend.encode(image, prompt)
        ref_ids, ref_pixels = encode_prompt(contrast_vlm.processor, image, prompt)
        assert np.array_equal(ids, ref_ids)
        assert np.abs(pixels - ref_pixels).max() < 1e-5
        with torch.no_grad():
            ref = contrast_vlm.project(contrast_vlm.vision_features(torch.from_numpy(ref_pixels)))
        assert compare(backend.visual_tokens(ref_pixels), ref)["cosine_min"] > 0.999
        gen = backend.generate_ids(ref_ids, ref_pixels, max_new_tokens=6)
        assert gen.token_ids == greedy_reference(contrast_vlm, ref_ids, ref_pixels, 6)
        with pytest.raises(BackendError, match="logits_all=True"):
            backend.prefill_logits(ref_ids, ref_pixels)
        with pytest.raises(BackendError, match="exceed the context length"):
            backend.generate_ids(np.ones((1, backend.context_length), np.int64), None, 4)
    finally:
        backend.close()
