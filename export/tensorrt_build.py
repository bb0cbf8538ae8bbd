"""TensorRT engine building for :mod:`edgekd.export.tensorrt` (TensorRT 10 Python API).

Everything here takes the imported ``tensorrt`` module as ``trt``, so that this module imports
without TensorRT and its logic can be followed (and tested with a stand-in) on any machine.

API facts used (TensorRT 10.x docs; NVIDIA Polygraphy 0.53 ``backend/trt`` as a reference user):
``Builder(logger)``, ``create_network(0)`` (explicit batch is the only mode since 10.0),
``OnnxParser(network, logger).parse_from_file`` (resolves external weights), builder config
``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``, ``set_flag``/``clear_flag``
(FP16, INT8, OBEY_PRECISION_CONSTRAINTS; TF32 is on by default), ``ILayer.precision`` and
``set_output_type``, ``create_optimization_profile().set_shape(name, min, opt, max)``,
``add_optimization_profile``, ``int8_calibrator`` + ``set_calibration_profile`` (deprecated since
10.1, superseded by explicit Q/DQ quantization), ``build_serialized_network``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.export.base import ExportError

log = logging.getLogger("edgekd.export.tensorrt")


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one engine input in one optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


Profiles = dict[str, dict[str, ShapeRange]]  # profile name -> input name -> range


def fit_profile(shapes: Mapping[str, ShapeRange], inputs: Sequence[Any], onnx_name: str):
    """Match profile shapes to a parsed network's inputs (objects with ``.name``, ``.shape``).

    A single-input engine takes its one range whatever the input is called. Static dimensions of
    the network (not -1) override the profile's range for that dimension.

    Raises:
        ExportError: an input has no range, or its rank differs from the range's.
    """
    shapes = dict(shapes)
    if len(inputs) == 1 and len(shapes) == 1:
        shapes = {inputs[0].name: next(iter(shapes.values()))}
    fitted = {}
    for tensor in inputs:
        if tensor.name not in shapes:
            raise ExportError(
                f"{onnx_name}: input '{tensor.name}' has no shape range; the TensorRT exporter "
                f"expects the inputs {', '.join(shapes)}"
            )
        r, static = shapes[tensor.name], tuple(int(x) for x in tensor.shape)
        if len(static) != len(r.min):
            raise ExportError(
                f"{onnx_name}: input '{tensor.name}' has rank {len(static)} {static}, the "
                f"profile gives rank {len(r.min)} {r.max}"
            )
        fitted[tensor.name] = ShapeRange(
            *(
                tuple(s if s >= 0 else v for s, v in zip(static, dims))
                for dims in (r.min, r.opt, r.max)
            )
        )
    return fitted


def onnx_nodes(graph) -> Iterable[Any]:
    """Every node of an ONNX graph, subgraphs of If/Loop/Scan included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs of If / Loop / Scan
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from onnx_nodes(sub)


def has_qdq(onnx_path: str | Path) -> bool:
    """Whether an ONNX graph is explicitly quantized (QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_nodes(graph))


# ---------------------------------------------------------------------------------------------
# Engine building (TensorRT 10 Python API; ``trt`` is the imported module)
# ---------------------------------------------------------------------------------------------


def build_engine(
    trt,
    onnx_path: Path,
    engine_path: Path,
    profiles: Profiles,
    *,
    precision: str,
    workspace: int,
    fp32_layers: Sequence[str] = (),
    io_dtypes: Mapping[str, str] | None = None,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    calibration_cache: Path | None = None,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine into ``engine_path``, describe it.

    Args:
        trt: The ``tensorrt`` module.
        profiles: Optimisation profiles in index order (from :func:`engine_shapes`).
        precision: ``fp32`` (TF32 off), ``fp16``, or ``int8`` (with FP16 for the layers INT8
            does not cover).
        workspace: Builder workspace limit in bytes.
        fp32_layers: ONNX node names whose layers must run and output in fp32.
        io_dtypes: Network I/O name prefixes -> ``fp16``/``fp32`` (the KV cache).
        calibration: INT8 without Q/DQ nodes: input batches for ``IInt8EntropyCalibrator2``.
        calibration_cache: Where the calibrator reads/writes its scales.

    Raises:
        ExportError: the parser or the builder fails (with TensorRT's first messages).
    """
    start = time.perf_counter()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a path, so external weights resolve
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:3]) or _last(logger)}"
        )
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    fitted = {name: fit_profile(p, inputs, onnx_path.name) for name, p in profiles.items()}
    _set_io_dtypes(trt, inputs + outputs, io_dtypes or {})

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32 here
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    pinned = pin_fp32_layers(trt, network, fp32_layers) if fp32_layers else []
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for shapes in fitted.values():
        config.add_optimization_profile(_trt_profile(builder, shapes))
    quantization, calibrator = None, None
    if precision == "int8":
        quantization = "explicit (Q/DQ)" if has_qdq(onnx_path) else "calibrated (entropy v2)"
        if quantization.startswith("calibrated"):
            calibrator = _set_calibrator(
                trt, builder, config, inputs, calibration, calibration_cache
            )

    plan = builder.build_serialized_network(network, config)
    del calibrator  # referenced until here: the config does not own the Python object
    if plan is None:
        raise ExportError(
            f"TensorRT could not build {engine_path.name} from {onnx_path.name}: {_last(logger)}"
        )
    engine_path.write_bytes(plan)
    return {
        "file": engine_path.name,
        "onnx": onnx_path.name,
        "precision": precision,
        "quantization": quantization,
        "profiles": {
            p: {n: r.as_dict() for n, r in shapes.items()} for p, shapes in fitted.items()
        },
        "inputs": [t.name for t in inputs],
        "outputs": [t.name for t in outputs],
        "fp32_layers": pinned,
        "build_s": round(time.perf_counter() - start, 1),
    }


def _trt_logger(trt):
    """An ILogger that forwards to Python logging and keeps errors for the exception text."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # pybind11 trampolines need the explicit base __init__
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.Logger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _last(logger) -> str:
    return logger.errors[-1] if logger.errors else "see the TensorRT log above"


def _set_io_dtypes(trt, tensors: Sequence[Any], io_dtypes: Mapping[str, str]) -> None:
    types = {"fp16": trt.float16, "fp32": trt.float32}
    for tensor in tensors:
        for prefix, dtype in io_dtypes.items():
            if tensor.name.startswith(prefix) and tensor.dtype in (trt.float16, trt.float32):
                tensor.dtype = types[dtype]


def _trt_profile(builder, shapes: Mapping[str, ShapeRange]):
    profile = builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, r.min, r.opt, r.max)
    return profile


def pin_fp32_layers(trt, network, node_names: Sequence[str]) -> list[str]:
    """Run the layers parsed from ``node_names`` in fp32, outputs included; return their names.

    A layer matches its node's name or the parser's ``<name>_<n>`` sub-layer names. Layers with
    non-float or shape outputs and constants are left alone (precision cannot apply to them).
    Needs ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` on the config to be binding.
    """
    wanted = set(node_names)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base, _, suffix = layer.name.rpartition("_")
        if layer.name not in wanted and not (suffix.isdigit() and base in wanted):
            continue
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if layer.type == trt.LayerType.CONSTANT or not all(
            t.is_execution_tensor and t.dtype in (trt.float16, trt.float32) for t in outs
        ):
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    if wanted and not pinned:
        log.warning("none of %d fp32-fallback nodes matched a TensorRT layer name", len(wanted))
    return pinned


def _set_calibrator(trt, builder, config, inputs, batches, cache: Path | None):
    """Implicit INT8 calibration (deprecated since TensorRT 10.1, still supported in 10.x)."""
    if not batches:
        raise ExportError("INT8 calibration needs calibration batches; none were produced")
    missing = [t.name for t in inputs if t.name not in batches[0]]
    if missing:
        raise ExportError(f"calibration batches lack the network inputs {', '.join(missing)}")
    log.warning(
        "INT8 by implicit calibration (IInt8EntropyCalibrator2), deprecated since TensorRT "
        "10.1; quantize the ONNX with Q/DQ nodes (NVIDIA ModelOpt) for explicit quantization"
    )
    shapes = {t.name: tuple(batches[0][t.name].shape) for t in inputs}
    calibrator = make_calibrator(trt, batches, cache)
    config.int8_calibrator = calibrator
    # Calibration runs at one shape: a profile with min = opt = max = the batches' shape.
    config.set_calibration_profile(
        _trt_profile(builder, {n: ShapeRange(s, s, s) for n, s in shapes.items()})
    )
    return calibrator


def make_calibrator(trt, batches: Sequence[Mapping[str, Any]], cache: Path | None = None):
    """An ``IInt8EntropyCalibrator2`` that feeds ``batches`` (CPU tensors) from CUDA memory."""
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._live: list[torch.Tensor] = []
            self._empty: torch.Tensor | None = None  # a valid address for 0-size inputs

        def get_batch_size(self):
            return 1  # deprecated; the batch dimension is explicit in every input

        def get_batch(self, names):
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._live = [batch[n].to("cuda").contiguous() for n in names]
            if self._empty is None:
                self._empty = torch.empty(256, dtype=torch.uint8, device="cuda")
            return [t.data_ptr() if t.numel() else self._empty.data_ptr() for t in self._live]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data):
            if cache is not None:
                cache.write_bytes(bytes(data))

    return _Calibrator()
