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
from safetensors import SafetensorError

from edgekd.errors import ModelError
from edgekd.models.checkpoint import (  # noqa: F401 - re-exported: the model layer's API
    SUPPORTED_MODEL_TYPES,
    check_llava_config,
    check_loading_info,
    check_weights,
    first_line,
    load_config,
    load_processor,
    pickle_refused,
    resolve_checkpoint,
)
from edgekd.outputs import guarded_dir

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

        The image processor is always the PIL-backed class (:func:`load_processor`).

        Raises:
            ModelError: The path does not exist, is not a LLaVA-family checkpoint, or fails to load.
        """
        from transformers import LlavaForConditionalGeneration

        src = resolve_checkpoint(path_or_id)
        config = load_config(src, trust_remote_code)
        if Path(src).is_dir():
            check_weights(Path(src), config)  # before transformers allocates what config says
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                src,
                config=config,
                dtype=resolve_dtype(dtype),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with the file to fix
            )
        except pickle.UnpicklingError:
            pickles = sorted(Path(src).glob("pytorch_model*.bin")) if Path(src).is_dir() else []
            raise pickle_refused(pickles[0] if pickles else src) from None
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelError(f"cannot load '{src}': {first_line(e)}") from None
        check_loading_info(info, src)
        return cls(model.to(device), load_processor(src, trust_remote_code))

    def save_pretrained(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a standard transformers checkpoint (safetensors) with its processor, atomically."""
        with guarded_dir(out_dir, overwrite=overwrite) as tmp:
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

    def vision_tokens(self) -> int:
        """Tokens one image has inside the vision tower: its patches, plus CLIP's class token."""
        vc = self.config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        return patches + has_class_token(self.vision_tower)

    def num_image_tokens(self) -> int:
        """Visual tokens one image becomes, as the processor expands ``<image>``.

        The ``default`` feature selection drops the tower's first token: CLIP's class token
        (LLaVA-1.5: 577 -> 576), or a SigLIP tower's first patch (TinyLLaVA: 729 -> 728).
        """
        n = self.vision_tokens()
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    def feature_layers(self) -> list[int]:
        """The vision feature layer(s) as non-negative indices into ``hidden_states``.

        ``hidden_states[k]`` is the output of the first ``k`` encoder layers (0: the embeddings),
        so a tower of ``n`` layers has ``n + 1`` entries and ``-1`` is ``n``.
        """
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        n = int(self.config.vision_config.num_hidden_layers)
        return [k if k >= 0 else n + 1 + k for k in layers]

    def unused_vision_parameters(self) -> list[str]:
        """Names (in :attr:`model`) of vision-tower parameters the features never depend on.

        The features are ``hidden_states[k]`` (:meth:`feature_layers`): the encoder layers from
        ``k`` on, the final layer norm and the pooling head (SigLIP, CLIP) come after them. They
        get no gradient, so no optimizer state; a sharded optimizer checkpoint then lacks them
        and refuses to load while they require gradients. Empty for a tower without an
        ``encoder.layers`` list.
        """
        tower = self.vision_tower
        n = int(self.config.vision_config.num_hidden_layers)
        found = [
            (name, module)
            for name, module in tower.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) == n
            and name.rsplit(".", 1)[-1] in ("layers", "layer")
        ]  # fmt: skip
        if len(found) != 1:
            return []
        name, layers = found[0]
        base = name[: -len("encoder." + name.rsplit(".", 1)[-1])]  # "vision_model." or ""
        last = max(self.feature_layers())
        unused = [f"{name}.{i}." for i in range(last, len(layers))]
        # after the features: final norms (SigLIP/CLIP post_layernorm, DINOv2 layernorm), the
        # pooling head; DINOv2's mask token serves masked pre-training only
        unused += [f"{base}{m}" for m in ("post_layernorm.", "head.", "layernorm.")]
        unused += [f"{base}embeddings.mask_token"]
        prefix = next(n for n, m in self.model.named_modules() if m is tower) + "."
        return [
            prefix + pname
            for pname, _ in tower.named_parameters()
            if any(pname.startswith(u) for u in unused)
        ]

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

    def own_ids(self, input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
        """Input ids built by another model's processor, in this model's ids.

        Two models whose text vocabularies agree (:func:`check_compatible`) read every text id
        the same way; only their image tokens may have different ids. The other model's image
        token becomes this one's, so the visual positions stay where they are.

        Args:
            input_ids: (B, L) ids, image tokens expanded, as the other model's processor made them.
            image_token_id: The other model's image token id (None: the same as this one's).
        """
        if image_token_id is None or image_token_id == self.image_token_id:
            return input_ids
        return input_ids.masked_fill(input_ids == image_token_id, self.image_token_id)

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
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the language model and its head on embeddings: (B, L, D) -> (B, L, V) logits.

        ``keep`` (P,): the sequence positions to compute logits at, (B, P, V); None: all.
        """
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        return self.lm_head(hidden if keep is None else hidden[:, keep])

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
        """A short hash of the vocabulary and image-token setup (equal for models sharing one
        tokenizer; :func:`check_compatible` decides what distillation needs)."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        blob = json.dumps([vocab, self.image_token_id, self.vocab_size]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def has_class_token(tower: torch.nn.Module) -> bool:
    """The tower prepends a learned class token (CLIP's ``class_embedding``, DINOv2's
    ``cls_token``)."""
    return any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in tower.modules())


def check_compatible(teacher: VLM, student: VLM) -> None:
    """What logit distillation needs of a teacher and a student, all problems in one error.

    The teacher reads the student's input ids (each model's processor builds ids its own way,
    but the positions must line up token for token) and both models' logits are compared column
    by column, so:

    * the logit widths (embedding rows) must be equal;
    * the text vocabulary must agree: every token of the student's tokenizer, its image token
      aside, has the same id in the teacher's, or is unknown to the teacher and sits on a row the
      teacher leaves unused. The end-of-text and template tokens the labels hold are among them;
    * the image tokens may differ: the teacher gets the student's ids with the student's image
      token replaced by its own (:meth:`VLM.own_ids`), but the teacher's image id must not be a
      token the student can write;
    * one image must give both models the same number of visual tokens (the image slots in the
      student's ids are filled with the teacher's visual tokens).

    The published TinyLLaVA pair passes: the Qwen2 tokenizer (3 added tokens, ``<image>`` 151646)
    is a subset of Qwen2.5's (22 added tokens, ``<image>`` 151665), with 151,936 rows each.

    Raises:
        ModelError: naming both values of every mismatch and the fix.
    """
    problems = []
    if teacher.vocab_size != student.vocab_size:
        problems.append(
            f"teacher vocabulary size {teacher.vocab_size} != student vocabulary size "
            f"{student.vocab_size} (the logits must have the same columns)"
        )
    problems += _text_vocabulary_problems(teacher, student)
    n_t, n_s = teacher.num_image_tokens(), student.num_image_tokens()
    if n_t != n_s:
        problems.append(
            f"teacher visual tokens per image {n_t} != student visual tokens per image {n_s} "
            "(the same image size, patch size and feature selection are needed)"
        )
    if problems:
        raise ModelError(
            "teacher and student cannot be distilled together: " + "; ".join(problems) + "; "
            "distil between models whose tokenizers share the text vocabulary (the image "
            "token may differ) and whose vision towers give as many visual tokens"
        )


def _text_vocabulary_problems(teacher: VLM, student: VLM) -> list[str]:
    """Student tokens the teacher would read differently (its image token aside)."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    t_ids = {i: tok for tok, i in t_vocab.items()}
    t_img, s_img = teacher.image_token_id, student.image_token_id
    problems, differ = [], []
    for tok, i in s_vocab.items():
        if i == s_img:
            continue
        if i == t_img:  # the teacher would take this text token for an image slot
            problems.append(
                f"student token '{tok}' (id {i}) is the teacher's image token (teacher image "
                f"token id {t_img} != student image token id {s_img})"
            )
        elif t_ids.get(i) != tok and (tok in t_vocab or i in t_ids):
            seen = t_vocab.get(tok)
            differ.append(
                f"'{tok}' is {i} for the student, {'unknown' if seen is None else seen} "
                f"for the teacher, whose {i} is {t_ids.get(i, 'unused')!r}"
            )
    if differ:
        problems.append(
            f"teacher and student text vocabularies differ in {len(differ)} tokens (e.g. "
            + "; ".join(sorted(differ)[:3])
            + ")"
        )
    return problems
