"""PyTorch backend: a checkpoint's own weights, decoded greedily with an explicit KV cache.

    backend = TorchBackend("runs/student", device="cuda", dtype="bfloat16")
    gen = backend.generate(Image.open("cat.png"), "What animal is this?", max_new_tokens=32)
    gen.text, gen.ttft_ms, gen.decode_tokens_per_s

The reference the exported backends are measured against. Prompts go through the checkpoint's
processor with :func:`edgekd.runtime.prompt.encode_prompt`, so an (image, prompt) pair
becomes the same token ids and pixels here as in the ONNX backend. Generation runs the stages
of :class:`edgekd.models.vlm.VLM` by hand rather than ``model.generate``, so each is timed:

* ``vision_ms``: vision tower + projector on the image;
* ``prefill_ms``: embeddings, the merge of the visual tokens, one language-model pass over the
  whole prompt that fills the KV cache, and the first greedy token;
* ``decode_ms``: every later token, one language-model pass each with ``past_key_values``.

On CUDA every boundary synchronises, so each stage's time is its kernels' time.

This module is ``edgekd.runtime.torch``; ``import torch`` inside it is PyTorch itself
(absolute imports), not this file.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from edgekd.chat import stop_token_ids
from edgekd.models.vlm import VLM
from edgekd.runtime.base import BackendError, Generation, greedy_generate
from edgekd.runtime.prompt import check_image_slots, encode_prompt


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BackendError(
            f"unknown torch device '{device}': {e}; valid: cpu, cuda, cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(
                f"device '{device}' asked for but this PyTorch ({torch.__version__}) sees no CUDA "
                "GPU; pass device='cpu' or install a CUDA build of torch on a GPU machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(
                f"device '{device}' does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


class TorchBackend:
    """A PyTorch checkpoint that answers ``generate(image, prompt, max_new_tokens)``.

    Args:
        checkpoint: A checkpoint directory, an ``edgekd distill`` run directory or a hub id:
            whatever :meth:`edgekd.models.vlm.VLM.from_pretrained` loads.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32`` (default), ``float16``, ``bfloat16`` or ``auto``.

    Raises:
        BackendError: the device is not available here.
        ModelError: the checkpoint is missing or not a LLaVA-family VLM.
    """

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = _check_device(device)
        self.checkpoint = str(checkpoint)
        self.vlm = VLM.from_pretrained(checkpoint, dtype=dtype, device=self.device)
        self.vlm.model.eval()
        self.processor = self.vlm.processor
        self.eos_token_ids = set(
            stop_token_ids(self.vlm.tokenizer, self.vlm.model.generation_config)
        )
        text_config = self.vlm.config.text_config
        self.context_length = int(getattr(text_config, "max_position_embeddings", 1 << 31))
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x (old name deprecated)
        params = inspect.signature(self.vlm.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- stages -----------------------------------------------------------------------------
    def encode(self, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(input_ids (1, L), pixel_values (1, 3, H, W) or None)`` on this backend's device,
        made exactly as the ONNX backend makes them (same processor, same chat template)."""
        ids, pixels = encode_prompt(self.processor, image, prompt)
        input_ids = torch.from_numpy(ids).to(self.device)
        if pixels is None:
            return input_ids, None
        return input_ids, torch.from_numpy(pixels).to(self.device, self.vlm.dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        """One language-model pass that appends ``embeds`` to ``cache``; last-position logits.

        Only the last position goes through ``lm_head``, as ``model.generate`` does
        (``logits_to_keep=1``), so the argmax sees the same numbers.
        """
        length = embeds.shape[1]
        positions = torch.arange(start, start + length, device=self.device).unsqueeze(0)
        out = self.vlm.language_model(
            inputs_embeds=embeds,
            position_ids=positions,
            **{self._cache_kw: cache},
            use_cache=True,
            return_dict=True,
        )
        return self.vlm.lm_head(out.last_hidden_state[:, -1])

    def _merge(self, embeds, visual: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        n_visual = 0 if visual is None else visual.shape[0] * visual.shape[1]
        check_image_slots(int((ids == self.vlm.image_token_id).sum()), n_visual)
        return embeds if visual is None else self.vlm.merge(embeds, visual, ids)

    def _pixels(self, pixel_values) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        return torch.as_tensor(pixel_values).to(self.device, self.vlm.dtype)

    @torch.inference_mode()
    def visual_tokens(self, pixel_values) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, D_text) visual tokens."""
        return self.vlm.project(self.vlm.vision_features(self._pixels(pixel_values)))

    @torch.inference_mode()
    def prefill_logits(self, input_ids, pixel_values=None) -> torch.Tensor:
        """(1, L, V) logits of the whole prompt (the model's own forward)."""
        ids = torch.as_tensor(input_ids).reshape(1, -1).to(self.device)
        return self.vlm.forward_stages(ids, None, self._pixels(pixel_values))

    # ---- generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy decoding of one encoded prompt (batch 1), timed per stage.

        ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens (fixed-length speed runs).
        """
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids).reshape(1, -1).to(self.device)
        pixel_values = self._pixels(pixel_values)
        vlm, cache = self.vlm, DynamicCache(config=self.vlm.config.text_config)
        self._sync()

        def prefill(visual) -> int:
            embeds = self._merge(vlm.embed(ids), visual, ids)
            return int(self._step(embeds, cache, 0).argmax(-1))  # int() synchronises

        def step(token: int, position: int) -> int:
            embeds = vlm.embed(torch.tensor([[token]], device=self.device))
            return int(self._step(embeds, cache, position).argmax(-1))

        return greedy_generate(
            encode_image=lambda: (
                None if pixel_values is None else vlm.project(vlm.vision_features(pixel_values))
            ),
            prefill=prefill,
            step=step,
            prompt_tokens=ids.shape[1],
            max_new_tokens=max_new_tokens,
            stop_ids=() if ignore_eos else self.eos_token_ids,
            decode=lambda t: self.processor.tokenizer.decode(t, skip_special_tokens=True),
            has_image=pixel_values is not None,
            context_length=self.context_length,
            sync=self._sync,
            extra={"device": str(self.device), "dtype": str(vlm.dtype).removeprefix("torch.")},
        )

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer to ``prompt`` about ``image`` (a PIL image, a path, or ``None``).

        ``<image>`` in ``prompt`` marks where the image goes; without it the image goes first,
        followed by a newline (as in the ONNX backend).
        """
        return self.generate_ids(
            *self.encode(image, prompt), max_new_tokens=max_new_tokens, ignore_eos=ignore_eos
        )

    def info(self) -> dict[str, Any]:
        """What a benchmark records about this backend."""
        return {
            "backend": self.name,
            "device": str(self.device),
            "dtype": str(self.vlm.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "checkpoint": self.checkpoint,
        }

    def close(self) -> None:
        self.vlm = None


def open_backend(path, *, device: str, threads: int | None) -> TorchBackend:
    """A checkpoint on the CPU, or on the CUDA GPU for ``cuda`` / ``jetson``."""
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(path, device="cpu" if device == "cpu" else "cuda")
