"""GGUF export: file contents, tokenizer round trip, parity with PyTorch, quantization, refusals."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from export_helpers import mmproj_rows_and_reference, write_eval_set

from edgekd.export.base import ExportConfig, ExportError
from edgekd.export.gguf import GgufExporter
from edgekd.runtime.llamacpp import import_llama_cpp

PRECISIONS = ("f32", "f16", "q8_0", "q4_k_m", "q4_0", "iq4_nl", "bf16")


def run_export(vlm, checkpoint, out, precision="f32", validate=True, **options):
    """What the export driver does: check, export, validate, manifest (no atomic dir needed)."""
    from edgekd import artifact as manifest

    exporter = GgufExporter()
    config = ExportConfig(
        checkpoint=str(checkpoint),
        target="gguf",
        precision=precision,
        output=out,
        n_parity_prompts=3,
        max_new_tokens=8,
        options=options,
    )
    exporter.check(vlm, config)
    components = exporter.export(vlm, config, out)
    parity = exporter.validate(vlm, config, out) if validate else {}
    manifest.write(
        out,
        target="gguf",
        precision=precision,
        checkpoint=str(checkpoint),
        components=components,
        vlm=vlm,
        parity=parity,
    )
    return components, parity


def contrast(vlm, factor: float = 4.0):
    """Scale every weight matrix: a random tiny model answers one token whatever it sees;
    scaled, its greedy answers depend on the image and the prompt (a real parity test)."""
    with torch.no_grad():
        for p in vlm.model.parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return vlm


@pytest.fixture(scope="module")
def contrast_vlm(tokenizer):
    from edgekd.models import build_vlm

    return contrast(build_vlm("tiny", tokenizer=tokenizer, seed=0))


@pytest.fixture(scope="module")
def f32_artifact(contrast_vlm, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("gguf") / "f32"
    components, parity = run_export(contrast_vlm, "contrast-tiny", out)
    return out, components, parity


@pytest.fixture(scope="module")
def wide_vlm(tokenizer):
    """Hidden size 256 (K-quant rows) with a 384-wide MLP (ffn_down rows fall back)."""
    from edgekd.models import build_vlm

    return build_vlm("tiny", tokenizer=tokenizer, seed=3, hidden_size=256, intermediate_size=384)


def _fields(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {f.name: f.contents() for f in reader.fields.values()}


# ---- refusals and messages (no llama_cpp needed) -------------------------------------------
def test_registered_with_its_precisions():
    from edgekd.export.base import get_exporter

    exporter = get_exporter("gguf")
    assert isinstance(exporter, GgufExporter)
    assert exporter.precisions == PRECISIONS


def test_unknown_precision_lists_valid_ones(tiny_vlm, tmp_path):
    config = ExportConfig(checkpoint="x", target="gguf", precision="int3", output=tmp_path)
    with pytest.raises(ExportError, match="valid: f32, f16, q8_0, q4_k_m, q4_0, iq4_nl, bf16"):
        GgufExporter().check(tiny_vlm, config)


@pytest.mark.parametrize("value", ["abc", float("nan"), float("inf"), -1.0, 0])
def test_atol_must_be_a_positive_number(tiny_vlm, tmp_path, value):
    options = {"atol": value}
    config = ExportConfig("x", "gguf", "f32", tmp_path, options=options)
    with pytest.raises(ExportError, match=f"option atol {value!r} must be a number > 0"):
        GgufExporter().check(tiny_vlm, config)


def test_unsupported_architecture_refused_in_one_line_without_files(tiny_vlm, tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Phi3Config

    from edgekd.export import export
    from edgekd.models import VLM

    text = Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tiny_vlm.tokenizer), pad_token_id=0,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=tiny_vlm.config.vision_config.to_dict(), text_config=text,
        image_token_index=tiny_vlm.image_token_id, vision_feature_select_strategy="full",
    )  # fmt: skip
    VLM(LlavaForConditionalGeneration(cfg).eval(), tiny_vlm.processor).save_pretrained(
        tmp_path / "phi3"
    )
    out = tmp_path / "artifact"
    config = ExportConfig(checkpoint=str(tmp_path / "phi3"), target="gguf", precision="f32",
                          output=out)  # fmt: skip
    with pytest.raises(ExportError) as err:
        export(config)
    message = str(err.value)
    assert "\n" not in message and "text decoder 'phi3' is not supported" in message
    assert "supported: qwen2, llama, mistral, gemma" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi3"]  # nothing written


def test_missing_llama_cpp_names_the_extra(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    config = ExportConfig(checkpoint="x", target="gguf", precision="q8_0", output=tmp_path)
    with pytest.raises(ExportError, match=r"pip install 'edgekd\[gguf\]'"):
        GgufExporter().check(tiny_vlm, config)


def test_empty_mmproj_is_caught(tiny_vlm, tmp_path):
    """The known 1 KB mmproj failure: a file whose tensors are gone fails the post-write check."""
    import gguf

    from edgekd.export.gguf_read import check_written
    from edgekd.export.gguf_write import vision_tensors

    path = tmp_path / "mmproj.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size < 1024
    with pytest.raises(ExportError, match="tensor.*missing"):
        check_written(path, vision_tensors(tiny_vlm, "f32")[0], "vision")


# ---- file contents -------------------------------------------------------------------------
def test_model_gguf_metadata(f32_artifact, contrast_vlm):
    out, components, _ = f32_artifact
    reader, kv = _fields(out / "model.gguf")
    tok = contrast_vlm.tokenizer
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.block_count"] == 2 and kv["qwen2.embedding_length"] == 64
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert kv["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # the special tokens are CONTROL
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == contrast_vlm.processor.chat_template
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert components["language_model"]["n_tensors"] == len(names) == 2 + 2 * 12


def test_mmproj_gguf_is_legacy_clip_with_feature_layer(f32_artifact, contrast_vlm):
    out, components, _ = f32_artifact
    reader, kv = _fields(out / "mmproj.gguf")
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    assert kv["clip.has_vision_encoder"] is True and kv["clip.use_gelu"] is True
    # layer -2 of a 2-layer tower = hidden_states[1]: one block written, read before block 1
    assert kv["clip.vision.feature_layer"] == [1] and kv["clip.vision.block_count"] == 1
    assert kv["clip.vision.image_size"] == 64 and kv["clip.vision.patch_size"] == 16
    names = {t.name for t in reader.tensors}
    assert {"mm.0.weight", "mm.2.weight", "v.patch_embd.weight", "v.position_embd.weight"} <= names
    assert not any(n.startswith(("v.post_ln", "v.blk.1.")) for n in names)
    assert components["vision"]["feature_layers"] == [1]
    assert components["vision"]["smoke_test"]["image_tokens"] == contrast_vlm.num_image_tokens()


def test_vocabulary_padded_to_the_embedding(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    llama_cpp = import_llama_cpp()  # the CPU variant loaded first (GGML_BACKEND_DL builds)

    from edgekd.export.gguf_write import write_lm
    from edgekd.models import build_vlm

    vlm = build_vlm("tiny", tokenizer=tokenizer, seed=0, vocab_size=len(tokenizer) + 36)
    write_lm(vlm, tmp_path / "model.gguf", "f32")
    _, kv = _fields(tmp_path / "model.gguf")
    assert len(kv["tokenizer.ggml.tokens"]) == vlm.vocab_size
    assert kv["tokenizer.ggml.tokens"][-1] == f"[PAD{vlm.vocab_size - 1}]"
    assert set(kv["tokenizer.ggml.token_type"][len(tokenizer) :]) == {5}  # UNUSED
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    assert llm.n_vocab() == vlm.vocab_size


# ---- tokenizer ------------------------------------------------------------------------------
TEXTS = [
    "What shape is in the image? Is there a red circle?",
    "numbers 12345 and 3.14, punctuation!?;: [x] {y} $5 a+b=c <tag>",
    "  spaces   and\ttabs\n\nnewlines  ",
    "unicode: café, 東京, 🙂; don't WON'T it's",
    "<|im_start|>user\n<image>How many?<|im_end|>\n<|im_start|>assistant\n",
    "in 2024 there were 12345 items",
]


@pytest.fixture(scope="module")
def numeric_vlm():
    """A tokenizer with digit, punctuation and newline merges: pre-tokenizers that split those
    differently from GPT-2's regex then give different ids (the built-in corpus has none)."""
    from edgekd.models import build_vlm, train_tokenizer

    corpus = [
        "in 2024 there were 12345 items and 678 boxes",
        "version 3.14159 or 42, 1999 and 2000",
        "(see above) [note] {x} don't WON'T",
        "line one\nline two\n\n\ttabbed?\n",
        "café 東京 naïve",
    ]
    tok = train_tokenizer(corpus)
    return build_vlm("tiny", tokenizer=tok, seed=0)


@pytest.mark.parametrize(
    "pre,matches", [("gpt-2", True), ("default", False), ("qwen2", False), ("llama-bpe", False)]
)
def test_pre_tokenizer_choice_reproduces_transformers_ids(
    numeric_vlm, tmp_path, monkeypatch, pre, matches
):
    """Only llama.cpp's 'gpt-2' pre-tokenizer splits text as our ByteLevel(use_regex) does."""
    pytest.importorskip("llama_cpp")
    llama_cpp = import_llama_cpp()  # the CPU variant loaded first (GGML_BACKEND_DL builds)

    from edgekd.export import gguf_write as g

    monkeypatch.setitem(g.PRE_TOKENIZERS, "byte_level", pre)
    g.write_lm(numeric_vlm, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    same = [
        llm.tokenize(t.encode(), add_bos=False, special=True)
        == numeric_vlm.tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in TEXTS
    ]
    assert all(same) if matches else not all(same)


def test_tokenizer_round_trip_in_parity(f32_artifact):
    _, components, parity = f32_artifact
    assert components["language_model"]["tokenizer"] == {"model": "gpt2", "pre": "gpt-2"}
    assert parity["checks"]["tokenizer"]["pass"]
    assert parity["checks"]["tokenizer"]["mismatches"] == []


# ---- parity ---------------------------------------------------------------------------------
def test_f32_logits_match_pytorch(f32_artifact, contrast_vlm):
    llama_cpp = import_llama_cpp()  # the CPU variant loaded first (GGML_BACKEND_DL builds)

    out, _, parity = f32_artifact
    text = parity["checks"]["text_logits"]
    assert parity["passed"] and text["max_abs"] <= 2e-3 * max(1, text["ref_abs_max"])
    ids = contrast_vlm.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(out / "model.gguf"), logits_all=True, n_ctx=128, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        ref = contrast_vlm.language_logits(contrast_vlm.embed(torch.tensor([ids])))[0].numpy()
    np.testing.assert_allclose(llm.scores[: len(ids)], ref, atol=2e-3 * np.abs(ref).max(), rtol=0)


def test_f32_greedy_with_image_is_token_exact(f32_artifact):
    _, _, parity = f32_artifact
    greedy = parity["checks"]["greedy"]
    assert greedy["prompts_exact"] == greedy["prompts"] == 3
    assert parity["checks"]["prompt_ids"]["identical"] == 3
    answers = {tuple(s["pytorch"]) for s in greedy["samples"]}
    assert len(answers) > 1 and any(len(set(a)) > 1 for a in answers)  # not one stuck token
    assert parity["checks"]["vision"]["cosine_min"] > 0.999
    assert parity["checks"]["logits"]["pass"] and parity["checks"]["chat_handler"]["ran"]


def test_llama_architecture_rope_layout(tokenizer, tiny_vlm, tmp_path):
    """A Llama text config: q/k rows are permuted for llama.cpp's rope and logits still match."""
    pytest.importorskip("llama_cpp")
    llama_cpp = import_llama_cpp()  # the CPU variant loaded first (GGML_BACKEND_DL builds)
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from edgekd.export.gguf_write import write_lm
    from edgekd.models import VLM

    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=tiny_vlm.config.vision_config.to_dict(),
        text_config=text,
        image_token_index=tiny_vlm.image_token_id,
    )
    torch.manual_seed(0)
    vlm = VLM(LlavaForConditionalGeneration(cfg).eval(), tiny_vlm.processor)
    write_lm(vlm, tmp_path / "model.gguf", "f32")
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), logits_all=True, n_ctx=128, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        ref = vlm.language_logits(vlm.embed(torch.tensor([ids])))[0].numpy()
    np.testing.assert_allclose(llm.scores[: len(ids)], ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "layer,ffn",
    [(-2, 64), (-1, 128), (0, 128), ([-2, -1], 128)],
    ids=["square-mlp", "last-layer", "embeddings", "two-layers"],
)
def test_mmproj_embeddings_match_pytorch(tiny_vlm, tmp_path, layer, ffn):
    """Feature layers (the last, none, several concatenated) and a square vision MLP, whose
    ffn_up/ffn_down clip.cpp swaps when ffn_down's rows equal n_embd."""
    pytest.importorskip("llama_cpp")
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from edgekd.export.parity import compare
    from edgekd.models import VLM

    vision = {**tiny_vlm.config.vision_config.to_dict(), "intermediate_size": ffn}
    cfg = LlavaConfig(
        vision_config=vision, text_config=tiny_vlm.config.text_config.to_dict(),
        image_token_index=tiny_vlm.image_token_id, vision_feature_select_strategy="full",
        vision_feature_layer=layer, image_seq_length=16,
    )  # fmt: skip
    torch.manual_seed(0)
    vlm = VLM(LlavaForConditionalGeneration(cfg).eval(), tiny_vlm.processor)
    embd, ref = mmproj_rows_and_reference(vlm, tmp_path)
    assert compare(embd, ref)["cosine_min"] > 0.9999


# ---- quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["q8_0", "q4_k_m", "q4_0", "iq4_nl", "bf16"])
def test_quantized_types_and_fallbacks(wide_vlm, tmp_path, precision):
    pytest.importorskip("llama_cpp")
    components, parity = run_export(wide_vlm, "wide", tmp_path / precision, precision)
    lm = components["language_model"]
    matrices = {
        n: t for n, t in lm["tensor_types"].items() if not n.endswith((".bias", "norm.weight"))
    }
    fallbacks = lm["fallbacks"]["tensors"]
    assert lm["unquantized_matrices"] == []  # token_embd (the tied output) included
    assert sum(lm["weight_share"].values()) == pytest.approx(1, abs=1e-3)
    if precision == "bf16":
        assert set(matrices.values()) == {"BF16"} and lm["weight_share"] == {"BF16": 1.0}
    elif precision == "q8_0":
        assert set(matrices.values()) == {"Q8_0"} and lm["fallbacks"]["count"] == 0
    elif precision in ("q4_0", "iq4_nl"):  # GPTQ's blocks, written by edgekd; the table Q8_0
        assert matrices.pop("token_embd.weight") == "Q8_0" and lm["q8_0_tables"] == [
            "token_embd.weight"
        ]
        assert set(matrices.values()) == {precision.upper()} and lm["fallbacks"]["count"] == 0
        assert lm["share_as_asked"] == 1.0 and lm["calibration"]["grid"] == f"ggml_{precision}"
        assert lm["calibration"]["method"] == "gptq" and lm["calibration"]["samples"] == 32
    else:
        # rows of 256 take K-quants; ffn_down's 384-wide rows cannot and fall back
        assert {"Q4_K", "Q6_K"} & set(matrices.values())
        assert set(fallbacks) == {f"blk.{i}.ffn_down.weight" for i in range(2)}
        assert all(
            f["row_size"] == 384 and f["type"] in ("Q5_0", "Q8_0") for f in fallbacks.values()
        )
        assert lm["fallbacks"]["count"] == 2
        share = sum(v for t, v in lm["weight_share"].items() if t in ("Q5_0", "Q8_0"))
        assert lm["share_as_asked"] == pytest.approx(1 - share, abs=1e-3) and share > 0.1
    assert components["vision"]["precision"] == "f16"
    assert set(components["vision"]["tensor_types"].values()) <= {"F16", "F32"}
    assert parity["passed"], parity


# ---- the export driver, with an eval set --------------------------------------------------
def test_driver_exports_q8_0_with_accuracy_delta(tiny_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp")
    from edgekd.export import export
    from edgekd.runtime.llamacpp import LlamaCppBackend

    config = ExportConfig(
        checkpoint=str(tiny_checkpoint), target="gguf", precision="q8_0",
        output=tmp_path / "q8", n_parity_prompts=2, max_new_tokens=4,
        eval_data=write_eval_set(tmp_path / "eval"), eval_limit=4, options={"n_threads": 1},
    )  # fmt: skip
    manifest = export(config)
    assert set(manifest["files"]) == {"model.gguf", "mmproj.gguf"}
    accuracy = manifest["parity"]["checks"]["accuracy"]
    assert accuracy["samples"] == 4 and -1 <= accuracy["drop"] <= 1
    assert manifest["components"]["language_model"]["type_counts"]["Q8_0"] == 15
    gen = LlamaCppBackend(tmp_path / "q8", n_threads=1).generate(None, "Say yes.", 4)
    assert gen.vision_ms == 0 and gen.token_ids


def test_quantized_artifact_past_its_accuracy_drop_is_refused(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The eval-set accuracy drop is enforced for gguf as for every target: past it the
    export fails with the numbers and leaves nothing behind."""
    pytest.importorskip("llama_cpp")
    import dataclasses

    from edgekd.export import ParityError, export
    from edgekd.export import gguf as gguf_export

    # a drop of at most -100 points: the artifact would have to beat PyTorch on every answer
    strict = dataclasses.replace(gguf_export.TOLERANCES["q8_0"], max_accuracy_drop=-1.0)
    monkeypatch.setitem(gguf_export.TOLERANCES, "q8_0", strict)
    out = tmp_path / "q8"
    config = ExportConfig(
        checkpoint=str(tiny_checkpoint), target="gguf", precision="q8_0", output=out,
        n_parity_prompts=1, max_new_tokens=4, eval_data=write_eval_set(tmp_path / "eval"),
        eval_limit=4, options={"n_threads": 1},
    )  # fmt: skip
    with pytest.raises(ParityError, match=r"accuracy: samples 4, .*drop [-0-9.e]+, max_drop -1"):
        export(config)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "eval"]


def test_q4_0_refuses_matrices_that_are_not_whole_blocks(tiny_vlm):
    """q4_0 is written block by block: a 40-wide input is refused before any work."""
    from types import SimpleNamespace

    from edgekd.export.gguf import config_problems

    odd = SimpleNamespace(
        config=tiny_vlm.config,
        tokenizer=tiny_vlm.tokenizer,
        processor=tiny_vlm.processor,
        model=SimpleNamespace(model=SimpleNamespace(language_model=torch.nn.Linear(40, 8))),
    )
    problems = config_problems(odd, "q4_0", {})
    assert any("q4_0 needs rows of whole 32-weight blocks" in p and "[40]" in p for p in problems)
    assert not any("32-weight" in p for p in config_problems(tiny_vlm, "q4_0", {}))


def test_the_summary_says_when_most_weights_fell_back():
    """``edgekd export`` prints the weight types written, and warns when most weights are
    not of the asked precision's types (a "q4_k_m" of width 576 is mostly Q5_0)."""
    from edgekd.cli.tables import type_lines

    fell = {"count": 210, "reason": "row size not a multiple of 256 (the block of Q4_K/Q5_K/Q6_K)"}
    components = {
        "language_model": {
            "weight_share": {"Q5_0": 0.83, "Q8_0": 0.17}, "share_as_asked": 0.0,
            "fallbacks": fell,
        },
        "vision": {"precision": "f16"},
    }  # fmt: skip
    first, warning = type_lines(components, "q4_k_m")
    assert first.strip() == "language model weights: Q5_0 83%, Q8_0 17%"
    assert "q4_k_m: only 0% of the weights quantized as asked; 210 matrices fell back" in warning
    components["language_model"]["share_as_asked"] = 0.9
    assert len(type_lines(components, "q4_k_m")) == 1
