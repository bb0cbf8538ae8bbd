"""TensorRT export: shapes, options, fallback layers, calibration data and the builder's use of
the TensorRT API (through a strict stand-in), all without TensorRT; end-to-end engine builds and
parity are marked ``tensorrt`` and run only where ``tensorrt`` imports and a CUDA GPU exists."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.export.base import ExportConfig, ExportError, ParityError, get_exporter
from edgekd.export.parity import compare, report, token_agreement
from edgekd.export.tensorrt import (
    INSTALL_HINT,
    TOLERANCES,
    TensorRTExporter,
    calibration_batches,
    engine_shapes,
    environment_problem,
    fp32_layer_names,
    model_dims,
    resolve_options,
    tensorrt_profiles,
    workspace_bytes,
)
from edgekd.export.tensorrt_build import ShapeRange, build_engine, fit_profile, has_qdq
from edgekd.export.tensorrt_parity import sample_inputs
from edgekd.profiles import load_device_profile
from edgekd.runtime.base import BackendError

TRT_PROFILES = [
    "a100-80gb",
    "h100-80gb",
    "jetson-agx-orin-64gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "rtx-4090",
]


def _trt_ready() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return torch.cuda.is_available()


needs_tensorrt = pytest.mark.skipif(
    not _trt_ready(), reason="needs the tensorrt package and a CUDA GPU"
)


@pytest.fixture(scope="module")
def preset_config(tokenizer):
    """The paper student's shapes (Qwen2-0.5B + SigLIP-so400m, 728 visual tokens), no weights."""
    from edgekd.models.factory import build_config, get_shape

    return build_config(get_shape("qwen2-0.5b-siglip-so400m"), tokenizer)


def _config(tmp_path: Path, precision: str = "fp16", **kw) -> ExportConfig:
    args = {"profile": "jetson-orin-nano-8gb", "n_parity_prompts": 3, **kw}
    return ExportConfig("ckpt", "tensorrt", precision, tmp_path / "out", **args)


# ---- registration, profiles, shapes -----------------------------------------------------------


def test_registered_with_its_precisions():
    exporter = get_exporter("tensorrt")
    assert isinstance(exporter, TensorRTExporter)
    assert exporter.precisions == ("fp32", "fp16", "int8")


def test_tensorrt_profiles_are_the_gpu_and_jetson_ones():
    names = tensorrt_profiles()
    assert set(TRT_PROFILES) <= set(names)
    assert "cpu-x86_64" not in names


@pytest.mark.parametrize("profile", TRT_PROFILES)
@pytest.mark.parametrize("model", ["tiny_vlm", "preset_config"])
def test_engine_shapes_follow_the_profile(profile, model, request):
    source = request.getfixturevalue(model)
    device = load_device_profile(profile)
    s, d = device.tensorrt, model_dims(source)
    shapes = engine_shapes(device, source)

    assert list(shapes) == ["vision", "embed", "decoder"]
    assert list(shapes["decoder"]) == ["prefill", "decode"]  # profile indices 0 and 1
    for engine in shapes.values():
        for ranges in engine.values():
            for name, r in ranges.items():
                assert len(r.min) == len(r.opt) == len(r.max)
                assert all(0 <= lo <= opt <= hi for lo, opt, hi in zip(r.min, r.opt, r.max))
                if name != "logits_index":  # positions, not a batch
                    assert (r.min[0], r.opt[0], r.max[0]) == (1, 1, s.max_batch)

    context = s.max_past_len
    kv = [f"past_key_values.{i}.{k}" for i in range(d.num_layers) for k in ("key", "value")]
    prefill, decode = shapes["decoder"]["prefill"], shapes["decoder"]["decode"]
    inputs = {"inputs_embeds", "attention_mask", "position_ids", "logits_index", *kv}
    assert set(prefill) == set(decode) == inputs

    seq = prefill["inputs_embeds"]
    assert seq.max == (s.max_batch, min(s.max_seq_len, context), d.hidden_size)
    assert seq.opt[1] == min(s.opt_seq_len, seq.max[1])
    assert seq.max[1] >= d.visual_tokens + 1  # one image plus a prompt fits
    for name in ("attention_mask", "position_ids"):
        assert prefill[name].max[1] == seq.max[1] and prefill[name].min[1] == 1
    for name in kv:  # prefill: empty cache; past + seq within the context
        assert prefill[name].max == (s.max_batch, d.num_kv_heads, 0, d.head_dim)
        assert prefill[name].max[2] + seq.max[1] <= context

    # generation asks for the last position's logits; parity for every prompt position
    assert prefill["logits_index"].opt == (1,) and prefill["logits_index"].max == (seq.max[1],)
    assert decode["logits_index"].min == decode["logits_index"].max == (1,)
    for name in ("inputs_embeds", "position_ids"):  # decode: exactly one new token
        r = decode[name]
        assert r.min[1] == r.opt[1] == r.max[1] == 1
    assert decode["inputs_embeds"].max[2] == d.hidden_size
    for name in kv:
        past = decode[name]
        assert past.min[2] >= 1 and past.max[2] + 1 <= context
        assert (past.min[1], past.min[3]) == (d.num_kv_heads, d.head_dim)
        mask = decode["attention_mask"]
        assert [mask.min[1], mask.opt[1], mask.max[1]] == [
            past.min[2] + 1,
            past.opt[2] + 1,
            past.max[2] + 1,
        ]

    assert shapes["vision"]["images"]["pixel_values"].max == (s.max_batch, 3, *d.image_size)
    assert shapes["embed"]["tokens"]["input_ids"].max == (s.max_batch, seq.max[1])


def test_model_dims_of_the_preset(preset_config):
    d = model_dims(preset_config)
    assert (d.num_layers, d.num_kv_heads, d.head_dim, d.hidden_size) == (24, 2, 64, 896)
    assert (d.visual_tokens, d.image_size) == (728, (384, 384))


def test_engine_shapes_refuse_a_profile_too_small_for_an_image(preset_config):
    small = load_device_profile(
        "jetson-orin-nano-8gb", overrides={"tensorrt.max_seq_len": 512, "tensorrt.opt_seq_len": 256}
    )
    with pytest.raises(ExportError, match=r"max_seq_len 512 .* 728 visual tokens"):
        engine_shapes(small, preset_config)


def test_a_profile_without_tensorrt_block_is_refused(tiny_vlm):
    with pytest.raises(ExportError, match="no tensorrt block.*jetson-orin-nano-8gb"):
        engine_shapes("cpu-x86_64", tiny_vlm)
    with pytest.raises(ExportError, match="no tensorrt block"):
        workspace_bytes("cpu-x86_64")


@pytest.mark.parametrize("profile", TRT_PROFILES)
def test_workspace_from_the_profile(profile):
    gb = load_device_profile(profile).tensorrt.workspace_gb
    assert workspace_bytes(profile) == int(gb * 2**30)


def test_workspace_pinned_number():
    assert workspace_bytes("jetson-orin-nano-8gb") == 1_073_741_824  # 1 GiB


def test_fit_profile_takes_static_dims_and_a_single_input_by_position():
    r = ShapeRange((1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64))
    static = types.SimpleNamespace(name="pixels", shape=(1, 3, 64, 64))
    fitted = fit_profile({"pixel_values": r}, [static], "vision_encoder.onnx")
    assert fitted == {"pixels": ShapeRange((1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64))}
    dynamic = types.SimpleNamespace(name="pixel_values", shape=(-1, 3, 64, 64))
    assert fit_profile({"pixel_values": r}, [dynamic], "v.onnx")["pixel_values"] == r


def test_fit_profile_names_a_missing_range_and_a_rank_mismatch():
    r = ShapeRange((1, 1), (1, 4), (2, 8))
    a = types.SimpleNamespace(name="attention_mask", shape=(-1, -1))
    extra = types.SimpleNamespace(name="cache_position", shape=(-1,))
    with pytest.raises(ExportError, match="input 'cache_position' has no shape range"):
        fit_profile({"attention_mask": r, "position_ids": r}, [a, extra], "decoder.onnx")
    wrong = types.SimpleNamespace(name="attention_mask", shape=(-1, -1, -1))
    with pytest.raises(ExportError, match="rank 3"):
        fit_profile({"attention_mask": r, "position_ids": r}, [wrong], "decoder.onnx")


# ---- fp32 fallback layers ----------------------------------------------------------------------


def _norm_graph(path: Path | None = None, qdq: bool = False):
    """LayerNorm -> MatMul -> Softmax, then Pow and ReduceMean (RMSNorm-like), opset 18."""
    from onnx import TensorProto, helper, numpy_helper

    f = np.float32
    inits = [
        numpy_helper.from_array(np.ones(8, f), "scale"),
        numpy_helper.from_array(np.zeros(8, f), "bias"),
        numpy_helper.from_array(np.eye(8, dtype=f), "w"),
        numpy_helper.from_array(np.array(2.0, f), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w"], ["m"], name="mm"),
        helper.make_node("Softmax", ["m"], ["s"], name="sm", axis=-1),
        helper.make_node("Pow", ["s", "two"], ["p"], name="pow"),
        helper.make_node("ReduceMean", ["p", "axes"], ["y"], name="rm", keepdims=1),
        helper.make_node("Relu", ["y"], ["z"]),  # unnamed, not a fallback op
    ]
    if qdq:
        inits.append(numpy_helper.from_array(np.array(0.1, f), "q_scale"))
        nodes += [
            helper.make_node("QuantizeLinear", ["z", "q_scale"], ["zq"], name="q"),
            helper.make_node("DequantizeLinear", ["zq", "q_scale"], ["out"], name="dq"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["out"], name="id"))
    graph = helper.make_graph(
        nodes,
        "norms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    import onnx

    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


def test_fp32_layer_names_finds_the_norm_softmax_pow_reducemean_nodes(tmp_path):
    model = _norm_graph(tmp_path / "g.onnx")
    assert fp32_layer_names(model) == ["ln", "sm", "pow", "rm"]
    assert fp32_layer_names(tmp_path / "g.onnx") == ["ln", "sm", "pow", "rm"]
    assert fp32_layer_names(model, ops=("Softmax",)) == ["sm"]


def test_fp32_layer_names_of_a_torch_onnx_export(tmp_path):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.proj(self.norm(x)), dim=-1)

    path = tmp_path / "block.onnx"
    torch.onnx.export(
        Block().eval(), (torch.randn(1, 4, 8),), str(path), opset_version=18, dynamo=True
    )
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    names = fp32_layer_names(path)
    assert sorted(ops[n] for n in names) == ["LayerNormalization", "Softmax"]


def test_has_qdq(tmp_path):
    _norm_graph(tmp_path / "plain.onnx")
    _norm_graph(tmp_path / "qdq.onnx", qdq=True)
    assert not has_qdq(tmp_path / "plain.onnx")
    assert has_qdq(tmp_path / "qdq.onnx")


# ---- environment and config checks -----------------------------------------------------------


def test_check_without_tensorrt_is_one_clear_line(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(ExportError) as err:
        TensorRTExporter().check(tiny_vlm, _config(tmp_path))
    msg = str(err.value)
    # exactly one problem, on one line: the hint and why the import failed
    assert re.fullmatch(re.escape(INSTALL_HINT) + r" \(import tensorrt: [^)\n]+\)", msg)
    assert "pip install edgekd[tensorrt]" in msg and "JetPack" in msg


def test_check_reports_every_problem_at_once(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    config = _config(tmp_path, precision="int4", profile=None, options={"workspace": 2})
    with pytest.raises(ExportError) as err:
        TensorRTExporter().check(tiny_vlm, config)
    msg = str(err.value)
    assert msg.startswith(INSTALL_HINT)
    assert "precision 'int4' is not supported by tensorrt; valid: fp32, fp16, int8" in msg
    assert "option 'workspace' is unknown; valid: fp32_fallback" in msg
    assert "profile: TensorRT export needs a device profile" in msg and "rtx-4090" in msg
    assert "\n" not in msg


def test_check_refuses_a_cpu_profile(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ExportError, match="'cpu-x86_64' has no tensorrt block"):
        TensorRTExporter().check(tiny_vlm, _config(tmp_path, profile="cpu-x86_64"))


def _fake_tensorrt(monkeypatch, version: str, cuda: bool) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def test_environment_needs_a_gpu(monkeypatch):
    _fake_tensorrt(monkeypatch, "10.9.0.34", cuda=False)
    assert (
        environment_problem() == f"{INSTALL_HINT} (no CUDA GPU: torch.cuda.is_available() is False)"
    )


def test_environment_needs_tensorrt_10(monkeypatch):
    _fake_tensorrt(monkeypatch, "11.0.0", cuda=True)
    problem = environment_problem()
    assert "TensorRT 11.0.0 found" in problem and "pip install 'tensorrt>=10,<11'" in problem


def test_environment_ok_with_tensorrt_10_and_a_gpu(monkeypatch):
    _fake_tensorrt(monkeypatch, "10.9.0.34", cuda=True)
    assert environment_problem() is None


def test_backend_without_tensorrt_is_one_clear_line(monkeypatch):
    from edgekd.runtime.tensorrt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError) as err:
        import_tensorrt()
    assert "needs the tensorrt package and an NVIDIA GPU" in str(err.value)
    assert "\n" not in str(err.value)


def test_options_defaults_and_overrides():
    opts, problems = resolve_options("fp16", {})
    assert problems == []
    assert (opts.fp32_fallback, opts.kv_cache_dtype, opts.calibration_samples) == (
        "auto",
        "fp16",
        16,
    )
    assert opts.tolerance == TOLERANCES["fp16"]
    assert resolve_options("fp32", {})[0].kv_cache_dtype == "fp32"
    opts, _ = resolve_options("int8", {"min_logits_cosine": 0.9, "fp32_fallback": "never"})
    assert opts.tolerance.logits_cosine == 0.9 and opts.fp32_fallback == "never"


def test_options_problems_name_the_option():
    bad = {"fp32_fallback": "sometimes", "kv_cache_dtype": "int8", "calibration_samples": 0}
    _, problems = resolve_options("int8", {**bad, "min_token_agreement": 2})
    text = "; ".join(problems)
    assert "option 'fp32_fallback' must be one of auto, always, never, got 'sometimes'" in text
    assert "option 'kv_cache_dtype' must be one of fp16, fp32" in text
    assert "option 'calibration_samples' must be an integer >= 1, got 0" in text
    assert "option 'min_token_agreement' must be a number in [0, 1], got 2" in text
    _, problems = resolve_options("fp16", {"vision_precision": "int4"})
    assert problems == ["option 'vision_precision' must be one of fp32, fp16, int8, got 'int4'"]


def test_int8_vision_engine_option(tiny_vlm, tmp_path):
    """vision_precision: the engine's precision (fp16 by default, fp32 for fp32); int8 takes
    the int8 floors for image-dependent checks, and needs an eval set to calibrate on."""
    from edgekd.export import onnx as onnx_export

    assert resolve_options("fp16", {})[0].vision_precision == "fp16"
    assert resolve_options("fp32", {})[0].vision_precision == "fp32"
    assert resolve_options("int8", {})[0].vision_precision == "fp16"
    opts = resolve_options("fp16", {"vision_precision": "int8"})[0]
    assert opts.vision_precision == "int8"
    assert opts.tolerance.vision_cosine == onnx_export.VISION_INT8_COSINE
    assert opts.tolerance.logits_cosine == TOLERANCES["int8"].logits_cosine
    config = _config(tmp_path, options={"vision_precision": "int8"})
    with pytest.raises(ExportError, match="vision_precision=int8 needs --eval-data"):
        get_exporter("tensorrt").check(tiny_vlm, config)


def test_vision_calibration_batches_are_the_eval_images(tiny_vlm, tmp_path):
    from export_helpers import write_eval_set

    from edgekd.export.tensorrt import vision_calibration_batches

    eval_data = write_eval_set(tmp_path / "eval", n=6)  # six images, one text-only sample
    batches = vision_calibration_batches(tiny_vlm, _config(tmp_path, eval_data=eval_data), 3)
    size = tiny_vlm.config.vision_config.image_size
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(1, 3, size, size)] * 3
    everything = vision_calibration_batches(tiny_vlm, _config(tmp_path, eval_data=eval_data), 99)
    assert len(everything) == 6  # every image, the text-only sample skipped


# ---- samples, calibration data, parity numbers ------------------------------------------------


def test_sample_inputs_are_encoded_prompts_with_images(tiny_vlm, tmp_path):
    samples = sample_inputs(tiny_vlm, _config(tmp_path))
    assert len(samples) == 3
    for s in samples:
        assert s["input_ids"].dtype == torch.long and s["input_ids"].dim() == 1
        assert int((s["input_ids"] == tiny_vlm.image_token_id).sum()) == 16
        assert s["pixel_values"].shape == (3, 64, 64)
    other = sample_inputs(tiny_vlm, _config(tmp_path), n=2, offset=1000)
    assert not torch.equal(other[0]["pixel_values"], samples[0]["pixel_values"])


def test_calibration_batches_have_the_decoder_input_shapes(tiny_vlm, tmp_path):
    samples = sample_inputs(tiny_vlm, _config(tmp_path))
    d = model_dims(tiny_vlm)
    batches = calibration_batches(tiny_vlm, samples, batch_size=2)
    assert len(batches) == 1  # 3 samples, batches of 2: the incomplete one is dropped
    (batch,) = batches
    seq = min(len(s["input_ids"]) for s in samples)
    assert batch["inputs_embeds"].shape == (2, seq, d.hidden_size)
    assert batch["inputs_embeds"].dtype == torch.float32
    assert torch.equal(batch["attention_mask"], torch.ones(2, seq, dtype=torch.long))
    assert torch.equal(batch["position_ids"][0], torch.arange(seq))
    kv = [f"past_key_values.{i}.{k}" for i in range(d.num_layers) for k in ("key", "value")]
    for name in kv:
        assert batch[name].shape == (2, d.num_kv_heads, 0, d.head_dim)
    assert batch["logits_index"].tolist() == [seq - 1]
    assert set(batch) == {"inputs_embeds", "attention_mask", "position_ids", "logits_index", *kv}
    with torch.no_grad():  # the merged prompt embeddings PyTorch computes before the decoder
        ids, pv = samples[0]["input_ids"][None], samples[0]["pixel_values"][None]
        ref = tiny_vlm.merge(
            tiny_vlm.embed(ids), tiny_vlm.project(tiny_vlm.vision_features(pv)), ids
        )
    torch.testing.assert_close(batch["inputs_embeds"][0], ref[0, -seq:])


def test_calibration_batches_left_pad_short_prompts(tiny_vlm, tmp_path):
    samples = sample_inputs(tiny_vlm, _config(tmp_path, n_parity_prompts=1))
    length = len(samples[0]["input_ids"])
    (batch,) = calibration_batches(tiny_vlm, samples, seq_len=length + 3)
    assert batch["attention_mask"][0, :3].tolist() == [0, 0, 0]
    assert batch["attention_mask"][0, 3:].all()
    assert batch["position_ids"][0, 3:].tolist() == list(range(length))
    assert batch["inputs_embeds"][0, :3].abs().sum() == 0


def test_compare_and_token_agreement():
    a = torch.randn(2, 5, 7)
    same = compare(a, a.clone())
    assert same["max_abs"] == 0 and same["cosine_min"] == pytest.approx(1.0)
    orth = compare(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert orth["cosine_min"] == pytest.approx(0.0) and orth["max_abs"] == 2.0
    with pytest.raises(ParityError, match="shape"):
        compare(a, a[:, :4])
    assert token_agreement([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert token_agreement([1, 2], [1, 2, 9]) == 1.0


def test_failures_carry_the_numbers(tmp_path):
    from edgekd.export.parity import limits

    tol = TOLERANCES["fp16"]
    numbers = {"max_abs": 0.5, "max_rel": 0.5, "cosine_min": 0.98, "cosine_mean": 0.99}
    checks = {
        "vision": limits(numbers, tol.vision_max_rel, tol.vision_cosine),
        "logits": limits({**numbers, "cosine_min": 0.9999}, tol.logits_max_rel, 0.995),
        "greedy": {"prompts": 4, "token_agreement": 0.25, "pass": 0.25 >= tol.token_agreement},
    }
    with pytest.raises(ParityError) as err:
        report(_config(tmp_path, precision="fp16"), tol, checks)
    msg = str(err.value)
    assert "vision: max_abs 0.5, max_rel 0.5, max_rel_limit None, cosine_min 0.98, " in msg
    assert "cosine_min_limit 0.999" in msg and "greedy: prompts 4, token_agreement 0.25" in msg
    assert "logits" not in msg.split(":", 1)[1]
    assert err.value.report["checks"]["vision"]["pass"] is False


# ---- the builder against a strict stand-in of the TensorRT 10 API ------------------------------
# The stand-in implements exactly the calls documented for TensorRT 10 (no catch-all
# attributes), so a misspelt or removed API in build_engine fails here.


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype
        self.is_execution_tensor = True


class _Layer:
    def __init__(self, name, type_, outputs):
        self.name, self.type, self._outputs = name, type_, outputs
        self.precision, self.output_types = None, {}

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, i):
        return self._outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class _Network:
    def __init__(self):
        self.inputs, self.outputs, self.layers = [], [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_layer(self, i):
        return self.layers[i]


def _fake_trt(plan: bytes | None = b"plan"):
    trt = types.SimpleNamespace(__version__="10.9.0.34", float32="FLOAT", float16="HALF")
    trt.Logger = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(
        FP16="FP16", INT8="INT8", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY"
    )
    trt.LayerType = types.SimpleNamespace(CONSTANT="CONSTANT", NORMALIZATION="NORMALIZATION")
    trt.calls = []

    class ILogger:
        def __init__(self):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class OnnxParser:
        def __init__(self, network, logger):
            assert isinstance(logger, ILogger)
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx

            model = onnx.load(path)
            net, dtypes = self.network, {1: "FLOAT", 7: "INT64", 10: "HALF"}
            for v, where in [(v, net.inputs) for v in model.graph.input] + [
                (v, net.outputs) for v in model.graph.output
            ]:
                dims = [
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in v.type.tensor_type.shape.dim
                ]
                where.append(_Tensor(v.name, dims, dtypes[v.type.tensor_type.elem_type]))
            for node in model.graph.node:  # LayerNorm gets a parser sub-layer "<name>_1"
                names = [node.name] + (
                    [node.name + "_1"] if node.op_type == "LayerNormalization" else []
                )
                for name in names:
                    out = _Tensor(name + ":0", (), "INT64" if node.op_type == "Shape" else "FLOAT")
                    net.layers.append(_Layer(name, node.op_type.upper(), [out]))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []
            self.int8_calibrator, self.calibration_profile = None, None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)
            trt.calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            assert flags == 0  # TensorRT 10: explicit batch only, no flag
            trt.network = _Network()
            return trt.network

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if plan is None:
                self.logger.log(trt.Logger.ERROR, "out of workspace")
            return plan

    trt.ILogger, trt.IInt8EntropyCalibrator2 = ILogger, IInt8EntropyCalibrator2
    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


def _norm_profiles(batch_max=4):
    return {"main": {"x": ShapeRange((1, 4, 8), (1, 4, 8), (batch_max, 4, 8))}}


def test_build_engine_fp16_with_fp32_fallback_layers(tmp_path):
    _norm_graph(tmp_path / "g.onnx")
    trt = _fake_trt()
    info = build_engine(
        trt, tmp_path / "g.onnx", tmp_path / "g.engine", _norm_profiles(), precision="fp16",
        workspace=1 << 30, fp32_layers=fp32_layer_names(tmp_path / "g.onnx"),
    )  # fmt: skip
    assert (tmp_path / "g.engine").read_bytes() == b"plan"
    assert trt.config.flags == {"FP16", "OBEY"}
    assert trt.config.pools == {"WORKSPACE": 1 << 30}
    (profile,) = trt.config.profiles
    assert profile.shapes == {"x": ((1, 4, 8), (1, 4, 8), (4, 4, 8))}
    assert info["fp32_layers"] == ["ln", "ln_1", "sm", "pow", "rm"]
    for layer in trt.network.layers:
        pinned = layer.name in info["fp32_layers"]
        assert (layer.precision == "FLOAT") == pinned
        assert layer.output_types == ({0: "FLOAT"} if pinned else {})
    assert info["profiles"] == {
        "main": {"x": {"min": [1, 4, 8], "opt": [1, 4, 8], "max": [4, 4, 8]}}
    }
    assert (info["inputs"], info["outputs"], info["precision"]) == (["x"], ["out"], "fp16")


def test_build_engine_fp32_turns_tf32_off_and_pins_nothing(tmp_path):
    _norm_graph(tmp_path / "g.onnx")
    trt = _fake_trt()
    build_engine(
        trt, tmp_path / "g.onnx", tmp_path / "g.engine", _norm_profiles(), precision="fp32",
        workspace=1,
    )  # fmt: skip
    assert ("clear_flag", "TF32") in trt.calls and trt.config.flags == set()
    assert all(layer.precision is None for layer in trt.network.layers)


def test_build_engine_sets_kv_cache_io_types(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"], name="i")],
        "kv",
        [
            helper.make_tensor_value_info(
                "past_key_values.0.key", TensorProto.FLOAT, ["b", 2, "p", 4]
            )
        ],
        [helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["b", 2, "p", 4])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "kv.onnx"))
    trt = _fake_trt()
    r = ShapeRange((1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 0, 4))
    build_engine(
        trt, tmp_path / "kv.onnx", tmp_path / "kv.engine", {"p": {"past_key_values.0.key": r}},
        precision="fp16", workspace=1, io_dtypes={"past_key_values.": "fp16", "present.": "fp16"},
    )  # fmt: skip
    assert trt.network.inputs[0].dtype == trt.network.outputs[0].dtype == "HALF"


def test_build_engine_int8_calibrates_at_one_shape_unless_qdq(tmp_path):
    _norm_graph(tmp_path / "g.onnx")
    trt = _fake_trt()
    batches = [{"x": torch.randn(2, 4, 8)}, {"x": torch.randn(2, 4, 8)}]
    info = build_engine(
        trt, tmp_path / "g.onnx", tmp_path / "g.engine", _norm_profiles(), precision="int8",
        workspace=1, calibration=batches, calibration_cache=tmp_path / "g.calib",
    )  # fmt: skip
    assert trt.config.flags == {"FP16", "INT8"}
    assert isinstance(trt.config.int8_calibrator, trt.IInt8EntropyCalibrator2)
    assert trt.config.int8_calibrator.get_batch_size() == 1
    assert trt.config.calibration_profile.shapes == {"x": ((2, 4, 8),) * 3}
    assert info["quantization"] == "calibrated (entropy v2)"
    with pytest.raises(ExportError, match="calibration batches"):
        build_engine(
            _fake_trt(), tmp_path / "g.onnx", tmp_path / "g.engine", _norm_profiles(),
            precision="int8", workspace=1,
        )  # fmt: skip

    _norm_graph(tmp_path / "q.onnx", qdq=True)
    trt = _fake_trt()
    info = build_engine(
        trt, tmp_path / "q.onnx", tmp_path / "q.engine", _norm_profiles(), precision="int8",
        workspace=1,
    )  # fmt: skip
    assert info["quantization"] == "explicit (Q/DQ)" and trt.config.int8_calibrator is None


def test_build_engine_failure_carries_tensorrts_error(tmp_path):
    _norm_graph(tmp_path / "g.onnx")
    with pytest.raises(ExportError, match="could not build g.engine from g.onnx: out of workspace"):
        build_engine(
            _fake_trt(plan=None), tmp_path / "g.onnx", tmp_path / "g.engine", _norm_profiles(),
            precision="fp16", workspace=1,
        )  # fmt: skip
    assert not (tmp_path / "g.engine").exists()


# ---- end to end on a GPU with TensorRT -----------------------------------------------------------


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize(
    ("precision", "options"),
    [("fp16", {}), ("fp16", {"fp32_fallback": "always"}), ("int8", {"calibration_samples": 4})],
)
def test_export_builds_engines_that_match_pytorch(tiny_checkpoint, tmp_path, precision, options):
    from PIL import Image

    from edgekd.export import export
    from edgekd.runtime.tensorrt import TensorRTBackend

    out = tmp_path / f"trt-{precision}"
    config = ExportConfig(
        str(tiny_checkpoint), "tensorrt", precision, out, profile="jetson-orin-nano-8gb",
        n_parity_prompts=2, max_new_tokens=4, options=options,
    )  # fmt: skip
    manifest = export(config)

    assert manifest["target"] == "tensorrt" and manifest["precision"] == precision
    for name in ("vision.engine", "embed.engine", "decoder.engine", "engines.json"):
        assert name in manifest["files"]
    assert "onnx/decoder_model_merged.onnx" in manifest["files"]
    tol, parity = TOLERANCES[precision], manifest["parity"]["checks"]
    assert parity["vision"]["cosine_min"] >= tol.vision_cosine
    assert parity["logits"]["cosine_min"] >= tol.logits_cosine
    assert parity["greedy"]["token_agreement"] >= tol.token_agreement

    engines = json.loads((out / "engines.json").read_text())["engines"]
    assert list(engines["decoder"]["profiles"]) == ["prefill", "decode"]
    assert engines["decoder"]["precision"] == precision
    if options.get("fp32_fallback") == "always":
        assert engines["vision"]["fp32_layers"]

    backend = TensorRTBackend(out)  # verifies the manifest first
    image = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    gen = backend.generate(image, "What shape is in the image?", max_new_tokens=4)
    assert 1 <= len(gen.token_ids) <= 4
    assert gen.prompt_tokens > 16 and gen.ttft_ms > 0


@pytest.mark.tensorrt
@needs_tensorrt
def test_engines_reject_a_prompt_longer_than_the_profile(tiny_checkpoint, tmp_path):
    from edgekd.export import export
    from edgekd.runtime.tensorrt import TensorRTBackend

    out = tmp_path / "trt"
    export(
        ExportConfig(
            str(tiny_checkpoint), "tensorrt", "fp16", out, profile="jetson-orin-nano-8gb",
            n_parity_prompts=1, max_new_tokens=2,
        )
    )  # fmt: skip
    backend = TensorRTBackend(out)
    with pytest.raises(BackendError, match="do not fit the engines"):
        backend.generate_ids(torch.ones(1, 4000, dtype=torch.long), None, 4)


# ---- the whole export on the CPU: stand-in builder, engines run as their ONNX graphs -----------
# Everything but TensorRT itself runs: the driver, the ONNX step, the fp32-fallback decision,
# INT8 calibration data, engines.json, the manifest, and the backend's prefill/decode loop
# (whose runners are swapped for onnxruntime sessions over the same graphs, with TensorRT's
# profile limits enforced), against PyTorch.


class _OrtRunner:
    """EngineRunner's interface over onnxruntime; refuses shapes outside the profile."""

    _TYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64}

    def __init__(self, path: Path, profile: dict):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = [*self.session.get_inputs(), *self.session.get_outputs()]
        self.inputs = [v.name for v in self.session.get_inputs()]
        self.outputs = [v.name for v in self.session.get_outputs()]
        self.dtypes = {v.name: self._TYPES[v.type] for v in values}
        self.profile = profile

    def limits(self, name):
        return tuple(tuple(self.profile[name][k]) for k in ("min", "opt", "max"))

    def __call__(self, feed):
        arrays = {}
        for name in self.inputs:
            t = torch.as_tensor(feed[name]).to(self.dtypes[name]).contiguous()
            low, _, high = self.limits(name)
            if not all(lo <= d <= hi for lo, d, hi in zip(low, t.shape, high)):
                raise BackendError(f"'{name}' {tuple(t.shape)} outside {low}..{high}")
            arrays[name] = t.numpy()
        results = self.session.run(None, arrays)
        return {n: torch.from_numpy(a) for n, a in zip(self.outputs, results)}


def _cpu_backend_class():
    from edgekd.runtime.tensorrt import TensorRTBackend

    class CpuBackend(TensorRTBackend):
        def _load_runners(self):
            self.device = torch.device("cpu")
            e, onnx_dir = self.config["engines"], self.root / "onnx"
            return (
                _OrtRunner(onnx_dir / e["vision"]["onnx"], e["vision"]["profiles"]["images"]),
                _OrtRunner(onnx_dir / e["embed"]["onnx"], e["embed"]["profiles"]["tokens"]),
                _OrtRunner(onnx_dir / e["decoder"]["onnx"], e["decoder"]["profiles"]["prefill"]),
                _OrtRunner(onnx_dir / e["decoder"]["onnx"], e["decoder"]["profiles"]["decode"]),
            )

    return CpuBackend


@pytest.fixture(scope="module")
def onnx_graphs(tiny_vlm, tmp_path_factory):
    """The onnx exporter's fp32 graphs of ``tiny_vlm`` (== ``tiny_checkpoint``), made once."""
    out = tmp_path_factory.mktemp("onnx")
    exporter = get_exporter("onnx")
    exporter.export(tiny_vlm, ExportConfig("tiny", "onnx", "fp32", out), out)
    return out


@pytest.fixture
def cpu_stand_ins(monkeypatch, onnx_graphs):
    """Swap TensorRT, the GPU and the ONNX tracing for stand-ins; returns the fake trt module."""
    import shutil

    import edgekd.export.tensorrt as trt_export
    import edgekd.runtime.tensorrt as trt_runtime

    fake = _fake_trt()
    cosines = {"vision": 1.0}
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda error, need_gpu=True: fake)
    monkeypatch.setattr(trt_export, "environment_problem", lambda: None)
    monkeypatch.setattr(
        trt_export, "vision_engine_parity", lambda *a: {"cosine_min": cosines["vision"]}
    )
    monkeypatch.setattr(trt_runtime, "TensorRTBackend", _cpu_backend_class())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 7))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Orin (stand-in)")
    onnx_exporter = type(get_exporter("onnx"))
    monkeypatch.setattr(
        onnx_exporter,
        "export",
        lambda self, vlm, config, out: shutil.copytree(onnx_graphs, out, dirs_exist_ok=True),
    )
    fake.cosines = cosines
    return fake


def test_export_on_cpu_rebuilds_vision_with_fp32_layers_when_fp16_parity_fails(
    tiny_checkpoint, tmp_path, cpu_stand_ins
):
    from PIL import Image

    from edgekd.export import export
    from edgekd.runtime import tensorrt as trt_runtime

    cpu_stand_ins.cosines["vision"] = 0.97  # the first fp16 vision build "misses" 0.999
    out = tmp_path / "trt"
    config = ExportConfig(
        str(tiny_checkpoint), "tensorrt", "fp16", out, profile="jetson-orin-nano-8gb",
        n_parity_prompts=2, max_new_tokens=4,
    )  # fmt: skip
    manifest = export(config)

    info = json.loads((out / "engines.json").read_text())
    vision = info["engines"]["vision"]
    assert vision["fp16_vision_cosine"] == 0.97 and vision["fp32_layers"]
    assert manifest["components"]["vision"]["fp32_layers"] == len(vision["fp32_layers"])
    assert info["device"] == {"name": "Orin (stand-in)", "compute_capability": "8.7"}
    assert list(info["engines"]["decoder"]["profiles"]) == ["prefill", "decode"]
    assert info["engines"]["decoder"]["precision"] == "fp16"
    for name in ("vision.engine", "embed.engine", "decoder.engine", "onnx/embed_tokens.onnx"):
        assert name in manifest["files"]
    parity = manifest["parity"]["checks"]  # fp32 graphs behind stand-in runners: exact agreement
    assert parity["vision"]["cosine_min"] > 0.99999 and parity["logits"]["cosine_min"] > 0.99999
    assert parity["greedy"]["token_agreement"] == 1.0 and parity["greedy"]["prompts"] == 2

    backend = trt_runtime.TensorRTBackend(out)  # verifies the manifest
    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    gen = backend.generate(image, "What color is the shape?", max_new_tokens=5)
    ids, pixels = backend.encode(image, "What color is the shape?")
    from edgekd.evaluate import greedy_reference
    from edgekd.models import VLM

    vlm = VLM.from_pretrained(tiny_checkpoint)
    ref = greedy_reference(
        vlm, torch.from_numpy(ids[0]), torch.from_numpy(pixels[0]), 5,
        stop_ids=sorted(backend.eos_token_ids),
    )  # fmt: skip
    assert gen.token_ids == ref and gen.prompt_tokens == ids.shape[1]
    with pytest.raises(BackendError, match="do not fit the engines"):
        backend.generate_ids(torch.ones(1, 3000, dtype=torch.long), None, 4)


def test_export_on_cpu_int8_calibrates_the_decoder(tiny_checkpoint, tmp_path, cpu_stand_ins):
    from edgekd.export import export

    out = tmp_path / "trt8"
    config = ExportConfig(
        str(tiny_checkpoint), "tensorrt", "int8", out, profile="jetson-orin-nx-16gb",
        n_parity_prompts=1, max_new_tokens=2, options={"calibration_samples": 3},
    )  # fmt: skip
    manifest = export(config)
    engines = json.loads((out / "engines.json").read_text())["engines"]
    assert engines["decoder"]["precision"] == "int8"
    assert engines["decoder"]["quantization"] == "calibrated (entropy v2)"
    assert engines["vision"]["precision"] == "fp16" and engines["vision"]["fp32_layers"] == []
    calibration = cpu_stand_ins.config.calibration_profile.shapes  # the decoder's config
    assert calibration["inputs_embeds"][0][:1] == (1,)
    assert calibration["past_key_values.0.key"][0][2] == 0
    assert manifest["precision"] == "int8" and manifest["options"] == {"calibration_samples": 3}


def test_engines_built_elsewhere_are_refused(monkeypatch):
    from edgekd.runtime.tensorrt import check_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    info = {"device": {"name": "Orin", "compute_capability": "8.7"}, "tensorrt_version": "10.3.0"}
    with pytest.raises(BackendError) as err:
        check_device(info, "10.9.0.34")
    msg = str(err.value)
    assert "compute capability 8.7 (Orin), this GPU is 9.0 (NVIDIA H100)" in msg
    assert "TensorRT 10.3.0, this is 10.9.0.34" in msg and "re-export" in msg
    check_device({**info, "device": {"name": "H100", "compute_capability": "9.0"}}, "10.3.0")


def test_torch_dtypes_of_tensorrt_types():
    from edgekd.runtime.tensorrt import torch_dtype

    trt = types.SimpleNamespace(float32="F", float16="H", int64="L", int32="I", bool="B")
    assert [torch_dtype(trt, x) for x in "FHLIB"] == [
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.bool,
    ]
    with pytest.raises(BackendError, match="no torch equivalent"):
        torch_dtype(trt, "FP4")


def test_engines_build_from_an_opset_18_onnx_export(tmp_path):
    from edgekd.export.onnx import OPTIONS
    from edgekd.export.tensorrt import _onnx_config

    config = ExportConfig("ckpt", "tensorrt", "int8", tmp_path / "trt", options={"workspace_gb": 2})
    onnx = _onnx_config(config, tmp_path / "onnx")
    assert (onnx.target, onnx.precision, onnx.options) == ("onnx", "fp32", {"opset": 18})
    assert OPTIONS["opset"] == 23  # onnxruntime's default differs: TensorRT pins its own


@pytest.mark.parametrize("tower,decoder", [("clip", "llama"), ("siglip", "gemma")])
def test_check_takes_the_family_the_onnx_step_takes(
    tokenizer, tmp_path, monkeypatch, tower, decoder
):
    """The engines are built from the onnx target's graphs, so its family declarations apply:
    a CLIP or Gemma member raises only the (missing) environment, a Phi-3 decoder is named."""
    from edgekd.models import build_vlm

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    vlm = build_vlm("tiny", tokenizer=tokenizer, tower=tower, decoder=decoder)
    with pytest.raises(ExportError) as err:
        TensorRTExporter().check(vlm, _config(tmp_path))
    assert str(err.value).startswith(INSTALL_HINT) and "not supported" not in str(err.value)
    vlm.config.text_config.model_type = "phi3"
    with pytest.raises(ExportError, match="the onnx step: text decoder 'phi3' is not supported"):
        TensorRTExporter().check(vlm, _config(tmp_path))


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_engine_shapes_count_the_visual_tokens_the_processor_expands(tower, strategy):
    """From a bare config as from the model: CLIP's class token counted, then the first token
    dropped under ``default`` (as the processor expands ``<image>``)."""
    from edgekd.models import build_vlm

    vlm = build_vlm("tiny", tower=tower)
    vlm.config.vision_feature_select_strategy = strategy
    assert model_dims(vlm.config).visual_tokens == vlm.num_image_tokens()
    assert model_dims(vlm).visual_tokens == vlm.num_image_tokens()
