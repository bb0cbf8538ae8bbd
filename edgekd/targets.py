"""The export targets: each one registered once, with everything downstream needs of it.

A target is an artifact format. Its registration names, as data, the exporter that writes it
(``edgekd.export``), the backend that runs it (``edgekd.runtime``), the reader that counts the
bytes one decode step reads from it (the roofline), its precisions (the first is the default),
the files every artifact of it holds, and the extra that installs its packages. The CLI help,
the profile schema, ``load_backend``, the roofline and bench all read this registry, so adding
a target is its exporter module, its backend module and one :func:`register` call::

    register(Target(
        name="mytarget", precisions=("fp32",), files=("model.bin",), extra="mytarget",
        exporter="mypkg.export:MyExporter",          # check / export / validate
        backend="mypkg.runtime:open_backend",        # (path, device=, threads=, **options)
        decode_weights="mypkg.runtime:decode_weights",  # (Artifact) -> DecodeWeights
    ))

References are ``"module:attribute"`` strings, imported on first use (``edgekd --help`` stays
fast), or the objects themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry, resolve

DEVICES = ("cpu", "cuda", "jetson")

# file names of the built-in targets (the exporters write them, the backends open them)
ONNX_VISION, ONNX_EMBED, ONNX_DECODER = (
    "vision_encoder.onnx",
    "embed_tokens.onnx",
    "decoder_model_merged.onnx",
)
ONNX_SHARED_DATA, ONNX_CONFIG = "shared_embedding.data", "edgekd_onnx.json"
GGUF_MODEL, GGUF_MMPROJ = "model.gguf", "mmproj.gguf"
# edgekd's mmproj keys (clip.cpp ignores them; edgekd's llama.cpp backend reads them):
# rows of clip's output to drop, and a factor folded into the projector (edgekd.export.family)
GGUF_DROP_KEY = "edgekd.vision.drop_first_tokens"
GGUF_SCALE_KEY = "edgekd.vision.projector_scale"
TRT_ENGINES_JSON, TRT_ONNX_DIR = "engines.json", "onnx"
TRT_ENGINES = {"vision": "vision.engine", "embed": "embed.engine", "decoder": "decoder.engine"}


class TargetError(EdgeKDError, ValueError):
    """An unknown target, or one that cannot run where asked."""


@dataclass(frozen=True)
class DecodeWeights:
    """What one decode step of an artifact reads, apart from the KV cache.

    Attributes:
        weights: Bytes of weights read per token (a lookup-only embedding table excluded).
        kv_element_bytes: Bytes of one KV-cache element at the artifact's cache type.
        tied_embedding: The output matrix is the embedding table (counted once).
    """

    weights: int
    kv_element_bytes: int
    tied_embedding: bool


@dataclass(frozen=True)
class Target:
    """One artifact format and the code that writes, runs and sizes it.

    Attributes:
        name: ``--target`` name and the manifest's ``target``.
        precisions: Valid ``--precision`` values; the first is the default.
        files: Files every artifact of this target holds (checked in its manifest).
        extra: The ``pip install 'edgekd[EXTRA]'`` that brings its packages.
        exporter: The exporter class (``check`` / ``export`` / ``validate``).
        backend: ``open(path, *, device, threads, **options) -> Backend``.
        decode_weights: ``(Artifact) -> DecodeWeights``, for the decode roofline.
        devices: Devices its backend runs on.
        backend_options: Keyword options its backend takes (e.g. ``ort_provider``).
        summary: One line for the CLI help.
        older_names: File -> the name older edgekd releases wrote it under (a re-export hint).
        from_profile: The target's precision for a device profile's ``preferred_precision``
            where the names differ (a profile precision the target lacks maps to none).
    """

    name: str
    precisions: tuple[str, ...]
    files: tuple[str, ...]
    extra: str
    exporter: Any
    backend: Any
    decode_weights: Any
    devices: tuple[str, ...] = DEVICES
    backend_options: tuple[str, ...] = ()
    summary: str = ""
    older_names: dict[str, str] = field(default_factory=dict)
    from_profile: dict[str, str] = field(default_factory=dict)

    def precision_for(self, profile_precision: str) -> str | None:
        """The precision to export for a device profile preferring ``profile_precision``
        (``fp16`` -> gguf's ``f16``), or None where the target has no such precision."""
        if profile_precision in self.from_profile:
            return self.from_profile[profile_precision]
        return profile_precision if profile_precision in self.precisions else None

    def make_exporter(self):
        """A new instance of the target's exporter."""
        return resolve(self.exporter)()

    def open_backend(self, path, *, device: str, threads: int | None, **options):
        """The target's backend on ``path`` (checksums verified by the backend)."""
        return resolve(self.backend)(path, device=device, threads=threads, **options)

    def read_decode_weights(self, artifact) -> DecodeWeights:
        return resolve(self.decode_weights)(artifact)


TARGETS = Registry("export target", TargetError, sort=True)
get, names = TARGETS.require, TARGETS.names


def register(target: Target) -> Target:
    """Add ``target`` to the registry (a second registration of a name replaces the first)."""
    if not target.precisions:
        raise TargetError(f"target '{target.name}' declares no precisions")
    return TARGETS.add(target)


def help_text() -> str:
    """``onnx: fp32 fp16 int8 int4; gguf: ...`` for the CLI help (defaults first)."""
    return "; ".join(f"{t.name}: {' '.join(t.precisions)}" for _, t in sorted(TARGETS.items()))


# ---- the built-in targets ------------------------------------------------------------------
register(
    Target(
        name="onnx",
        precisions=("fp32", "fp16", "int8", "int4"),
        files=(ONNX_VISION, ONNX_EMBED, ONNX_DECODER, ONNX_CONFIG),
        extra="onnx",
        exporter="edgekd.export.onnx:OnnxExporter",
        backend="edgekd.runtime.onnxruntime:open_backend",
        decode_weights="edgekd.runtime.onnxruntime:decode_weights",
        backend_options=("ort_provider",),
        summary="three ONNX graphs for onnxruntime (CPU, CUDA or TensorRT provider)",
        older_names={ONNX_CONFIG: "genai_config.json"},
    )
)
register(
    Target(
        name="gguf",
        precisions=("f32", "f16", "q8_0", "q4_k_m", "q4_0", "iq4_nl", "bf16"),
        files=(GGUF_MODEL, GGUF_MMPROJ),
        from_profile={"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "q4_k_m"},
        extra="gguf",
        exporter="edgekd.export.gguf:GgufExporter",
        backend="edgekd.runtime.llamacpp:open_backend",
        decode_weights="edgekd.runtime.llamacpp:decode_weights",
        summary="model.gguf + mmproj.gguf for llama.cpp",
    )
)
register(
    Target(
        name="tensorrt",
        precisions=("fp32", "fp16", "int8"),
        files=(*TRT_ENGINES.values(), TRT_ENGINES_JSON),
        extra="tensorrt",
        exporter="edgekd.export.tensorrt:TensorRTExporter",
        backend="edgekd.runtime.tensorrt:open_backend",
        decode_weights="edgekd.runtime.tensorrt:decode_weights",
        devices=("cuda", "jetson"),
        summary="TensorRT engines for one GPU and TensorRT version",
    )
)
