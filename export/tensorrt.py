"""TensorRT engines for LLaVA-family VLMs: fp32 ONNX -> ``vision``, ``embed``, ``decoder`` engines.

The exporter first writes the ONNX artifact (the ``onnx`` exporter, fp32) into ``onnx/``, then
builds one engine per ONNX file with the TensorRT Python API::

    onnx/vision_encoder.onnx        -> vision.engine   pixel_values -> visual tokens
    onnx/embed_tokens.onnx          -> embed.engine    input_ids -> token embeddings
    onnx/decoder_model_merged.onnx  -> decoder.engine  embeddings + KV cache -> logits + KV cache

Shapes come from the device profile's ``tensorrt`` block (:func:`engine_shapes`): the decoder
gets two optimisation profiles, ``prefill`` (the prompt, empty cache) and ``decode`` (one token,
1..max_past_len-1 cached tokens), which the runtime drives with one execution context each.
``engines.json`` records the engines' profiles, I/O names, the device and TensorRT version they
were built for, and the preprocessing the runtime (:mod:`edgekd.runtime.tensorrt`) needs.

TensorRT API level (verified against TensorRT 10.x documentation and Polygraphy 0.53 sources):
networks are explicit-batch (``create_network(0)``); precision uses the weakly typed builder flags
(``BuilderFlag.FP16``/``INT8``, per-layer ``precision`` + ``OBEY_PRECISION_CONSTRAINTS``),
deprecated since TensorRT 10.12 and removed in 11, so :meth:`TensorRTExporter.check` asks for
TensorRT 10. INT8 uses explicit quantization when the decoder ONNX carries Q/DQ nodes (e.g. from
NVIDIA ModelOpt); otherwise it falls back to implicit calibration with
``IInt8EntropyCalibrator2``, which TensorRT deprecated in 10.1 and still runs in 10.x.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd import artifact, targets
from edgekd.export import parity
from edgekd.export.base import ExportConfig, ExportError, Registered, get_exporter
from edgekd.export.onnx import VISION_INT8_COSINE, VISION_INT8_MAX_DROP
from edgekd.export.parity import Tolerance, eval_dataset, loosened
from edgekd.export.tensorrt_build import (
    Profiles,
    ShapeRange,
    build_engine,
    has_qdq,
    onnx_nodes,
)
from edgekd.export.tensorrt_parity import sample_inputs, vision_engine_parity
from edgekd.io import atomic_write_json
from edgekd.models.dims import TextDims, image_tokens
from edgekd.runtime import tensorrt as trt_runtime
from edgekd.runtime.tensorrt import INSTALL_HINT, import_tensorrt

log = logging.getLogger(__name__)

ENGINES_JSON = targets.TRT_ENGINES_JSON
# engine -> (ONNX file written by the onnx exporter, engine file)
ENGINE_FILES: dict[str, tuple[str, str]] = {
    "vision": (targets.ONNX_VISION, targets.TRT_ENGINES["vision"]),
    "embed": (targets.ONNX_EMBED, targets.TRT_ENGINES["embed"]),
    "decoder": (targets.ONNX_DECODER, targets.TRT_ENGINES["decoder"]),
}
# export precision -> the precision each engine is built at (vision stays fp16 under int8:
# implicit INT8 calibration of a SigLIP tower loses too much accuracy to be worth it)
ENGINE_PRECISION: dict[str, dict[str, str]] = {
    "fp32": {"vision": "fp32", "embed": "fp32", "decoder": "fp32"},
    "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
    "int8": {"vision": "fp16", "embed": "fp16", "decoder": "int8"},
}
# ONNX ops kept in fp32 when the fp16 vision engine fails parity (FACTS: SigLIP in TensorRT fp16
# loses accuracy in LayerNorm/Pow; Softmax and ReduceMean carry the same reductions).
FP32_FALLBACK_OPS = ("LayerNormalization", "Softmax", "Pow", "ReduceMean")


# Parity limits of an engine set against PyTorch fp32 (int8: the accuracy drop on eval_data).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(vision_cosine=0.9999, logits_cosine=0.9999, token_agreement=0.9),
    "fp16": Tolerance(vision_cosine=0.999, logits_cosine=0.995, token_agreement=0.5),
    "int8": Tolerance(
        vision_cosine=0.999, logits_cosine=0.95, token_agreement=0.0, max_accuracy_drop=0.03
    ),
}


@dataclass(frozen=True)
class ModelDims:
    """The model sizes that decide engine shapes."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    visual_tokens: int  # per image
    image_size: tuple[int, int]
    num_channels: int


def model_dims(vlm_or_config: Any) -> ModelDims:
    """Read :class:`ModelDims` from a ``VLM``, a ``LlavaConfig`` or a ``ModelDims``."""
    if isinstance(vlm_or_config, ModelDims):
        return vlm_or_config
    config = getattr(vlm_or_config, "config", vlm_or_config)
    text, vision = TextDims.from_config(config.text_config), config.vision_config
    size = vision.image_size
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_image_tokens = getattr(vlm_or_config, "num_image_tokens", None)  # a VLM counts its own
    visual_tokens = num_image_tokens() if num_image_tokens else image_tokens(config)
    return ModelDims(
        num_layers=text.layers,
        num_kv_heads=text.kv_heads,
        head_dim=text.head_dim,
        hidden_size=text.hidden,
        visual_tokens=visual_tokens,
        image_size=hw,
        num_channels=int(getattr(vision, "num_channels", 3)),
    )


def _tensorrt_block(device_profile: Any):
    from edgekd.profiles import load_device_profile

    profile = (
        load_device_profile(device_profile)
        if isinstance(device_profile, (str, Path))
        else device_profile
    )
    if profile.tensorrt is None:
        raise ExportError(
            f"device profile '{profile.name}' has no tensorrt block (it targets "
            f"{profile.preferred_target}); choose one of: {', '.join(tensorrt_profiles())}"
        )
    return profile, profile.tensorrt


def tensorrt_profiles() -> list[str]:
    """Names of the packaged device profiles that carry a ``tensorrt`` block."""
    from edgekd.profiles import list_profiles, load_device_profile

    return [n for n in list_profiles("device") if load_device_profile(n).tensorrt is not None]


def workspace_bytes(device_profile: Any) -> int:
    """Builder workspace limit in bytes (``MemoryPoolType.WORKSPACE``): workspace_gb GiB."""
    _, settings = _tensorrt_block(device_profile)
    return int(settings.workspace_gb * (1 << 30))


def engine_shapes(device_profile: Any, vlm_or_config: Any) -> dict[str, Profiles]:
    """Optimisation-profile shapes of every engine input, from the profile's ``tensorrt`` block.

    The KV cache holds at most ``max_past_len`` tokens (the context): a prefill of S tokens needs
    S <= min(max_seq_len, context) with an empty cache; a decode step sees 1..context-1 cached
    tokens plus one new token. Batch runs 1..max_batch, tuned for 1 (edge latency).

    Args:
        device_profile: A ``DeviceProfile`` or its name.
        vlm_or_config: A ``VLM``, a ``LlavaConfig`` or :class:`ModelDims`.

    Returns:
        ``{engine: {profile: {input: ShapeRange}}}`` for ``vision`` (profile ``images``),
        ``embed`` (``tokens``) and ``decoder`` (``prefill``, ``decode``; in this order, which is
        the engine's profile index).

    Raises:
        ExportError: the profile has no tensorrt block, or its sequence limits cannot hold one
            image's visual tokens plus a prompt.
    """
    profile, s = _tensorrt_block(device_profile)
    d = model_dims(vlm_or_config)
    context = s.max_past_len
    seq_max = min(s.max_seq_len, context)
    if seq_max < d.visual_tokens + 1:
        raise ExportError(
            f"device profile '{profile.name}': tensorrt.max_seq_len {s.max_seq_len} and "
            f"max_past_len {s.max_past_len} cannot hold one image's {d.visual_tokens} visual "
            f"tokens plus a prompt; set both above {d.visual_tokens}"
        )
    seq = (1, min(s.opt_seq_len, seq_max), seq_max)
    past = (1, min(s.opt_seq_len, context - 1), context - 1)
    batch = (1, 1, s.max_batch)

    def kv(past_len: tuple[int, int, int]) -> dict[str, ShapeRange]:
        shape = _ranges(batch, d.num_kv_heads, past_len, d.head_dim)
        return {
            f"past_key_values.{i}.{kind}": shape
            for i in range(d.num_layers)
            for kind in ("key", "value")
        }

    prefill = {
        "inputs_embeds": _ranges(batch, seq, d.hidden_size),
        "attention_mask": _ranges(batch, seq),
        "position_ids": _ranges(batch, seq),
        "logits_index": _ranges((1, 1, seq_max)),  # generation asks for the last position
        **kv((0, 0, 0)),
    }
    decode = {
        "inputs_embeds": _ranges(batch, 1, d.hidden_size),
        "attention_mask": _ranges(batch, tuple(p + 1 for p in past)),
        "position_ids": _ranges(batch, 1),
        "logits_index": _ranges(1),
        **kv(past),
    }
    return {
        "vision": {"images": {"pixel_values": _ranges(batch, d.num_channels, *d.image_size)}},
        "embed": {"tokens": {"input_ids": _ranges(batch, (1, 1, seq_max))}},
        "decoder": {"prefill": prefill, "decode": decode},
    }


def _ranges(*dims: int | tuple[int, int, int]) -> ShapeRange:
    """A ShapeRange from per-dimension sizes: an int (static) or a (min, opt, max) triple."""
    triples = [(x, x, x) if isinstance(x, int) else tuple(x) for x in dims]
    return ShapeRange(*(tuple(t[k] for t in triples) for k in range(3)))


def fp32_layer_names(onnx_model: Any, ops: Iterable[str] = FP32_FALLBACK_OPS) -> list[str]:
    """Names of the ONNX nodes to keep in fp32 (LayerNormalization, Softmax, Pow, ReduceMean).

    The TensorRT ONNX parser names each layer after its node (sub-layers get ``_N`` suffixes),
    so these names select the layers that :func:`build_engine` pins to fp32.

    Args:
        onnx_model: An ``onnx.ModelProto`` or a path (external weights are not read).
        ops: ONNX op types to select.
    """
    import onnx

    model = (
        onnx_model
        if isinstance(onnx_model, onnx.ModelProto)
        else onnx.load(str(onnx_model), load_external_data=False)
    )
    wanted = set(ops)
    nodes = [n for n in onnx_nodes(model.graph) if n.op_type in wanted]
    if unnamed := sum(not n.name for n in nodes):
        log.warning("%d fp32-fallback nodes have no name and cannot be pinned", unnamed)
    return [n.name for n in nodes if n.name]


# ---------------------------------------------------------------------------------------------
# INT8 calibration data
# ---------------------------------------------------------------------------------------------


def calibration_batches(
    vlm, samples: Sequence[dict], *, batch_size: int = 1, seq_len: int | None = None
) -> list[dict[str, Any]]:
    """Decoder prefill inputs for INT8 calibration, computed by the PyTorch model.

    Each sample's prompt is embedded with its image merged in (exactly what the engines compute
    before the decoder), then cut to its last ``seq_len`` positions (default: the shortest
    sample) or left-padded with zero embeddings and mask 0. Incomplete batches are dropped, so
    every batch has one shape, which the calibration profile fixes (min = opt = max).

    Returns:
        Batches of CPU tensors: ``inputs_embeds`` (B, S, D) float32, ``attention_mask`` and
        ``position_ids`` (B, S) int64, ``logits_index`` (1,) int64 (the last position), and
        empty ``past_key_values.{i}.key/value`` (B, kv_heads, 0, head_dim) float32.
    """
    import torch

    d = model_dims(vlm)
    embeds = [_prompt_embeds(vlm, s) for s in samples]
    seq = seq_len or min(e.shape[0] for e in embeds)
    batches = []
    for start in range(0, len(embeds) - batch_size + 1, batch_size):
        x = torch.zeros(batch_size, seq, d.hidden_size)
        mask = torch.zeros(batch_size, seq, dtype=torch.long)
        for b, e in enumerate(embeds[start : start + batch_size]):
            e = e[-seq:]
            x[b, seq - len(e) :], mask[b, seq - len(e) :] = e, 1
        past = torch.zeros(batch_size, d.num_kv_heads, 0, d.head_dim)
        batches.append(
            {
                "inputs_embeds": x,
                "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                "logits_index": torch.tensor([seq - 1]),
                **{
                    f"past_key_values.{i}.{kind}": past
                    for i in range(d.num_layers)
                    for kind in ("key", "value")
                },
            }
        )
    return batches


def vision_calibration_batches(vlm, config: ExportConfig, n: int) -> list[dict[str, Any]]:
    """``pixel_values`` (1, 3, H, W) float32 batches of ``n`` images of ``config.eval_data``,
    preprocessed as the model's processor does (INT8 vision calibration).

    The images after the first ``eval_limit`` samples come first (the accuracy check scores
    those), then, if the file has too few, the scored ones.
    """
    dataset = eval_dataset(vlm, dataclasses.replace(config, eval_limit=None))
    scored = min(config.eval_limit or len(dataset), len(dataset))
    batches = []
    for i in [*range(scored, len(dataset)), *range(scored)]:
        pixels = dataset.load_pixels(i)
        if pixels is not None:
            batches.append({"pixel_values": pixels[None].float()})
        if len(batches) == n:
            break
    if not batches:
        raise ExportError(f"--eval-data '{config.eval_data}' has no images to calibrate on")
    return batches


def _prompt_embeds(vlm, sample: dict):
    import torch

    with torch.no_grad():
        ids = sample["input_ids"][None].to(vlm.device)
        emb = vlm.embed(ids)
        if sample["pixel_values"] is not None:
            pv = sample["pixel_values"][None].to(vlm.device)
            emb = vlm.merge(emb, vlm.project(vlm.vision_features(pv)), ids)
    return emb[0].float().cpu()


# ---------------------------------------------------------------------------------------------
# Options and environment
# ---------------------------------------------------------------------------------------------

OPTIONS: dict[str, str] = {
    "fp32_fallback": "auto|always|never: pin the vision engine's LayerNorm/Softmax/Pow/ReduceMean "
    "to fp32 (auto: only when the fp16 build fails parity)",
    "kv_cache_dtype": "fp16|fp32: the decoder's KV-cache I/O type (fp32 for fp32, else fp16)",
    "calibration_samples": "int8 without Q/DQ nodes: prompts used for INT8 calibration (16)",
    "vision_precision": "fp32|fp16|int8: the vision engine's precision (default fp32 for fp32, "
    "else fp16); int8 is calibrated on --eval-data's images (required) and its answer "
    "accuracy checked there against PyTorch's visual tokens (at most 1 point lower)",
    "min_vision_cosine": "override the visual-token cosine tolerance",
    "min_logits_cosine": "override the logits cosine tolerance",
    "min_token_agreement": "override the greedy-agreement tolerance",
}


@dataclass(frozen=True)
class TensorRTOptions:
    fp32_fallback: str
    kv_cache_dtype: str
    calibration_samples: int
    tolerance: Tolerance
    vision_precision: str = "fp16"


TRT_ONNX_OPSET = 18


def resolve_options(
    precision: str, options: Mapping[str, Any]
) -> tuple[TensorRTOptions, list[str]]:
    """Typed options with defaults, and every problem found (each naming its option)."""
    problems = [
        f"option '{k}' is unknown; valid: {', '.join(OPTIONS)}" for k in options if k not in OPTIONS
    ]
    choices = {
        "fp32_fallback": ("auto", "always", "never"),
        "kv_cache_dtype": ("fp16", "fp32"),
        "vision_precision": ("fp32", "fp16", "int8"),
    }
    for key, valid in choices.items():
        if key in options and options[key] not in valid:
            problems.append(
                f"option '{key}' must be one of {', '.join(valid)}, got {options[key]!r}"
            )
    n = options.get("calibration_samples", 16)
    if not isinstance(n, int) or n < 1:
        problems.append(f"option 'calibration_samples' must be an integer >= 1, got {n!r}")
    tol = TOLERANCES.get(precision, TOLERANCES["fp16"])
    vision = options.get("vision_precision")
    if vision not in choices["vision_precision"]:
        vision = ENGINE_PRECISION.get(precision, ENGINE_PRECISION["fp16"])["vision"]
    if vision == "fp16" and precision == "fp32":  # the fp16 floors for what the tower feeds
        tol = loosened(tol, TOLERANCES["fp16"])
    if vision == "int8":  # image prompts carry the int8 tower's error: the int8 floors for them
        tol = loosened(tol, TOLERANCES["int8"], vision_cosine=VISION_INT8_COSINE)
    overrides = {}
    for key, field in (
        ("min_vision_cosine", "vision_cosine"),
        ("min_logits_cosine", "logits_cosine"),
        ("min_token_agreement", "token_agreement"),
    ):
        if key in options:
            value = options[key]
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                problems.append(f"option '{key}' must be a number in [0, 1], got {value!r}")
            else:
                overrides[field] = float(value)
    resolved = TensorRTOptions(
        fp32_fallback=options.get("fp32_fallback", "auto"),
        kv_cache_dtype=options.get("kv_cache_dtype", "fp32" if precision == "fp32" else "fp16"),
        calibration_samples=n if isinstance(n, int) else 16,
        tolerance=dataclasses.replace(tol, **overrides),
        vision_precision=vision,
    )
    return resolved, problems


def environment_problem() -> str | None:
    """Why TensorRT cannot build here (no package, wrong major version, no CUDA GPU), or None."""
    try:
        trt = import_tensorrt(ExportError, need_gpu=False)
    except ExportError as e:
        return str(e)
    version = str(getattr(trt, "__version__", "0"))
    if version.split(".")[0] != "10":
        return (
            f"TensorRT {version} found; edgekd builds with the TensorRT 10 API (weakly typed FP16/"
            "INT8 builder flags, removed in TensorRT 11): pip install 'tensorrt>=10,<11'"
        )
    import torch

    if not torch.cuda.is_available():
        return f"{INSTALL_HINT} (no CUDA GPU: torch.cuda.is_available() is False)"
    return None


# ---------------------------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------------------------


class TensorRTExporter(Registered):
    """``--target tensorrt``: ONNX (fp32) into ``onnx/``, then vision/embed/decoder engines."""

    target = "tensorrt"

    def check(self, vlm, config: ExportConfig) -> None:
        """Refuse early: every problem (the environment's first) in one ExportError line."""
        problems = []
        if config.precision not in self.precisions:
            problems.append(
                f"precision '{config.precision}' is not supported by tensorrt; "
                f"valid: {', '.join(self.precisions)}"
            )
        opts, option_problems = resolve_options(config.precision, config.options)
        problems += option_problems
        if opts.vision_precision == "int8" and config.eval_data is None:
            problems.append(
                "vision_precision=int8 needs --eval-data: the vision engine is calibrated on "
                "its images and what it costs in answers is measured there"
            )
        problems += _profile_problems(vlm, config)
        try:
            get_exporter("onnx").check(vlm, _onnx_config(config, config.output))
        except ExportError as e:
            problems.append(f"the onnx step: {e}")
        env = environment_problem()
        if env or problems:
            raise ExportError("; ".join(([env] if env else []) + problems))

    def export(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """Write ``onnx/`` (graphs and processor), the three engines and ``engines.json``."""
        from edgekd.profiles import load_device_profile

        trt = import_tensorrt(ExportError, need_gpu=False)
        opts = resolve_options(config.precision, config.options)[0]
        profile = load_device_profile(config.profile)
        shapes = engine_shapes(profile, vlm)
        onnx_dir = out / targets.TRT_ONNX_DIR
        onnx_dir.mkdir(parents=True, exist_ok=True)
        get_exporter("onnx").export(vlm, _onnx_config(config, onnx_dir), onnx_dir)
        paths = _onnx_paths(onnx_dir)
        log.info("✓ onnx fp32: %s", ", ".join(p.name for p in paths.values()))
        samples = sample_inputs(vlm, config)
        precision = {**ENGINE_PRECISION[config.precision], "vision": opts.vision_precision}

        def build(engine: str, **kwargs) -> dict[str, Any]:
            info = build_engine(
                trt, paths[engine], out / ENGINE_FILES[engine][1], shapes[engine],
                precision=precision[engine], workspace=workspace_bytes(profile), **kwargs,
            )  # fmt: skip
            pinned = f" ({len(info['fp32_layers'])} layers fp32)" if info["fp32_layers"] else ""
            log.info("✓ %s %s%s (%.1f s)", info["file"], info["precision"], pinned, info["build_s"])
            return info

        fallback = fp32_layer_names(paths["vision"]) if precision["vision"] != "fp32" else []
        engines = {
            "embed": build("embed"),
            "vision": _build_vision(build, vlm, fallback, out, opts, samples, config),
        }
        calibration = None
        if precision["decoder"] == "int8" and not has_qdq(paths["decoder"]):
            calib = sample_inputs(vlm, config, opts.calibration_samples, offset=1000)
            calibration = calibration_batches(vlm, calib)
        kv = opts.kv_cache_dtype
        engines["decoder"] = build(
            "decoder",
            io_dtypes={"past_key_values.": kv, "present.": kv},
            calibration=calibration,
            calibration_cache=out / "decoder.calib" if calibration else None,
        )
        _write_engines_json(out, trt, profile.name, vlm, engines)
        components = {
            name: {"files": [e["file"]], "precision": e["precision"]} for name, e in engines.items()
        }
        components["vision"]["fp32_layers"] = len(engines["vision"]["fp32_layers"])
        onnx_files = [p.relative_to(out).as_posix() for p in onnx_dir.rglob("*") if p.is_file()]
        components["onnx"] = {"files": sorted(onnx_files), "precision": "fp32"}
        return components

    def validate(self, vlm, config: ExportConfig, out: Path) -> dict[str, Any]:
        """The engines against PyTorch: the shared checks of :mod:`edgekd.export.parity`."""
        import torch

        opts = resolve_options(config.precision, config.options)[0]
        tol = opts.tolerance
        # manifest.json is written after validate
        backend = trt_runtime.TensorRTBackend(out, verify=False)
        checks = {}
        if opts.vision_precision == "int8" and config.eval_data is not None:
            checks["vision_accuracy"] = lambda: parity.check_vision_accuracy(
                vlm, backend, config, VISION_INT8_MAX_DROP, encoder="_visual",
                wrap=lambda tokens: torch.from_numpy(tokens).to(backend.device),
            )  # fmt: skip
        try:
            result = parity.validate(vlm, backend, config, tol, target_checks=checks)
        finally:
            backend.close()
        return {**result, "device": torch.cuda.get_device_name(0)}


def _build_vision(
    build, vlm, fallback: list[str], out: Path, opts, samples, config: ExportConfig
) -> dict[str, Any]:
    """fp16 first; again with ``fallback`` layers (norms, softmax) in fp32 if parity falls short.

    int8 (option ``vision_precision``): one build, calibrated on the first
    ``calibration_samples`` images of ``config.eval_data`` (:func:`vision_calibration_batches`).
    """
    if opts.vision_precision == "int8":
        batches = vision_calibration_batches(vlm, config, opts.calibration_samples)
        return build("vision", calibration=batches, calibration_cache=out / "vision.calib")
    if opts.fp32_fallback == "always" and fallback:
        return build("vision", fp32_layers=fallback)
    info = build("vision")
    if opts.fp32_fallback == "never" or not fallback:
        return info
    cosine = vision_engine_parity(vlm, out / info["file"], samples).get("cosine_min", 1.0)
    if cosine >= opts.tolerance.vision_cosine:
        return {**info, "fp16_vision_cosine": cosine}
    log.info(
        "✗ vision fp16 cosine %.5f < %s: rebuilding with %d layers in fp32",
        cosine, opts.tolerance.vision_cosine, len(fallback),
    )  # fmt: skip
    return {**build("vision", fp32_layers=fallback), "fp16_vision_cosine": cosine}


def _profile_problems(vlm, config: ExportConfig) -> list[str]:
    from edgekd.profiles import ProfileError, load_device_profile

    if config.profile is None:
        return [
            "profile: TensorRT export needs a device profile for its shapes and workspace "
            f"(--profile); with a tensorrt block: {', '.join(tensorrt_profiles())}"
        ]
    try:
        profile = load_device_profile(config.profile)
        if config.precision not in profile.supported_precisions:
            return [
                f"device profile '{profile.name}' does not support precision "
                f"'{config.precision}'; it supports {', '.join(profile.supported_precisions)}"
            ]
        engine_shapes(profile, vlm)
    except (ProfileError, ExportError) as e:
        return [str(e)]
    return []


def _onnx_config(config: ExportConfig, out: Path) -> ExportConfig:
    # The ONNX step is fp32 and gets none of the TensorRT options; opset 18, which every
    # TensorRT 10 ONNX parser reads (the ONNX target's default, 23, is for onnxruntime).
    return dataclasses.replace(
        config, target="onnx", precision="fp32", output=out, options={"opset": TRT_ONNX_OPSET}
    )


def _onnx_paths(onnx_dir: Path) -> dict[str, Path]:
    paths = {e: next(iter(sorted(onnx_dir.rglob(f))), None) for e, (f, _) in ENGINE_FILES.items()}
    missing = [ENGINE_FILES[e][0] for e, p in paths.items() if p is None]
    if missing:
        have = ", ".join(sorted(p.name for p in onnx_dir.rglob("*.onnx"))) or "none"
        raise ExportError(f"the onnx step wrote no {', '.join(missing)} (it wrote: {have})")
    return paths


def _write_engines_json(out: Path, trt, profile: str, vlm, engines: dict[str, Any]) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    device = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    atomic_write_json(
        out / ENGINES_JSON,
        {
            "tensorrt_version": trt.__version__,
            "device": device,
            "device_profile": profile,
            "model": dataclasses.asdict(model_dims(vlm)),
            "engines": engines,
            "preprocessing": artifact.preprocessing(vlm),
        },
    )
