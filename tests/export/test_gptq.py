"""GPTQ int4 blocks: closer layer outputs than rounding, their grid, their MatMulNBits form."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.export import ExportConfig, ExportError, get_exporter, gptq
from edgekd.export import onnx_graph as g


def _inputs(rng, tokens: int, n_in: int, seed: int = 0) -> np.ndarray:
    """Correlated inputs with a few loud channels, as a transformer's are (the channels and
    their mixing are fixed by ``seed``; the samples come from ``rng``)."""
    fixed = np.random.default_rng(seed)
    mix = np.eye(n_in) + 0.8 * fixed.standard_normal((n_in, n_in)) / np.sqrt(n_in)
    loud = fixed.choice(n_in, 3, replace=False)
    x = rng.standard_normal((tokens, n_in)) @ mix
    x[:, loud] *= 20.0
    return x.astype(np.float32)


def _rounded(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Round-to-nearest on the same block grid GPTQ uses."""
    import torch

    t = torch.from_numpy(w).double()
    scale, zero = gptq.block_grid(t, bits, group)
    s, z = scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1)
    return ((t / s + z).round().clamp(0, 2**bits - 1).sub(z) * s).float().numpy()


def test_gptq_layer_outputs_are_closer_than_rounding_on_unseen_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    calib, held_out = _inputs(rng, 512, 128), _inputs(rng, 256, 128)
    blocks = gptq.quantize_weight(w, calib.T @ calib / len(calib), bits=4, group=32)

    def err(w_hat):
        return float(np.square(held_out @ (w - w_hat).T).mean())

    assert err(blocks.dequantize()) < 0.7 * err(_rounded(w, 4, 32))


@pytest.mark.parametrize("n_in", [64, 40])  # 40: padded to two blocks of 32
def test_levels_lie_on_each_blocks_grid(n_in):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, n_in)).astype(np.float32)
    x = _inputs(rng, 128, n_in)
    blocks = gptq.quantize_weight(w, x.T @ x, bits=4, group=32)
    assert blocks.q.shape == (8, 64) and blocks.scale.shape == blocks.zero.shape == (8, 2)
    assert blocks.q.max() <= 15 and blocks.zero.max() <= 15
    assert blocks.dequantize().shape == (8, n_in)
    assert np.all(blocks.q[:, n_in:] == np.repeat(blocks.zero, 32, axis=1)[:, n_in:])
    # every block's range holds the original weights' range (0 included)
    got = blocks.dequantize()
    assert np.abs(got - w).max() <= blocks.scale.max() * 8


def _one_matmul(w: np.ndarray):
    n_out, n_in = w.shape
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", n_out])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("n_in", [64, 40])
def test_written_blocks_run_in_onnxruntime_as_their_weights(n_in):
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, n_in)).astype(np.float32)
    x = _inputs(rng, 64, n_in)
    blocks = gptq.quantize_weight(w, x.T @ x, bits=4, group=32)
    model = _one_matmul(w)
    assert g.write_nbits(model, {gptq.weight_key(w): [blocks]}, accuracy_level=None, exclude=[])
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    expected = x @ blocks.dequantize().T
    assert np.abs(y - expected).max() <= 1e-4 * np.abs(expected).max()


def test_write_nbits_refuses_a_weight_it_has_no_blocks_for():
    w = np.ones((4, 32), np.float32)
    with pytest.raises(ValueError, match="no quantized blocks for mm's weight"):
        g.write_nbits(_one_matmul(w), {}, accuracy_level=4, exclude=[])
    model = _one_matmul(w)  # the excluded head is left as it is
    assert g.write_nbits(model, {}, accuracy_level=4, exclude=["mm"]) == 0


def test_int4_manifest_records_the_calibration(onnx_artifact):
    components = json.loads((onnx_artifact("int4") / "manifest.json").read_text())["components"]
    decoder = components["decoder"]
    assert "GPTQ asymmetric, calibrated on 32 synthetic image prompts" in decoder["precision"]
    calibration = decoder["calibration"]
    assert calibration["method"] == "gptq" and calibration["samples"] == 32
    assert calibration["source"] == "synthetic" and calibration["tokens"] > 32


def test_calibration_prompts_are_apart_from_the_parity_prompts(tiny_vlm, tmp_path):
    from edgekd.export import parity

    config = ExportConfig("x", "onnx", "int4", tmp_path)
    calib = gptq.calibration_prompts(tiny_vlm, config, None, 4)
    checked = parity.cases(tiny_vlm, config)
    assert len(calib) == 4
    assert not any(np.array_equal(c.pixel_values, p.pixel_values) for c in calib for p in checked)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"int4_method": "awq"}, "int4_method 'awq'; valid: gptq, rtn"),
        ({"calibration_samples": 0}, "calibration_samples 0 must be an integer from 1 to 1024"),
        ({"calibration_samples": 10**6}, "calibration_samples 1000000 must be"),
        ({"calibration_samples": "many"}, "calibration_samples 'many' must be"),
        ({"calibration_data": "/no/such.json"}, "calibration_data '/no/such.json' is not a file"),
    ],
)
def test_bad_gptq_options_are_refused_in_one_line(tiny_vlm, tmp_path, options, message):
    config = ExportConfig("x", "onnx", "int4", tmp_path, options=options)
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        get_exporter("onnx").check(tiny_vlm, config)


def test_q4_0_rows_are_the_blocks_llama_cpp_reads():
    """edgekd's Q4_0 bytes decode (gguf's reference dequantizer) to GPTQ's weights exactly."""
    gguf = pytest.importorskip("gguf")
    from edgekd.export.gguf_write import encode_q4_0

    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    x = _inputs(rng, 128, 96)
    blocks = gptq.quantize_weight(w, x.T @ x, grid="ggml_q4_0")
    assert np.all(blocks.zero == 8)
    decoded = gguf.quants.dequantize(
        encode_q4_0(blocks.q, blocks.scale), gguf.GGMLQuantizationType.Q4_0
    )
    np.testing.assert_array_equal(decoded, blocks.dequantize())


def test_iq4_nl_rows_are_the_blocks_llama_cpp_reads():
    """GPTQ on IQ4_NL's 16 non-uniform levels: every weight is scale x a table level, the
    block's signed absmax lands on -127 exactly, the bytes decode (gguf's reference) to GPTQ's
    weights, and the layer's outputs beat rounding each weight to its nearest level."""
    gguf = pytest.importorskip("gguf")
    import torch

    from edgekd.export.gguf_write import encode_q4_0

    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    calib, held_out = _inputs(rng, 512, 96), _inputs(rng, 256, 96)
    blocks = gptq.quantize_weight(w, calib.T @ calib, grid="ggml_iq4_nl")
    book = np.asarray(gptq.CODEBOOKS["ggml_iq4_nl"], np.float32)
    assert blocks.q.max() <= 15 and blocks.scale.shape == (6, 3)
    decoded = gguf.quants.dequantize(
        encode_q4_0(blocks.q, blocks.scale), gguf.GGMLQuantizationType.IQ4_NL
    )
    np.testing.assert_array_equal(decoded, blocks.dequantize())
    scale = np.repeat(blocks.scale, 32, axis=1)
    np.testing.assert_allclose(blocks.dequantize(), book[blocks.q] * scale)
    peak = np.abs(w.reshape(6, 3, 32)).argmax(-1)
    signed = np.take_along_axis(w.reshape(6, 3, 32), peak[..., None], -1)[..., 0]
    np.testing.assert_allclose(signed / blocks.scale, -127, rtol=2e-3)  # fp16 scale
    d = torch.from_numpy(blocks.scale).double().repeat_interleave(32, 1)
    nearest = book[np.abs(w[..., None] / d.numpy()[..., None] - book).argmin(-1)] * d.numpy()

    def err(w_hat):
        return float(np.square(held_out @ (w - w_hat).T).mean())

    assert err(blocks.dequantize()) < 0.7 * err(nearest)
