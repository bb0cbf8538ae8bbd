"""One adapter over transformers' LLaVA family: the pieces Switch-KD and the exporters need.

A LLaVA-style VLM is vision tower -> projector -> language model. ``VLM`` exposes each stage
separately so that the distiller can route the student's vision features through the teacher's
projector (the visual switch) and the exporters can trace each part on its own:

    feats  = vlm.vision_features(pixel_values)     # (B, N, D_vision), before the projector
    visual = vlm.project(feats)                     # (B, N, D_text)
    embeds = vlm.merge(vlm.embed(input_ids), visual, input_ids)
    logits = vlm.language_logits(embeds, attention_mask)   # == model(...).logits
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import ModelError
from edgekd.io import checkpoint_dir, is_hub_id, looks_local

SUPPORTED_MODEL_TYPES = ("llava",)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Map a dtype name ('fp32', 'bf16', 'auto', ...) to a torch dtype; 'auto' passes through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class VLM:
    """A LLaVA-family model with its processor, split into the stages distillation needs."""

    model: Any  # transformers.LlavaForConditionalGeneration
    processor: Any  # transformers.LlavaProcessor (tokenizer + image processor + chat template)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> VLM:
        """Load a checkpoint from a local directory or a hub id.

        Args:
            path_or_id: A directory holding ``config.json``, weights and processor files, or a
                hub id (``org/name``) that transformers can resolve (offline: from its cache).
            dtype: ``float32`` (default), ``float16``, ``bfloat16`` or ``auto`` (as saved).
            device: Where to put the weights.
            trust_remote_code: Run code shipped with the checkpoint. Off unless asked for.

        Raises:
            ModelError: The path does not exist, is not a LLaVA-family checkpoint, or fails to load.
        """
        from safetensors import SafetensorError
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        src = resolve_checkpoint(path_or_id)
        config = load_config(src, trust_remote_code)
        if Path(src).is_dir():
            check_weight_files(Path(src))
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                src,
                config=config,
                dtype=resolve_dtype(dtype),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with the file to fix
            )
            processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
        except pickle.UnpicklingError:
            pickles = sorted(Path(src).glob("pytorch_model*.bin")) if Path(src).is_dir() else []
            raise pickle_refused(pickles[0] if pickles else src) from None
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelError(f"cannot load '{src}': {_first_line(e)}") from None
        check_loading_info(info, src)
        return cls(model.to(device), processor)

    def save_pretrained(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a standard transformers checkpoint (safetensors) with its processor, atomically."""
        from edgekd.io import atomic_dir

        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            self.write(tmp)
        return Path(out_dir)

    def write(self, folder: str | os.PathLike) -> None:
        """Write the checkpoint's files into an existing ``folder`` (a guarded build directory)."""
        self.model.save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)

    # ---- properties ---------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.config.text_config.vocab_size)

    @property
    def vision_hidden_size(self) -> int:
        layers = self.config.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        return int(self.config.vision_config.hidden_size) * n

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder without its output head (``lm_head`` is :attr:`lm_head`)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def num_image_tokens(self) -> int:
        """Visual tokens one image becomes, as the processor expands ``<image>``."""
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    # ---- the stages ---------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-tower output at the configured layer(s) and select strategy, before the projector.

        Args:
            pixel_values: (B, 3, H, W) preprocessed images.

        Returns:
            (B, N, D_vision) features; with several feature layers they are concatenated on the
            last dimension, and the ``default`` strategy drops the first token (as LLaVA does).
        """
        layers = self.config.vision_feature_layer
        out = self.vision_tower(
            pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True
        )
        hs = out.hidden_states
        picked = [hs[layers]] if isinstance(layers, int) else [hs[i] for i in layers]
        if self.config.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map vision features (B, N, D_vision) to visual tokens (B, N, D_text)."""
        return self.projector(features)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, D_text)."""
        return self.language_model.get_input_embeddings()(input_ids)

    def merge(
        self, embeds: torch.Tensor, visual_tokens: torch.Tensor, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Write visual tokens into the ``<image>`` positions of ``embeds`` (row-major order).

        Raises:
            ModelError: The number of ``<image>`` tokens differs from the number of visual tokens.
        """
        mask = input_ids == self.image_token_id
        n_slots, n_feats = int(mask.sum()), visual_tokens.shape[0] * visual_tokens.shape[1]
        if n_slots != n_feats:
            raise ModelError(
                f"the prompt has {n_slots} image tokens but the images give {n_feats} visual "
                "tokens; build inputs with the model's processor"
            )
        visual = visual_tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), visual)

    def language_logits(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the language model and its head on embeddings: (B, L, D) -> (B, L, V) logits."""
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
        )
        return self.lm_head(out.last_hidden_state)

    def forward_stages(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The full forward pass composed from the stages; equals ``model(...).logits``."""
        embeds = self.embed(input_ids)
        if pixel_values is not None:
            embeds = self.merge(embeds, self.project(self.vision_features(pixel_values)), input_ids)
        return self.language_logits(embeds, attention_mask)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and image-token setup (equal for compatible models)."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        blob = json.dumps([vocab, self.image_token_id, self.vocab_size]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """The checkpoint directory of a local path (a run directory's ``model/``), or a hub id.

    Raises:
        ModelError: the path does not exist. A path written as one (``./x``, ``runs/x`` when
            ``runs/`` is here, ...) fails at once instead of being looked up on the hub.
    """
    src = str(path_or_id)
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"checkpoint '{src}' is a file; pass its directory")
        return str(checkpoint_dir(local) or local)
    if looks_local(src) or not is_hub_id(src):
        raise ModelError(f"checkpoint '{src}' not found; pass a directory or a hub id (org/name)")
    return src


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint, checked to be an object whose shapes are numbers.

    Raises:
        ModelError: missing, not JSON, not an object, or a sub-config / size that is malformed.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"'{folder}' is not a checkpoint: it has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read '{path}': {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"'{path}' is not a JSON object (got {type(config).__name__})")
    problems = []
    for key in ("text_config", "vision_config"):
        sub = config.get(key, {})
        if not isinstance(sub, dict):
            problems.append(f"{key} is {type(sub).__name__}, not an object")
            continue
        for size in _SIZE_KEYS:
            value = sub.get(size)
            if value is not None and not _positive_int(value):
                problems.append(f"{key}.{size} is {value!r}, not a positive integer")
    if problems:
        raise ModelError(f"'{path}': {'; '.join(problems)}")
    return config


_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
)


def pickle_refused(path: str | os.PathLike) -> ModelError:
    """The error for a pickle weights file that ``weights_only`` loading refused."""
    return ModelError(
        f"'{path}' is a pickle holding objects other than tensors; edgekd loads weights "
        "without running pickled code: save them as safetensors in an environment you trust"
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of ``folder`` is readable (header and size), before loading.

    Raises:
        ModelError: no weights at all, or a truncated / corrupt safetensors file (named).
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("pytorch_model*.bin")):
        raise ModelError(f"'{folder}' has no weights (model.safetensors)")
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelError(
                f"'{file}' is not a readable safetensors file (truncated or corrupt: "
                f"{_first_line(e)}); save or copy the checkpoint again"
            ) from None


def load_config(src: str, trust_remote_code: bool = False):
    """The config of a checkpoint directory or hub id, every parse failure a :class:`ModelError`.

    A local ``config.json`` is checked first (:func:`read_config`, :func:`check_llava_config`).
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    try:
        if Path(src).is_dir():
            check_llava_config(read_config(Path(src)), src)
        else:
            raw, _ = PretrainedConfig.get_config_dict(src)
            check_llava_config(raw, src)
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise ModelError(
            f"cannot read a model config from '{src}': {_first_line(cause)}"
        ) from None


def check_loading_info(info: dict[str, Any], src: str) -> None:
    """Refuse weights that do not fill the model ``config.json`` describes, exactly.

    transformers loads such checkpoints with a warning, leaving the missing or mismatched
    weights random; a model that silently answers noise is worse than an error.
    """
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if not (mismatched or missing or unexpected):
        return
    if mismatched:
        key, ckpt, model = mismatched[0]
        first = f"{key} is {list(ckpt)} in the weights but {list(model)} by config.json"
    elif missing:
        first = f"{missing[0]} is missing from the weights"
    else:
        first = f"{unexpected[0]} in the weights has no place in the model"
    raise ModelError(
        f"'{src}': config.json does not match the weights ({len(mismatched)} mismatched, "
        f"{len(missing)} missing, {len(unexpected)} unexpected; first: {first}); use the "
        "config.json the weights were saved with"
    )


def require_chat_template(path_or_id: str | os.PathLike) -> None:
    """Refuse a local checkpoint without a chat template (prompts are rendered with it).

    Raises:
        ModelError: no ``chat_template.jinja`` and no template in the processor or tokenizer
            config.
    """
    local = Path(path_or_id).expanduser()
    folder = checkpoint_dir(local) if local.is_dir() else None
    if folder is None:
        return  # a hub id, or not a checkpoint: the loader says so
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_templates").is_dir():
        return
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        try:
            if json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template"):
                return
        except (OSError, ValueError, AttributeError):
            continue
    raise ModelError(
        f"checkpoint '{path_or_id}' has no chat template (no chat_template.jinja, none in its "
        "tokenizer or processor config); add the template the model was trained with"
    )


def check_llava_config(config: dict[str, Any], src: str) -> None:
    """Refuse checkpoints that are not LLaVA-family VLMs, with a hint for TinyLLaVA ones.

    Args:
        config: The checkpoint's raw ``config.json`` as a dict.
        src: Where it came from, for the message.
    """
    model_type = config.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    if model_type == "tinyllava" or "TinyLlava" in str(config.get("architectures", "")):
        raise ModelError(
            f"'{src}' is a TinyLLaVA Factory checkpoint; convert it first: "
            f"edgekd convert tinyllava {src} OUT"
        )
    raise ModelError(
        f"'{src}' is not a LLaVA-family VLM (model_type '{model_type}'); edgekd takes "
        "LlavaForConditionalGeneration checkpoints"
    )


def check_compatible(teacher: VLM, student: VLM) -> None:
    """Teacher and student must share the vocabulary and the image token for logit distillation.

    Raises:
        ModelError: naming both values and the fix.
    """
    fix = "distil between models that share one tokenizer (same vocabulary and image token)"
    if teacher.vocab_size != student.vocab_size:
        raise ModelError(
            f"teacher vocabulary size {teacher.vocab_size} != student vocabulary size "
            f"{student.vocab_size}; {fix}"
        )
    if teacher.image_token_id != student.image_token_id:
        raise ModelError(
            f"teacher image token id {teacher.image_token_id} != student image token id "
            f"{student.image_token_id}; {fix}"
        )
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise ModelError(f"teacher and student tokenizers differ (e.g. {diff}); {fix}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
