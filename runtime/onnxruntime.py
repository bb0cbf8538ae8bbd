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
from edgekd.runtime.base import (
    IMAGE_PLACEHOLDER,
    BackendError,
    Generation,
    greedy_generate,
    user_content,
)

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


def render_prompt(processor, prompt: str, has_image: bool) -> str:
    """The chat-template text of one user turn (generation prompt added).

    ``<image>`` in ``prompt`` marks where the image goes; without it an image goes first,
    followed by a newline, as in LLaVA data (``"<image>\\n{question}"``).
    """
    if getattr(processor, "chat_template", None):
        owner = processor
        messages = [{"role": "user", "content": user_content(prompt, has_image)}]
    else:
        if has_image and IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        owner = getattr(processor, "tokenizer", processor)
        messages = [{"role": "user", "content": prompt}]
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(processor, image, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(input_ids (1, L) int64, pixel_values (1, 3, H, W) float32 or None)`` for one prompt.

    Args:
        processor: A LLaVA processor (the artifact's saved one, or a checkpoint's).
        image: A PIL image, an image path, or ``None`` for a text-only prompt.
        prompt: The user's question.
    """
    image = _open_image(image)
    text = render_prompt(processor, prompt, image is not None)
    if image is None:
        ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="np")["input_ids"]
        return ids.astype(np.int64), None
    enc = processor(text=text, images=[image], return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["pixel_values"].astype(np.float32)


def _open_image(image):
    if image is None or not isinstance(image, (str, Path)):
        return image
    from PIL import Image

    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except OSError as e:
        raise BackendError(f"cannot read image '{image}': {e}") from None


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
        from edgekd.export.manifest import verify as verify_manifest

        from edgekd.models.vlm import load_processor

        self.root = Path(artifact_dir)
        self.manifest = verify_manifest(self.root) if verify else None
        if self.manifest is not None and self.manifest["target"] != "onnx":
            raise BackendError(f"'{self.root}' is a {self.manifest['target']} artifact, not onnx")
        self.config = json.loads((self.root / "genai_config.json").read_text())["model"]
        self.providers = resolve_providers(providers)
        options = _session_options(threads, graph_optimization_level)
        self.vision = self._session(self.config["vision"]["filename"], options)
        self.embed = self._session(self.config["embedding"]["filename"], options)
        self.decoder = self._session(self.config["decoder"]["filename"], options)
        self.processor = load_processor(self.root)  # PIL preprocessing, as in training
        pre = (self.manifest or {}).get("preprocessing", {})
        self.eos_token_ids = set(pre.get("eos_token_ids", self.config["eos_token_id"]))
        self.image_token_id = int(self.config["image_token_id"])
        self.context_length = int(self.config["context_length"])

    def _session(self, filename: str, options):
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.root / filename), options, providers=self.providers)
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
        if visual is not None or mask.any():
            n_feats = 0 if visual is None else visual.shape[0] * visual.shape[1]
            if int(mask.sum()) != n_feats:
                raise BackendError(
                    f"the prompt has {int(mask.sum())} image tokens but the "
                    f"images give {n_feats} visual tokens"
                )
            embeds[mask] = visual.reshape(-1, embeds.shape[-1])
        return embeds

    def _decode_step(self, embeds: np.ndarray, past: list[np.ndarray], start: int):
        b, length = embeds.shape[:2]
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((b, start + length), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + length), (b, length)).copy(),
        }
        feed.update(zip(self._past_names(), past))
        out = self.decoder.run(None, feed)
        return out[0], out[1:]

    def _past_names(self) -> list[str]:
        inputs = self.config["decoder"]["inputs"]
        return [
            name % i
            for i in range(self.config["decoder"]["num_hidden_layers"])
            for name in (inputs["past_key_names"], inputs["past_value_names"])
        ]

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        d = self.config["decoder"]
        shape = (batch, d["num_key_value_heads"], 0, d["head_size"])
        return [np.zeros(shape, np.float32) for _ in range(2 * d["num_hidden_layers"])]

    def prefill_logits(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None):
        """(B, L, V) logits of the whole prompt in one decoder call (empty cache), for parity."""
        visual = None if pixel_values is None else self.visual_tokens(pixel_values)
        embeds = self.embeddings(input_ids, visual)
        return self._decode_step(embeds, self._empty_cache(len(input_ids)), 0)[0]

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
            "precision": (self.manifest or {}).get("precision"),
            "artifact": str(self.root),
        }


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
