"""The LLaVA family through every target: {tower} x {strategy} x {decoder}, exported with parity.

Each tiny checkpoint is built from configs (:func:`edgekd.models.build_vlm` with ``tower``,
``decoder``, ``select_strategy``) and exported through the public ``export`` call, whose parity
step (greedy tokens exact at fp32/f16, vision features, logits) must pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekd.export import ExportConfig, ExportError, export
from edgekd.export.family import GGUF_DROP_KEY, GGUF_SCALE_KEY, TEXT_ARCHS, family_problems

STRATEGIES = ("default", "full")
ONNX_CASES = [
    (tower, decoder, strategy)
    for tower in ("siglip", "clip")
    for strategy in STRATEGIES
    for decoder in ("qwen2", "llama", "gemma")
    if (tower, decoder, strategy) != ("siglip", "qwen2", "full")  # the shared onnx fixture
] + [("siglip", "mistral", "default")]
GGUF_CASES = [("siglip", d, s) for d in ("qwen2", "llama", "mistral", "gemma") for s in STRATEGIES]
GGUF_CASES += [("clip", "llama", "default"), ("clip", "qwen2", "default")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """``checkpoint(tower, decoder, strategy, **kw) -> (path, vlm)``, built once per module."""
    from edgekd.models import build_vlm

    made = {}

    def get(tower, decoder, strategy, **kw):
        key = (tower, decoder, strategy, tuple(sorted(kw.items())))
        if key not in made:
            vlm = build_vlm(
                "tiny", tokenizer=tokenizer, seed=1, tower=tower, decoder=decoder,
                select_strategy=strategy, **kw,
            )  # fmt: skip
            path = tmp_path_factory.mktemp("-".join(map(str, key[:3])))
            vlm.save_pretrained(path / "ckpt")
            made[key] = (path / "ckpt", vlm)
        return made[key]

    return get


def _export(ckpt, target, precision, out, **kw):
    config = ExportConfig(
        str(ckpt), target, precision, out, n_parity_prompts=2, max_new_tokens=5, **kw
    )
    return export(config)


@pytest.mark.parametrize("tower,decoder,strategy", ONNX_CASES)
def test_onnx_fp32_exports_every_member_token_exact(checkpoint, tmp_path, tower, decoder, strategy):
    ckpt, vlm = checkpoint(tower, decoder, strategy)
    manifest = _export(ckpt, "onnx", "fp32", tmp_path / "onnx")
    checks = manifest["parity"]["checks"]
    assert manifest["parity"]["passed"] and checks["greedy"]["prompts_exact"] == 2
    assert checks["vision"]["pass"]
    tokens = 16 + (tower == "clip") - (strategy == "default")
    assert manifest["preprocessing"]["image_tokens_per_image"] == tokens == vlm.num_image_tokens()
    config = json.loads((tmp_path / "onnx" / "edgekd_onnx.json").read_text())["model"]
    assert config["text_model_type"] == decoder and config["vision"]["num_image_tokens"] == tokens


@pytest.mark.parametrize("tower,decoder,strategy", GGUF_CASES)
def test_gguf_f16_exports_every_member_with_parity(checkpoint, tmp_path, tower, decoder, strategy):
    pytest.importorskip("llama_cpp")
    import gguf

    ckpt, vlm = checkpoint(tower, decoder, strategy)
    out = tmp_path / "gguf"
    manifest = _export(ckpt, "gguf", "f16", out)
    parity, vision = manifest["parity"], manifest["components"]["vision"]
    assert parity["passed"] and parity["checks"]["greedy"]["prompts_exact"] == 2
    assert manifest["components"]["language_model"]["architecture"] == TEXT_ARCHS[decoder].gguf_arch
    dropped = int(strategy == "default" and tower == "siglip")  # clip drops a class token itself
    assert vision["drop_first_tokens"] == dropped
    order = vision["llama_cpp_class_token"]
    assert order is None if tower == "siglip" else order["order"] == "first"
    assert parity["checks"]["vision"]["pass"]  # the backend's rows (after the drop) vs PyTorch
    mmproj = gguf.GGUFReader(str(out / "mmproj.gguf"))
    assert (mmproj.get_field(GGUF_DROP_KEY) is not None) == bool(dropped)
    if dropped:  # what stock tools do with the same files is measured and recorded
        stock = parity["stock_llama_cpp"]
        assert stock["visual_tokens_fed"] == vlm.num_image_tokens() + 1 == 16
        assert stock["samples"] == 2 and 0 <= stock["answers_identical"] <= 1
    else:
        assert "stock_llama_cpp" not in parity


@pytest.mark.parametrize("decoder", ["llama", "gemma"])
def test_gguf_takes_sentencepiece_vocabularies(tmp_path, decoder):
    """Llama-2 / Vicuna / TinyLlama-style (``▁`` prefix) and Gemma-style (none) vocabularies
    become llama.cpp's SPM tokenizer: id for id on the exporter's texts, greedy tokens exact."""
    pytest.importorskip("llama_cpp")
    from export_helpers import spm_tokenizer

    from edgekd.models import build_vlm

    tok = spm_tokenizer(space_prefix=decoder == "llama")
    vlm = build_vlm("tiny", tokenizer=tok, decoder=decoder, select_strategy="default", seed=1)
    vlm.processor.chat_template = tok.chat_template
    vlm.save_pretrained(tmp_path / "ckpt")
    manifest = _export(tmp_path / "ckpt", "gguf", "f16", tmp_path / "gguf")
    checks = manifest["parity"]["checks"]
    assert checks["tokenizer"]["identical"] == checks["tokenizer"]["texts"]
    assert checks["greedy"]["prompts_exact"] == 2 and checks["prompt_ids"]["pass"]
    kind = manifest["components"]["language_model"]["tokenizer"]
    assert kind == {"model": "llama", "add_space_prefix": decoder == "llama"}


def test_quantized_members_keep_their_accuracy(checkpoint, tmp_path):
    """int8 ONNX of a CLIP + Llama LLaVA-1.5 layout, q4_k_m GGUF of a dropping SigLIP + Gemma."""
    pytest.importorskip("llama_cpp")
    from export_helpers import write_eval_set

    eval_data = write_eval_set(tmp_path / "eval")
    ckpt, _ = checkpoint("clip", "llama", "default")
    onnx_int8 = _export(ckpt, "onnx", "int8", tmp_path / "onnx", eval_data=eval_data)
    assert onnx_int8["parity"]["passed"] and onnx_int8["parity"]["checks"]["accuracy"]["pass"]
    ckpt, _ = checkpoint("siglip", "gemma", "default")
    q4 = _export(ckpt, "gguf", "q4_k_m", tmp_path / "gguf", eval_data=eval_data)
    assert q4["parity"]["passed"] and q4["parity"]["checks"]["accuracy"]["pass"]
    stock = q4["parity"]["stock_llama_cpp"]
    assert stock["on"] == "eval.json" and stock["samples"] == 7
    assert (
        stock["exact_normalized_match"]
        == q4["parity"]["checks"]["accuracy"]["artifact_normalized_match"]
    )


def test_gemma_is_written_as_llama_cpp_computes_it(checkpoint, tmp_path):
    """Norms stored as ``1 + w``; visual rows divided by sqrt(hidden) inside mm.2, because
    llama.cpp's gemma graph scales every input row and transformers only the token rows."""
    pytest.importorskip("llama_cpp")
    import gguf

    from edgekd.export.gguf_write import write_lm, write_mmproj

    _, vlm = checkpoint("siglip", "gemma", "full")
    write_lm(vlm, tmp_path / "model.gguf", "f32")
    write_mmproj(vlm, tmp_path / "mmproj.gguf", "f32")
    lm = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    layer0 = vlm.language_model.layers[0]
    hf_norm = layer0.input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(lm["blk.0.attn_norm.weight"], hf_norm + 1, rtol=0, atol=1e-6)
    assert "output.weight" not in lm  # gemma's graph reuses token_embd
    reader = gguf.GGUFReader(str(tmp_path / "mmproj.gguf"))
    mm2 = {t.name: np.asarray(t.data) for t in reader.tensors}["mm.2.weight"]
    scale = 64**-0.5
    ref = vlm.projector.linear_2.weight.detach().numpy() * scale
    np.testing.assert_allclose(mm2, ref, rtol=1e-6, atol=1e-7)
    field = reader.get_field(GGUF_SCALE_KEY)
    assert float(field.parts[field.data[0]][0]) == pytest.approx(scale)


def test_the_installed_llama_cpp_orders_the_class_token_first(checkpoint, tmp_path):
    """edgekd's llama-cpp-python build has the fix of llama.cpp PR #25844: clip's rows of a
    CLIP tower are the model's patches in place (stock 0.3.36 measured -0.52 in place and 0.997
    shifted by one on the probe's model)."""
    pytest.importorskip("llama_cpp")
    from export_helpers import mmproj_rows_and_reference

    from edgekd.export.gguf_probe import FIRST, class_token_order
    from edgekd.export.parity import compare

    found = class_token_order()
    assert found["order"] == FIRST and found["cosine_in_place"] >= 0.999, found
    assert found["cosine_shifted"] < 0.9
    _, vlm = checkpoint("clip", "llama", "default")
    rows, ref = mmproj_rows_and_reference(vlm, tmp_path)
    assert rows.shape == ref.shape == (16, 64)
    assert compare(rows, ref)["cosine_min"] > 0.999


def test_a_shifted_llama_cpp_is_refused_in_one_line(checkpoint, monkeypatch, tmp_path):
    """The order is read from rows: a llama.cpp whose rows are the model's next patches (the
    issue #25814 signature) refuses every class-token tower before anything is written."""
    pytest.importorskip("llama_cpp")
    from edgekd.export import gguf_probe
    from edgekd.export.gguf import GgufExporter

    ref = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    cls = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    shifted = gguf_probe.order_from_rows(np.vstack([ref[1:], cls]), ref)
    assert shifted["order"] == gguf_probe.SHIFTED and shifted["cosine_shifted"] > 0.999
    noise = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    assert gguf_probe.order_from_rows(noise, ref)["order"] == gguf_probe.UNKNOWN
    assert gguf_probe.order_from_rows(ref, ref)["order"] == gguf_probe.FIRST
    assert gguf_probe.order_from_rows(ref[:-1], ref)["order"] == gguf_probe.UNKNOWN
    monkeypatch.setattr(
        gguf_probe, "class_token_order", lambda: {**shifted, "library": "libmtmd.so"}
    )
    ckpt, vlm = checkpoint("clip", "qwen2", "default")
    config = ExportConfig(str(ckpt), "gguf", "f16", tmp_path / "refused")
    with pytest.raises(ExportError) as err:
        GgufExporter().check(vlm, config)
    message = str(err.value)
    assert "\n" not in message and "issue #25814" in message and "make install" in message
    assert "--target onnx or tensorrt" in message
    with pytest.raises(ExportError, match="issue #25814"):
        export(config)
    assert not (tmp_path / "refused").exists()
    _, siglip = checkpoint("siglip", "qwen2", "default")  # no class token: nothing to ask
    assert GgufExporter().class_token_order(siglip) is None


@pytest.mark.parametrize(
    "decoder,change,message",
    [
        ("mistral", {"sliding_window": 4096}, "sliding-window attention"),
        ("qwen2", {"use_sliding_window": True}, "sliding-window attention"),
        ("llama", {"mlp_bias": True}, "MLP biases"),
        ("gemma", {"tie_word_embeddings": False}, "no separate output matrix"),
        ("llama", {"hidden_act": "gelu"}, "text activation 'gelu'"),
    ],
)
def test_members_outside_the_declarations_are_refused(checkpoint, decoder, change, message):
    import copy

    _, vlm = checkpoint("siglip", decoder, "full")
    config = copy.deepcopy(vlm.config)
    for key, value in change.items():
        setattr(config.text_config, key, value)
    assert any(message in p for p in family_problems(config, "gguf"))


def test_clip_preprocessing_matches_the_processor_on_a_wide_image(checkpoint):
    """The llama.cpp backend's shortest-edge resize and centre crop (CLIP) equal transformers'."""
    from edgekd.runtime.llamacpp import to_rgb_array

    _, vlm = checkpoint("clip", "qwen2", "default")
    from edgekd import artifact

    pre = artifact.preprocessing(vlm)
    assert pre["resize_shortest_edge"] == 64 and pre["image_size"] == [64, 64]
    image = np.random.default_rng(1).integers(0, 256, (50, 91, 3), np.uint8)
    rgb = to_rgb_array(image, tuple(pre["image_size"]), 3, pre["resize_shortest_edge"])
    mean = np.asarray(pre["image_mean"], np.float32)[:, None, None]
    std = np.asarray(pre["image_std"], np.float32)[:, None, None]
    ours = (rgb.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std
    ref = vlm.processor.image_processor(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_llava_pad_preprocessing_matches_the_processor(tokenizer):
    """TinyLLaVA / LLaVA-1.5 ``pad``: the llama.cpp backend pads to a centred square of the
    mean colour before resizing, as transformers' LLaVA image processor does."""
    from transformers import LlavaImageProcessorPil

    from edgekd import artifact
    from edgekd.models import build_vlm
    from edgekd.runtime.llamacpp import pad_color, to_rgb_array

    vlm = build_vlm("tiny", tokenizer=tokenizer, select_strategy="default")
    ip = LlavaImageProcessorPil(
        do_pad=True, do_center_crop=False, size={"height": 64, "width": 64},
        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
    )  # fmt: skip
    vlm.processor.image_processor = ip
    pre = artifact.preprocessing(vlm)
    assert pre["pad_to_square"] and pad_color(pre) == (127, 127, 127)
    image = np.random.default_rng(2).integers(0, 256, (30, 70, 3), np.uint8)
    rgb = to_rgb_array(image, (64, 64), 3, None, pad_color(pre))
    ours = (rgb.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5
    ref = ip(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    plain = artifact.preprocessing(build_vlm("tiny", tokenizer=tokenizer))
    assert not plain["pad_to_square"] and pad_color(plain) is None


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory, tokenizer):
    """A VLM assembled from a tiny DINOv2 tower (class token, LayerScale 2.5) and a Llama."""
    from tiny_parts import tiny_assembled

    return tiny_assembled(tmp_path_factory.mktemp("dinov2"), tokenizer)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_dinov2_towers_export_to_onnx_with_parity(dinov2, tmp_path, precision):
    manifest = _export(dinov2, "onnx", precision, tmp_path / "onnx")
    checks = manifest["parity"]["checks"]
    assert manifest["parity"]["passed"] and checks["vision"]["pass"]
    assert manifest["preprocessing"]["image_tokens_per_image"] == 16  # 16 patches, class dropped
    if precision == "fp32":
        import onnx

        assert checks["greedy"]["prompts_exact"] == 2 and checks["vision"]["max_rel"] < 1e-4
        # the table is the assembled resolution's: the graph resamples nothing per call
        graph = onnx.load(str(tmp_path / "onnx" / "vision_encoder.onnx"))
        assert not any(n.op_type in ("Resize", "Upsample") for n in graph.graph.node)


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_dinov2_towers_export_to_gguf_with_parity(dinov2, tmp_path, precision):
    """Class token first (edgekd's llama.cpp), LayerScale folded into attn_out and ffn_down,
    the exact GELU run as clip's tanh form: token-exact at f32, within f16's floor."""
    pytest.importorskip("llama_cpp")
    import gguf

    from edgekd.models import VLM

    manifest = _export(dinov2, "gguf", precision, tmp_path / "gguf")
    parity, vision = manifest["parity"], manifest["components"]["vision"]
    assert parity["passed"] and parity["checks"]["vision"]["pass"], parity["checks"]
    assert vision["tower"] == "dinov2" and vision["llama_cpp_class_token"]["order"] == "first"
    assert vision["drop_first_tokens"] == 0  # clip drops the class token itself
    if precision == "f32":
        assert parity["checks"]["greedy"]["prompts_exact"] == 2
        assert parity["checks"]["vision"]["cosine_min"] > 0.9999
    tower = VLM.from_pretrained(dinov2).vision_tower
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "mmproj.gguf"))
    mm = {t.name: np.asarray(t.data, np.float32) for t in reader.tensors}
    assert not any("ls1" in n or "ls2" in n for n in mm)
    layer = tower.encoder.layer[0]
    scale = layer.layer_scale2.lambda1.detach().numpy()
    np.testing.assert_allclose(
        mm["v.blk.0.ffn_down.weight"], layer.mlp.fc2.weight.detach().numpy() * scale[:, None],
        rtol=1e-2 if precision == "f16" else 1e-6, atol=1e-3 if precision == "f16" else 1e-7,
    )  # fmt: skip
    assert mm["v.class_embd"].shape == (32,) and mm["v.position_embd.weight"].shape == (17, 32)


def test_what_clips_llava_graph_cannot_run_of_a_dinov2_is_refused(dinov2, checkpoint):
    """A SwiGLU MLP (DINOv2-giant), and a class token kept by the 'full' selection (clip's
    graph always drops it; CLIP alike): one named problem each."""
    import copy

    from edgekd.models import VLM

    config = copy.deepcopy(VLM.from_pretrained(dinov2).config)
    assert family_problems(config, "gguf") == []
    config.vision_config.use_swiglu_ffn = True
    (problem,) = family_problems(config, "gguf")
    assert "SwiGLU" in problem and "--target onnx or tensorrt" in problem
    config.vision_config.use_swiglu_ffn = False
    config.vision_feature_select_strategy = "full"
    (problem,) = family_problems(config, "gguf")
    assert "'full' selection" in problem and "always drops the class token" in problem
    _, clip = checkpoint("clip", "qwen2", "full")
    assert any("'full' selection" in p for p in family_problems(clip.config, "gguf"))
    assert family_problems(clip.config, "onnx") == []


def test_a_tower_fed_another_size_than_its_own_is_refused_for_gguf(dinov2, tmp_path):
    """A processor at 64 px before a tower whose table is for 32 px: transformers resamples
    the table per call, clip.cpp cannot; refused in one line, naming the fix."""
    from edgekd.export.gguf import config_problems
    from edgekd.models import VLM

    vlm = VLM.from_pretrained(dinov2)
    assert config_problems(vlm, "f16", {}) == []
    vlm.config.vision_config.image_size = 64
    (problem,) = config_problems(vlm, "f16", {})
    assert "tower's image_size is 64" in problem and "--image-size 32" in problem
