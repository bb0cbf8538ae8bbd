"""The ONNX exporter and the export driver on the tiny model: parity, manifest, refusals, faults."""

from __future__ import annotations

import errno
import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.errors import ModelError, OutputExistsError
from edgekd.export import ExportConfig, ExportError, ParityError, export, get_exporter
from edgekd.export import onnx as onnx_export
from edgekd.export import onnx_graph as g
from edgekd.export import onnx_tied as tied
from edgekd.export.parity import Tolerance

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _decoder(artifact):
    return onnx.load(str(artifact / onnx_export.DECODER.file))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_exports_and_passes_parity(onnx_artifact, precision):
    manifest = json.loads((onnx_artifact(precision) / "manifest.json").read_text())
    parity = manifest["parity"]
    assert manifest["target"] == "onnx" and manifest["precision"] == precision
    assert parity["passed"] and all(check["pass"] for check in parity["checks"].values())
    assert parity["checks"]["preprocessing"]["pixel_max_abs"] == 0.0
    greedy = parity["checks"]["greedy"]
    if precision in ("fp32", "fp16"):  # token-exact with PyTorch generate
        assert greedy["prompts_exact"] == greedy["prompts"] == 3
    if precision == "fp32":
        assert parity["checks"]["logits"]["max_abs"] < 1e-4
        assert parity["checks"]["vision"]["max_abs"] < 1e-5
    if precision == "int8":  # exported with an eval set: the accuracy delta is measured
        accuracy = parity["checks"]["accuracy"]
        assert accuracy["samples"] == 7 and accuracy["drop"] <= accuracy["max_drop"]


def test_manifest_lists_every_file_with_sha256_and_size(onnx_artifact):
    from edgekd.io import sha256_file

    root = onnx_artifact("fp32")
    manifest = json.loads((root / "manifest.json").read_text())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, info in manifest["files"].items():
        assert info == {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    expected = {spec.file for spec in onnx_export.GRAPHS} | {
        "edgekd_onnx.json",
        "tokenizer.json",
        "processor_config.json",
    }
    assert expected <= on_disk
    listed = {f for component in manifest["components"].values() for f in component["files"]}
    assert listed == on_disk - {"manifest.json"}, "every file belongs to a component"


def test_decoder_is_one_graph_for_prefill_and_decode(onnx_artifact, tiny_vlm):
    model = _decoder(onnx_artifact("fp32"))
    n = tiny_vlm.config.text_config.num_hidden_layers
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    outputs = [o.name for o in model.graph.output]
    assert list(inputs)[:4] == ["inputs_embeds", "attention_mask", "position_ids", "logits_index"]
    assert inputs["logits_index"] == ["logits_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert outputs == ["logits"] + [
        f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_graphs_without_logits_index_still_run(onnx_artifact, tiny_vlm, tmp_path):
    """A decoder exported before logits_index (every position through the lm_head): the
    backend feeds it as it is and generation takes the last position, as before."""
    from edgekd import targets
    from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

    src = onnx_artifact("fp32")
    old = tmp_path / "old"
    shutil.copytree(src, old)
    model = _decoder(old)
    # logits_index -> (Reshape) -> Gather(hidden, index): the Gather becomes hidden itself
    names, nodes = {"logits_index"}, list(model.graph.node)
    for node in nodes:
        if node.op_type == "Gather" and node.input[1] in names:
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], list(node.output)))
        elif names & set(node.input):
            names.update(node.output)
            model.graph.node.remove(node)
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "logits_index"))
    onnx.save(model, str(old / targets.ONNX_DECODER))
    before = OnnxRuntimeBackend(old, verify=False)
    now = OnnxRuntimeBackend(src)
    assert not before.selects_logits and now.selects_logits
    ids, _ = now.encode(None, "a red circle")
    np.testing.assert_allclose(
        before.prefill_logits(ids), now.prefill_logits(ids), rtol=1e-5, atol=1e-5
    )
    assert (
        before.generate(None, "a red circle", 4).token_ids
        == now.generate(None, "a red circle", 4).token_ids
    )


def test_the_lm_head_runs_only_where_logits_are_asked_for(onnx_artifact, tiny_vlm):
    """Generation asks for the last position (a (1, 1, V) head), parity for every position;
    both agree with the model on the positions they share."""
    from edgekd.runtime.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_artifact("fp32"))
    ids, pixels = backend.encode(None, "a red circle")
    every = backend.prefill_logits(ids, pixels)
    embeds = backend.embeddings(ids)
    last, _ = backend._decode_step(embeds, backend._empty_cache(1), 0)
    assert every.shape == (1, ids.shape[1], tiny_vlm.vocab_size)
    assert last.shape == (1, 1, tiny_vlm.vocab_size)
    np.testing.assert_allclose(last[0, 0], every[0, -1], rtol=1e-5, atol=1e-5)


def test_onnx_config_describes_the_graphs(onnx_artifact, tiny_vlm):
    root = onnx_artifact("fp32")
    config = json.loads((root / "edgekd_onnx.json").read_text())["model"]
    manifest = json.loads((root / "manifest.json").read_text())
    decoder = config["decoder"]
    assert decoder["num_hidden_layers"] == 2 and decoder["num_key_value_heads"] == 2
    assert decoder["head_size"] == 16 and config["context_length"] == 2048
    assert config["eos_token_id"] == manifest["preprocessing"]["eos_token_ids"]
    assert config["image_token_id"] == tiny_vlm.image_token_id
    assert config["vision"]["num_image_tokens"] == tiny_vlm.num_image_tokens()
    graph_inputs = [i.name for i in _decoder(root).graph.input]
    assert decoder["inputs"]["past_key_names"] % 1 in graph_inputs


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_decoders_keep_no_float_matrices(onnx_artifact, precision):
    """Every weight matrix, the (tied) lm_head included, is quantized; embeddings are int8."""
    root = onnx_artifact(precision)
    decoder = _decoder(root)
    assert g.float_weights(decoder, min_elements=256) == []
    assert g.float_weights(onnx.load(str(root / onnx_export.EMBED.file)), 256) == []
    producer = {o: n for n in decoder.graph.node for o in n.output}
    head = producer["logits"]
    assert head.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "Mul", "Add")
    components = json.loads((root / "manifest.json").read_text())["components"]
    assert components["decoder"]["lm_head"].startswith("int8")
    assert components["vision"]["precision"] == "fp32"
    if precision == "int4":
        assert components["decoder"]["ops"]["MatMulNBits"] == 7 * 2  # 7 linears per layer


def _tied_graph(vocab=300, hidden=16):
    """Embedding Gather and lm_head sharing one weight through a runtime Transpose."""
    w = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["emb"], name="embed"),
        helper.make_node("Transpose", ["W"], ["WT"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["emb", "WT"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_tied_head_trap_quantizer_skips_it_unless_baked():
    trapped = g.quantize_int8(_tied_graph())
    assert g.count_ops(trapped, "MatMul") == 1, (
        "the quantizer silently skips MatMul(x, Transpose(W))"
    )
    assert g.float_weights(trapped, 1000) == [("W", (300, 16))]
    model = _tied_graph()
    assert g.bake_transposed_weights(model) == ["W.T"]
    assert g.head_matmul(model) == "lm_head"
    quantized = g.quantize_int8(model)
    assert g.count_ops(quantized, "MatMul", "Transpose") == 0
    assert [name for name, _ in g.float_weights(quantized, 1000)] == ["W"]  # the Gather's table


def test_large_graphs_are_saved_with_one_external_data_file(onnx_artifact, tmp_path, monkeypatch):
    import onnxruntime as ort

    src = onnx_artifact("fp32") / onnx_export.DECODER.file
    monkeypatch.setattr(g, "EXTERNAL_DATA_BYTES", 1000)
    files = g.save(g.load(src), tmp_path / "decoder.onnx")
    assert files == ["decoder.onnx", "decoder.onnx.data"]
    graph, data = ((tmp_path / f).stat().st_size for f in files)
    assert graph < data / 4, "the weights are in the data file"
    a = ort.InferenceSession(str(src)).get_inputs()
    b = ort.InferenceSession(str(tmp_path / "decoder.onnx")).get_inputs()
    assert [i.name for i in a] == [i.name for i in b]


def test_unknown_target_and_precision_list_the_valid_ones(tmp_path):
    with pytest.raises(ExportError, match=r"unknown export target 'tflite'; valid: .*onnx"):
        export(ExportConfig("x", "tflite", "fp32", tmp_path / "out"))
    with pytest.raises(
        ExportError, match=r"unknown precision 'int2'.*valid: fp32, fp16, int8, int4"
    ):
        export(ExportConfig("x", "onnx", "int2", tmp_path / "out"))
    assert get_exporter("onnx").precisions == PRECISIONS


def test_bad_options_are_reported_together(tiny_vlm, tmp_path):
    config = ExportConfig(
        "x", "onnx", "int4", tmp_path, options={"int4_block_size": 48, "opset": 13, "bogus": 1}
    )
    with pytest.raises(ExportError) as e:
        get_exporter("onnx").check(tiny_vlm, config)
    message = str(e.value)
    assert "bogus" in message and "int4_block_size 48" in message and "opset 13" in message
    too_big = {"int4_block_size": 1024, "opset": 99}
    big = ExportConfig("x", "onnx", "int4", tmp_path, options=too_big)
    with pytest.raises(ExportError) as e:
        get_exporter("onnx").check(tiny_vlm, big)
    assert "from 16 to 256" in str(e.value) and "opset 99 must be from 17" in str(e.value)
    vision = ExportConfig("x", "onnx", "fp32", tmp_path, options={"vision_precision": "int4"})
    with pytest.raises(ExportError, match="vision_precision 'int4' must be one of fp32, fp16"):
        get_exporter("onnx").check(tiny_vlm, vision)
    unmeasured = ExportConfig("x", "onnx", "fp32", tmp_path, options={"vision_precision": "int8"})
    with pytest.raises(ExportError, match="vision_precision=int8 needs --eval-data"):
        get_exporter("onnx").check(tiny_vlm, unmeasured)


def _int8_vision_config(root, tiny_vlm, out, **kw):
    from export_helpers import write_eval_set

    checkpoint = root / "checkpoint"
    if not checkpoint.exists():
        tiny_vlm.save_pretrained(checkpoint)
    return ExportConfig(
        str(checkpoint), "onnx", "fp32", out, n_parity_prompts=2, max_new_tokens=4,
        eval_data=write_eval_set(root / "eval"), eval_limit=4,
        options={"vision_precision": "int8"}, **kw,
    )  # fmt: skip


def test_int8_vision_encoder_is_an_option_with_its_accuracy_checked(tiny_vlm, tmp_path):
    """vision_precision=int8: an int8 tower beside an fp32 language model, recorded in the
    manifest, its answer accuracy against PyTorch's visual tokens measured and passed."""
    out = tmp_path / "onnx-vision-int8"
    manifest = export(_int8_vision_config(tmp_path, tiny_vlm, out))
    vision = onnx.load(str(out / "vision_encoder.onnx"))
    decoder = onnx.load(str(out / "decoder_model_merged.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in vision.graph.node)
    assert not any(n.op_type == "MatMulNBits" for n in decoder.graph.node)  # fp32 decoder
    weights = {t.name for t in vision.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in weights for n in vision.graph.node)
    plan = manifest["components"]["vision"]["precision"]
    assert plan.startswith("int8 weight-only (MatMulNBits 8-bit, symmetric, block 32")
    assert manifest["components"]["decoder"]["precision"] == "fp32"
    checks = manifest["parity"]["checks"]
    measured = checks["vision_accuracy"]
    assert measured["samples"] == 4 and measured["max_drop"] == onnx_export.VISION_INT8_MAX_DROP
    assert measured["pass"] and measured["drop"] <= onnx_export.VISION_INT8_MAX_DROP
    assert checks["vision"]["cosine_min_limit"] == onnx_export.VISION_INT8_COSINE


def test_int8_vision_encoder_over_its_accuracy_budget_is_refused(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "VISION_INT8_MAX_DROP", -1.0)  # any result is a drop
    out = tmp_path / "refused"
    with pytest.raises(ParityError, match="vision_accuracy: samples 4"):
        export(_int8_vision_config(tmp_path, tiny_vlm, out))
    assert not out.exists()


def test_non_llava_checkpoint_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "qwen"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ModelError) as e:
        export(ExportConfig(str(ckpt), "onnx", "fp32", tmp_path / "out"))
    assert "not a LLaVA-family VLM" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(ExportConfig(str(tiny_checkpoint), "onnx", "fp32", out))
    assert (out / "keep.txt").read_text() == "mine"


def _no_leftovers(parent, name):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def test_full_disk_mid_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    real_save = onnx.save_model

    def save_until_full(model, path, *args, **kwargs):
        if str(path).endswith(onnx_export.DECODER.file):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save_until_full)
    with pytest.raises(OSError) as e:
        export(ExportConfig(str(tiny_checkpoint), "onnx", "fp32", tmp_path / "out"))
    assert e.value.errno == errno.ENOSPC
    assert _no_leftovers(tmp_path, "out")


def test_parity_failure_raises_with_numbers_and_leaves_nothing(
    onnx_artifact, tiny_checkpoint, tmp_path, monkeypatch
):
    done = onnx_artifact("fp32")

    def copy_export(self, vlm, config, out):  # reuse the traced files: only the driver is tested
        for f in done.iterdir():
            if f.name != "manifest.json":
                shutil.copy(f, out / f.name)
        return {}

    monkeypatch.setattr(onnx_export.OnnxExporter, "export", copy_export)
    strict = Tolerance(0.0, 0.9, 0.0, 0.9, True, None)
    monkeypatch.setitem(onnx_export.TOLERANCES, "fp32", strict)
    with pytest.raises(ParityError) as e:
        export(ExportConfig(str(tiny_checkpoint), "onnx", "fp32", tmp_path / "out"))
    assert re.search(r"logits: .*max_rel [0-9.e-]+, max_rel_limit 0,", str(e.value))
    assert _no_leftovers(tmp_path, "out")


def _external_refs(path):
    """``{initializer: (location, offset, length)}`` of a graph's external tensors."""
    model = onnx.load(str(path), load_external_data=False)
    refs = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            refs[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return refs


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tied_table_is_stored_once_and_shared(onnx_artifact, tiny_vlm, precision):
    root = onnx_artifact(precision)
    data = root / tied.SHARED_DATA
    assert data.is_file()
    embed = _external_refs(root / onnx_export.EMBED.file)
    decoder = _external_refs(root / onnx_export.DECODER.file)
    shared = {tied.SHARED_TABLE, tied.SHARED_SCALE}
    assert set(embed) == shared and set(decoder) == shared
    assert embed == decoder, "both graphs point at the same bytes"
    vocab, hidden = tiny_vlm.lm_head.weight.shape
    assert (
        embed[tied.SHARED_TABLE][0] == tied.SHARED_DATA
        and embed[tied.SHARED_TABLE][2] == vocab * hidden
    )
    assert embed[tied.SHARED_SCALE][2] == 4 * vocab
    assert data.stat().st_size == max(off + n for _, off, n in embed.values())
    # No second copy: neither graph holds a vocab x hidden matrix of its own.
    for f in (onnx_export.EMBED.file, onnx_export.DECODER.file):
        model = onnx.load(str(root / f), load_external_data=False)
        own = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        assert max(int(np.prod(t.dims)) for t in own) < vocab * hidden
    assert (root / onnx_export.EMBED.file).stat().st_size < 4096
    components = json.loads((root / "manifest.json").read_text())["components"]
    assert components["shared_embedding"]["files"] == [tied.SHARED_DATA]
    assert components["embed"]["shares"] == components["decoder"]["shares"] == tied.SHARED_DATA
    assert "tied" in components["decoder"]["lm_head"]


def test_untied_model_exports_its_own_int8_head_and_the_tied_one_is_smaller(
    onnx_artifact, tokenizer, tmp_path
):
    import onnxruntime as ort

    from edgekd.models import build_vlm

    untied = build_vlm("tiny", tokenizer=tokenizer, seed=0, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.language_model.get_input_embeddings().weight
    ckpt = tmp_path / "untied"
    untied.save_pretrained(ckpt)
    out = tmp_path / "out"
    manifest = export(
        ExportConfig(str(ckpt), "onnx", "int8", out, n_parity_prompts=2, max_new_tokens=4)
    )
    assert manifest["parity"]["passed"]
    assert (
        not (out / tied.SHARED_DATA).exists() and "shared_embedding" not in manifest["components"]
    )
    head = manifest["components"]["decoder"]["lm_head"]
    assert head == "int8 per-channel, per-token int8 activations (baked, untied)"
    for f in (onnx_export.EMBED.file, onnx_export.DECODER.file):
        assert _external_refs(out / f) == {}
        ort.InferenceSession(str(out / f))
    assert g.float_weights(_decoder(out), 256) == []

    # The tied artifact holds the vocab x hidden int8 table once: the untied one twice.
    vocab, hidden = untied.lm_head.weight.shape

    def language(root):
        names = (onnx_export.EMBED.file, onnx_export.DECODER.file, tied.SHARED_DATA)
        return sum((root / n).stat().st_size for n in names if (root / n).exists())

    saved = language(out) - language(onnx_artifact("int8"))
    assert saved >= 0.9 * vocab * hidden, (saved, vocab * hidden)
