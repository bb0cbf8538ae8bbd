"""The decode roofline: bytes a token reads per artifact format, bandwidth, tokens/s ceiling."""

from __future__ import annotations

import json
import shutil

import pytest

from edgekd import artifact
from edgekd.models.factory import count_parameters
from edgekd.plan.roofline import (
    RooflineError,
    decode_bytes_per_token,
    measure_bandwidth,
    roofline_tok_s,
)


def _kv_per_token(vlm, element: int) -> int:
    tc = vlm.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    return tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2 * element


def test_bandwidth_is_positive_with_its_samples():
    bw = measure_bandwidth(threads=1, size_mb=64, repeats=3)
    assert len(bw["samples_gbps"]) == 3 and all(s > 0 for s in bw["samples_gbps"])
    assert bw["best_gbps"] == max(bw["samples_gbps"]) >= bw["median_gbps"] > 0
    assert bw["threads"] == 1 and bw["size_mb"] == 64


def test_bandwidth_restores_torch_threads():
    import torch

    before = torch.get_num_threads()
    measure_bandwidth(threads=2, size_mb=16, repeats=1)
    assert torch.get_num_threads() == before


def test_roofline_is_bandwidth_over_bytes():
    assert roofline_tok_s(2e9, 40.0) == pytest.approx(20.0)
    assert roofline_tok_s(5e8, 10.0) == pytest.approx(20.0)
    with pytest.raises(RooflineError):
        roofline_tok_s(0, 10.0)


def test_onnx_fp32_reads_about_the_language_model_at_four_bytes(onnx_fp32_artifact, tiny_vlm):
    need = decode_bytes_per_token(onnx_fp32_artifact, context=0)
    lm = count_parameters(tiny_vlm)["language_model"]  # tied table counted once
    assert need["format"] == "onnx" and need["kv_cache"] == 0
    # the decoder holds every layer and the lm_head (the table); the embed graph's own copy of
    # the table is a lookup and is not counted. The exporter's optimiser stores identical
    # tensors once (a random model's all-ones norms and zero biases), so a little under 4 x
    assert lm * 4 * 0.98 <= need["weights"] <= lm * 4
    assert need["total"] == need["weights"]


def test_kv_cache_grows_linearly_with_context(onnx_fp32_artifact, tiny_vlm):
    per_token = _kv_per_token(tiny_vlm, 4)  # fp32 cache
    rows = [decode_bytes_per_token(onnx_fp32_artifact, context=c) for c in (0, 10, 20, 300)]
    assert [r["kv_cache"] for r in rows] == [0, 10 * per_token, 20 * per_token, 300 * per_token]
    assert len({r["weights"] for r in rows}) == 1
    assert rows[-1]["total"] == rows[-1]["weights"] + 300 * per_token
    with pytest.raises(RooflineError, match="context"):
        decode_bytes_per_token(onnx_fp32_artifact, context=-1)


def test_onnx_int8_counts_the_shared_tied_table_once(tiny_vlm, tmp_path):
    from edgekd.export import ExportConfig, get_exporter

    out = tmp_path / "int8"
    out.mkdir()
    config = ExportConfig("tiny", "onnx", "int8", out)
    components = get_exporter("onnx").export(tiny_vlm, config, out)  # no parity checks
    artifact.write(
        out, target="onnx", precision="int8", checkpoint="tiny", components=components,
        vlm=tiny_vlm, parity={},
    )  # fmt: skip
    need = decode_bytes_per_token(out, context=0)
    shared = (out / "shared_embedding.data").stat().st_size
    decoder = sum(p.stat().st_size for p in out.glob("decoder_model_merged.onnx*"))
    assert need["tied_embedding"] is True
    # decoder weights (its own files, graph proto included) plus the table, once
    assert shared < need["weights"] <= decoder + shared
    assert need["weights"] < decoder + 2 * shared - shared // 2
    lm = count_parameters(tiny_vlm)["language_model"]
    assert need["weights"] < lm * 2  # about a byte per weight (plus scales), not four


def test_torch_checkpoint_counts_the_language_model_at_its_dtype(tiny_checkpoint, tiny_vlm):
    need = decode_bytes_per_token(tiny_checkpoint, context=7)
    assert need["format"] == "torch" and need["tied_embedding"] is True
    assert need["weights"] == 4 * count_parameters(tiny_vlm)["language_model"]  # no vision
    assert need["kv_cache"] == 7 * _kv_per_token(tiny_vlm, 4)


def test_untied_embedding_table_is_a_lookup_not_a_read(tokenizer, tmp_path):
    from edgekd.models import build_vlm

    vlm = build_vlm("tiny", tokenizer=tokenizer, seed=0, tie_word_embeddings=False)
    vlm.save_pretrained(tmp_path / "untied")
    need = decode_bytes_per_token(tmp_path / "untied", context=0)
    embed = vlm.language_model.get_input_embeddings().weight.numel()
    assert need["tied_embedding"] is False
    assert need["weights"] == 4 * (count_parameters(vlm)["language_model"] - embed)


def test_distill_run_directory_reads_its_model(contrast_checkpoint):
    assert decode_bytes_per_token(contrast_checkpoint, context=1)["format"] == "torch"


def test_gguf_tied_output_reads_token_embd_once(gguf_f32_artifact, contrast_vlm):
    from gguf import GGUFReader

    need = decode_bytes_per_token(gguf_f32_artifact, context=5)
    names = {t.name for t in GGUFReader(str(gguf_f32_artifact / "model.gguf")).tensors}
    assert "output.weight" not in names and need["tied_embedding"] is True
    assert need["format"] == "gguf"
    assert need["weights"] == 4 * count_parameters(contrast_vlm)["language_model"]
    assert need["kv_cache"] == 5 * _kv_per_token(contrast_vlm, 2)  # llama.cpp's f16 cache


def test_artifact_files_without_their_manifest_are_refused(gguf_f32_artifact, tmp_path):
    shutil.copy(gguf_f32_artifact / "model.gguf", tmp_path / "model.gguf")
    with pytest.raises(RooflineError, match="not an edgekd artifact"):
        decode_bytes_per_token(tmp_path, context=3)


def test_unknown_directory_is_refused(tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps({}))
    with pytest.raises(RooflineError, match="not an edgekd artifact"):
        decode_bytes_per_token(tmp_path, context=0)
    with pytest.raises(RooflineError, match="not a directory"):
        decode_bytes_per_token(tmp_path / "missing", context=0)


# ---- prefill: the compute roofline -------------------------------------------------------------
def test_prefill_flops_count_every_linear_layer_causal_attention_and_one_head_row():
    from edgekd.models.dims import TextDims
    from edgekd.plan.roofline import prefill_flops

    d = TextDims(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, vocab=10, context=64,
                 intermediate=16)  # fmt: skip
    f = prefill_flops(d, tokens=3)
    q, kv = 8, 4
    per_token = 2 * 8 * (q + 2 * kv) + 2 * q * 8 + 3 * 2 * 8 * 16  # qkv, o, gated MLP
    assert f["linear"] == 2 * per_token * 3
    assert f["attention"] == 2 * 4 * q * (1 + 2 + 3)  # token p attends to p keys (1-based)
    assert f["lm_head"] == 2 * 8 * 10  # the last position only
    assert f["total"] == f["linear"] + f["attention"] + f["lm_head"]
    assert prefill_flops(d, 6)["linear"] == 2 * f["linear"]  # linear in the prompt length
    with pytest.raises(RooflineError, match="re-export"):
        prefill_flops(TextDims(2, 8, 2, 1, 4, 10, 64), 3)  # a manifest without the MLP width


def test_gemm_throughput_is_measured_per_arithmetic():
    from edgekd.plan.roofline import measure_gemm, prefill_roofline_ms

    g = measure_gemm(32, 64, 96, threads=1, repeats=2)
    assert set(g) == {"fp32", "int8"}
    for row in g.values():
        assert row["gflops"] == max(row["by_library"].values()) > 0
        assert row["shape"] == [32, 64, 96] and row["threads"] == 1
    assert "onnxruntime MatMulInteger" in g["int8"]["by_library"]
    assert prefill_roofline_ms(2e9, 1.0) == pytest.approx(2000.0)  # 2 GFLOP at 1 GFLOP/s


def test_text_dims_of_artifacts_and_checkpoints(onnx_fp32_artifact, tiny_checkpoint, tiny_vlm):
    from edgekd.plan.roofline import text_dims_of

    tc = tiny_vlm.config.text_config
    for path, precision in ((onnx_fp32_artifact, "fp32"), (tiny_checkpoint, "fp32")):
        dims, got = text_dims_of(path)
        assert (dims.intermediate, dims.hidden, got) == (
            tc.intermediate_size,
            tc.hidden_size,
            precision,
        )
