"""onnxruntime backend: drives an edgekd ONNX artifact (vision encoder, embeddings, decoder).

    backend = OnnxRuntimeBackend("artifacts/student-int8", providers=("cpu",), threads=2)
    gen = backend.generate(Image.open("cat.png"), "What animal is this?", max_new_tokens=32)
    gen.text, gen.ttft_ms, gen.decode_tokens_per_s

The manifest is verified (every file's size and sha256) before any session opens. Prompts go
through the artifact's own saved processor (chat template, ``<image>`` expansion, image
preprocessing), so they are tokenised and preprocessed exactly as the checkpoint's processor
does, and greedy decoding runs prefill once over the whole prompt, then one token at a time
with ``present.*`` fed back as ``past_key_values.*``, until an end-of-turn id of the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import artifact, targets
from edgekd.errors import require
from edgekd.runtime.base import BackendError, Generation, greedy_generate
from edgekd.runtime.prompt import check_image_slots, encode_prompt
from edgekd.targets import DecodeWeights

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_INSTALL = {
    "CUDAExecutionProvider": "install onnxruntime-gpu in place of onnxruntime (pip uninstall "
    "onnxruntime && pip install onnxruntime-gpu) on a machine with an NVIDIA driver and CUDA",
    "TensorrtExecutionProvider": "install onnxruntime-gpu in place of onnxruntime and the "
    "TensorRT libraries (JetPack on Jetson) on a machine with an NVIDIA GPU",
}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def resolve_providers(providers: str | tuple[str, ...] | list[str]) -> list[str]:
    """Map ``cpu``/``cuda``/``tensorrt`` (or full provider names) to available providers.

    Raises:
        BackendError: a provider is unknown or not in this onnxruntime build, naming what to
            install.
    """
    import onnxruntime as ort

    names = [providers] if isinstance(providers, str) else list(providers)
    resolved = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            raise BackendError(
                f"unknown onnxruntime provider '{name}'; valid: "
                f"{', '.join(PROVIDERS)} (or their full names)"
            )
        if full not in ort.get_available_providers():
            raise BackendError(
                f"onnxruntime provider {full} is not available here (available: "
                f"{', '.join(ort.get_available_providers())}); {_INSTALL.get(full, '')}"
            )
        resolved.append(full)
    return resolved


GPU_PROVIDERS = {"cuda": ("cuda",), "tensorrt": ("tensorrt", "cuda")}


def open_backend(path, *, device: str, threads: int | None, ort_provider: str = "cuda"):
    """The onnx target's backend: the CPU provider on ``cpu``, else ``ort_provider`` (``cuda``,
    or ``tensorrt``: TensorRT's execution provider with CUDA for what it does not take)."""
    require("onnxruntime", "onnx", BackendError, "the onnxruntime backend")
    if ort_provider not in GPU_PROVIDERS:
        raise BackendError(
            f"unknown onnxruntime GPU provider '{ort_provider}'; valid: {', '.join(GPU_PROVIDERS)}"
        )
    providers = GPU_PROVIDERS[ort_provider] if device != "cpu" else ("cpu",)
    return OnnxRuntimeBackend(path, providers=providers, threads=threads)


def read_onnx_config(root: Path) -> dict[str, Any]:
    """The ``model`` block of an artifact's ``edgekd_onnx.json``, with every key the backend
    reads checked (one ArtifactError line naming what is wrong)."""
    path = root / targets.ONNX_CONFIG
    try:
        model = json.loads(path.read_text())["model"]
        decoder, inputs = model["decoder"], model["decoder"]["inputs"]
        names = [model[k]["filename"] for k in ("vision", "embedding", "decoder")]
        sizes = [decoder[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_size")]
        sizes += [model["context_length"], model["image_token_id"]]
        patterns = [inputs["past_key_names"], inputs["past_value_names"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"no key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise artifact.ArtifactError(f"{path}: not an edgekd ONNX config ({why})") from None
    problems = [f"file name {n!r}" for n in names if not isinstance(n, str)]
    problems += [f"size {v!r}" for v in sizes if not isinstance(v, int) or v < 0]
    problems += [f"input name {p!r}" for p in patterns if not isinstance(p, str) or "%d" not in p]
    if problems:
        raise artifact.ArtifactError(f"{path}: malformed {', '.join(problems)}; re-export")
    return model


def decode_weights(loaded: artifact.Artifact) -> DecodeWeights:
    """Every initializer of the decoder graph (external data lengths, not file sizes), which
    holds the LM head; a tied table in ``shared_embedding.data`` is counted once, through the
    decoder. The KV cache is at the graph's I/O type (float32)."""
    import onnx

    model = onnx.load(str(loaded.path(targets.ONNX_DECODER)), load_external_data=False)
    weights, shared = 0, False
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    weights += sum(_inline_bytes(t) for t in constants if t.dims)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            weights += int(info["length"])
            shared |= info["location"] == targets.ONNX_SHARED_DATA
        else:
            weights += _inline_bytes(t)
    return DecodeWeights(weights, kv_element_bytes=4, tied_embedding=shared)


def _inline_bytes(t) -> int:
    import onnx
    from onnx import helper

    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for dim in t.dims:
        n *= int(dim)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class OnnxRuntimeBackend:
    """A loaded ONNX artifact that answers ``generate(image, prompt, max_new_tokens)``.

    Args:
        artifact_dir: Directory written by ``edgekd export --target onnx``.
        providers: ``cpu``, ``cuda``, ``tensorrt`` or full onnxruntime provider names, in
            order of preference.
        threads: Intra-op threads per session (onnxruntime's default when ``None``).
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        verify: Check the manifest's hashes first. Only the exporter's own validation passes
            ``False``, before the manifest exists.

    Raises:
        ArtifactError: missing, truncated or modified files (named).
        BackendError: providers not available here, or an artifact of another target.
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifact_dir: str | Path,
        providers=("CPUExecutionProvider",),
        threads: int | None = None,
        graph_optimization_level: str = "all",
        *,
        verify: bool = True,
    ) -> None:
        from edgekd.models.vlm import load_processor

        self.root = Path(artifact_dir)
        self.artifact = artifact.verify(self.root) if verify else None
        if self.artifact is not None and self.artifact.target != "onnx":
            raise BackendError(f"'{self.root}' is a {self.artifact.target} artifact, not onnx")
        self.config = read_onnx_config(self.root)
        self.providers = resolve_providers(providers)
        options = _session_options(threads, graph_optimization_level)
        self.vision = self._session(self.config["vision"]["filename"], options)
        self.embed = self._session(self.config["embedding"]["filename"], options)
        self.decoder = self._session(self.config["decoder"]["filename"], options)
        decoder = self.config["decoder"]
        inputs, layers = decoder["inputs"], decoder["num_hidden_layers"]
        self.past_names = [  # names of the KV cache inputs, layer by layer: (key, value)
            name % i
            for i in range(layers)
            for name in (inputs["past_key_names"], inputs["past_value_names"])
        ]
        wanted = {"inputs_embeds", "attention_mask", "position_ids", *self.past_names}
        have = {i.name for i in self.decoder.get_inputs()}
        # logits_index: which positions reach the lm_head (absent from graphs exported before
        # it was added: those return every position's logits)
        self.selects_logits = "logits_index" in have
        if wanted != have - {"logits_index"}:
            extra = sorted(have - wanted - {"logits_index"})[:3] or sorted(wanted - have)[:3]
            raise artifact.ArtifactError(
                f"{self.root}: {targets.ONNX_CONFIG} does not describe the decoder graph's "
                f"inputs (e.g. {', '.join(extra)}); re-export"
            )
        self.processor = load_processor(self.root)  # PIL preprocessing, as in training
        pre = self.artifact.preprocessing if self.artifact else {}
        self.eos_token_ids = set(pre.get("eos_token_ids", self.config["eos_token_id"]))
        self.image_token_id = int(self.config["image_token_id"])
        self.context_length = int(self.config["context_length"])

    def _session(self, filename: str, options):
        import onnxruntime as ort

        path = artifact.listed(self.root, filename, self.artifact)
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            if type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise artifact.ArtifactError(
                f"{self.root}: onnxruntime cannot load '{filename}': {why}"
            ) from None
        if self.providers[0] not in session.get_providers():
            raise BackendError(
                f"{self.providers[0]} failed to start for {filename} (onnxruntime "
                f"fell back to {session.get_providers()}); check the GPU driver"
            )
        return session

    # ---- stages -----------------------------------------------------------------------------
    def encode(self, image, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids and pixel values of a prompt, as the checkpoint's processor makes them."""
        return encode_prompt(self.processor, image, prompt)

    def visual_tokens(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) pixels -> (B, N, D_text) visual tokens (vision tower + projector)."""
        return self.vision.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def embeddings(self, input_ids: np.ndarray, visual: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings with the visual tokens written into the ``<image>`` positions."""
        embeds = self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})[0]
        mask = input_ids == self.image_token_id
        n_visual = 0 if visual is None else visual.shape[0] * visual.shape[1]
        check_image_slots(int(mask.sum()), n_visual)
        if n_visual:
            embeds[mask] = visual.reshape(-1, embeds.shape[-1])
        return embeds

    def _decode_step(
        self, embeds: np.ndarray, past: list[np.ndarray], start: int, last_only: bool = True
    ):
        """One decoder call appending ``embeds`` at cache length ``start``: (logits, cache).

        ``last_only``: logits of the last position only, (B, 1, V), which is all generation
        needs; otherwise of every position, (B, L, V) (parity).
        """
        b, length = embeds.shape[:2]
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((b, start + length), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + length), (b, length)).copy(),
        }
        if self.selects_logits:
            first = length - 1 if last_only else 0
            feed["logits_index"] = np.arange(first, length, dtype=np.int64)
        feed.update(zip(self.past_names, past))
        out = self.decoder.run(None, feed)
        return out[0], out[1:]

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        d = self.config["decoder"]
        shape = (batch, d["num_key_value_heads"], 0, d["head_size"])
        return [np.zeros(shape, np.float32) for _ in range(2 * d["num_hidden_layers"])]

    def prefill_logits(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None):
        """(B, L, V) logits of the whole prompt in one decoder call (empty cache), for parity."""
        visual = None if pixel_values is None else self.visual_tokens(pixel_values)
        embeds = self.embeddings(input_ids, visual)
        return self._decode_step(embeds, self._empty_cache(len(input_ids)), 0, last_only=False)[0]

    def logits(self, image, prompt: str) -> np.ndarray:
        """Prompt logits (1, L, V) of ``prompt`` with ``image`` (``None``: text only)."""
        return self.prefill_logits(*self.encode(image, prompt))

    # ---- generation -------------------------------------------------------------------------
    def generate_ids(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        max_new_tokens: int = 32,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy decoding of one encoded prompt (batch 1), timed per stage.

        ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens (fixed-length speed runs).
        """
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        state: dict[str, Any] = {}

        def prefill(visual) -> int:
            logits, state["past"] = self._decode_step(
                self.embeddings(ids, visual), self._empty_cache(1), 0
            )
            return int(logits[0, -1].argmax())

        def step(token: int, position: int) -> int:
            logits, state["past"] = self._decode_step(
                self._embed_token(token), state["past"], position
            )
            return int(logits[0, -1].argmax())

        return greedy_generate(
            encode_image=lambda: None if pixel_values is None else self.visual_tokens(pixel_values),
            prefill=prefill,
            step=step,
            prompt_tokens=ids.shape[1],
            max_new_tokens=max_new_tokens,
            stop_ids=() if ignore_eos else self.eos_token_ids,
            decode=lambda t: self.processor.tokenizer.decode(t, skip_special_tokens=True),
            has_image=pixel_values is not None,
            context_length=self.context_length,
            extra={"providers": self.decoder.get_providers()},
        )

    def _embed_token(self, token: int) -> np.ndarray:
        return self.embed.run(None, {"input_ids": np.array([[token]], np.int64)})[0]

    def incremental_logits(
        self, input_ids: np.ndarray, pixel_values: np.ndarray | None, next_ids: list[int]
    ) -> np.ndarray:
        """Last-position logits after the prefill and after feeding each of ``next_ids`` one at
        a time through the KV cache (teacher forcing): (1 + len(next_ids), V), for parity."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        visual = None if pixel_values is None else self.visual_tokens(pixel_values)
        logits, past = self._decode_step(self.embeddings(ids, visual), self._empty_cache(1), 0)
        rows = [logits[0, -1]]
        for k, token in enumerate(next_ids):
            logits, past = self._decode_step(self._embed_token(token), past, ids.shape[1] + k)
            rows.append(logits[0, -1])
        return np.stack(rows)

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer to ``prompt`` about ``image`` (a PIL image, a path, or ``None``)."""
        return self.generate_ids(
            *self.encode(image, prompt), max_new_tokens=max_new_tokens, ignore_eos=ignore_eos
        )

    def info(self) -> dict[str, Any]:
        """What a benchmark records about this backend."""
        return {
            "backend": self.name,
            "providers": self.decoder.get_providers(),
            "precision": self.artifact.precision if self.artifact else None,
            "artifact": str(self.root),
        }

    def close(self) -> None:
        self.vision = self.embed = self.decoder = None  # onnxruntime frees a session with it


def _session_options(threads: int | None, level: str):
    import onnxruntime as ort

    if level not in OPTIMIZATION_LEVELS:
        raise BackendError(
            f"unknown graph_optimization_level '{level}'; valid: {', '.join(OPTIMIZATION_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the CLI layer renders
    return options
