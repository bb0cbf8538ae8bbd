"""The visual switch: the student's vision features through the teacher's projector and LM.

Switch-KD builds a second teacher distribution from the *student's* eyes:

    z_t = LM_T(merge(embed_T(ids), P_T(VE_T(image))))     teacher logits (no grad)
    z_v = LM_T(merge(embed_T(ids), P_T(A(VE_S(image)))))   switch logits (grad to VE_S only)

where A is the identity (the paper) or a learned linear map (``--vsd-adapter linear``, edgekd's
extension for vision towers of different widths). The teacher is frozen, so the gradient of
L_VSD = DBiLD(z_v, z_t) flows through P_T and LM_T into the student's vision tower alone.

Both teacher routes run in ONE ``forward`` of :class:`TeacherRoutes`, so the teacher can be
wrapped by FSDP or DeepSpeed ZeRO-3 like any module (their parameter gathering happens around
module forwards), and the teacher's token embeddings are computed once for both routes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.models.vlm import VLM

ADAPTERS = ("none", "linear")


@dataclass
class TeacherOutput:
    logits: torch.Tensor  # (B, L or P, V), computed without grad
    switch_logits: torch.Tensor | None  # (B_img, L or P, V) for the rows with an image, or None


class TeacherRoutes(nn.Module):
    """A frozen teacher that returns its own logits and, given student features, switch logits.

    Args:
        teacher_model: The teacher ``LlavaForConditionalGeneration``.
        input_image_token_id: The image token id of the ids it is given (the student's); the
            teacher reads them with its own image token id instead (:meth:`VLM.own_ids`). None:
            the ids already use the teacher's.
        checkpoint_switch: Recompute the teacher's decoder layers in the switch route's
            backward instead of keeping their activations (the recipe's
            ``gradient_checkpointing``). The switch route keeps, per token and decoder layer,
            about ``8 h + 2 kv + 4 I`` activations (61k values for a 3B Qwen2.5); checkpointed,
            only each layer's input (``h``) and one layer's set during its recomputation. Same
            values and gradients, one more teacher forward in the backward.
    """

    def __init__(
        self,
        teacher_model: nn.Module,
        input_image_token_id: int | None = None,
        checkpoint_switch: bool = False,
    ):
        super().__init__()
        self.teacher = teacher_model
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.input_image_token_id = input_image_token_id
        self.checkpoint_switch = checkpoint_switch
        if checkpoint_switch:
            if hasattr(teacher_model, "activation_checkpointing_enable"):
                teacher_model.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers before the rename
                teacher_model.gradient_checkpointing_enable({"use_reentrant": False})

    def train(self, mode: bool = True) -> TeacherRoutes:
        # The teacher stays in eval mode (no dropout) whatever the trainer asks.
        return super().train(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        student_features: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> TeacherOutput:
        """Run the teacher route and, when ``student_features`` are given, the switch route.

        Args:
            input_ids, attention_mask: (B, L) token ids and mask, image tokens expanded (built
                by the student's processor: its image token is translated here).
            pixel_values: (B_img, 3, H, W) images of the rows with an image, in row order.
            has_image: (B,) bool, which rows have an image (all rows when None).
            student_features: (B_img, N, D_vision) student vision features (already adapted).
            keep: (P,) the positions to compute logits at (both routes); None: every position.
                The head then runs on P rows instead of L, and the switch route's backward
                starts from (B_img, P, V) logit gradients.
        """
        vlm = VLM(self.teacher, processor=None)
        input_ids = vlm.own_ids(input_ids, self.input_image_token_id)
        with torch.no_grad():
            embeds = vlm.embed(input_ids)
            merged = embeds
            if pixel_values is not None:
                visual = vlm.project(vlm.vision_features(pixel_values))
                merged = vlm.merge(embeds, visual, input_ids)
            logits = vlm.language_logits(merged, attention_mask, keep=keep)
        switch = None
        if student_features is not None and pixel_values is not None:
            rows = has_image if has_image is not None else slice(None)
            ids, mask = input_ids[rows], attention_mask[rows]
            visual = vlm.project(student_features.to(embeds.dtype))
            with _checkpointed_layers(vlm.language_model, self.checkpoint_switch):
                switch = vlm.language_logits(vlm.merge(embeds[rows], visual, ids), mask, keep=keep)
        return TeacherOutput(logits=logits, switch_logits=switch)


@contextmanager
def _checkpointed_layers(language_model: nn.Module, enabled: bool):
    """Let the (eval-mode) teacher's decoder layers checkpoint themselves inside the block.

    transformers checkpoints a layer only when it is in training mode; the layers alone (not
    their attention or MLP, whose dropout stays off) are switched for the block.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = (
        [m for m in language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if enabled
        else []
    )
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


class FeatureCapture:
    """Keeps the input of the student's projector (= its vision features) from each forward.

    A forward pre-hook on the projector sees exactly what ``VLM.vision_features`` returns, inside
    the student's own forward, so DDP, FSDP and ZeRO-3 gather and reduce parameters as usual and
    the features stay in the autograd graph. An adapter (if any) is applied inside the hook for
    the same reason: its parameters are part of the student module.

    Under DDP the adapter's output must be reachable from the student's output: DDP with
    ``find_unused_parameters`` marks every parameter its outputs do not reach as unused when the
    forward ends, and an adapter whose output left only through this hook would then be marked
    ready twice (once there, once by its gradient from the switch loss). So the projector's
    input becomes ``features + 0 * sum(adapted)``: the same values and the same gradients, and a
    graph edge from the student's logits to the adapter.
    """

    def __init__(self, student_model: nn.Module, adapter: nn.Module | None = None):
        self.features: torch.Tensor | None = None
        self.adapter = adapter
        projector = student_model.model.multi_modal_projector
        self._handle = projector.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        feats = args[0]
        if self.adapter is None:
            self.features = feats
            return None
        self.features = self.adapter(feats)
        return (feats + 0 * self.features.sum().to(feats.dtype), *args[1:])

    def pop(self) -> torch.Tensor | None:
        """The features of the last forward (then forgotten, so stale ones are never reused)."""
        feats, self.features = self.features, None
        return feats

    def remove(self) -> None:
        self._handle.remove()


def vision_shapes(vlm_or_model) -> tuple[int, int]:
    """(visual tokens per image, feature width) of a model's vision features."""
    vlm = vlm_or_model if isinstance(vlm_or_model, VLM) else VLM(vlm_or_model, processor=None)
    return vlm.num_image_tokens(), vlm.vision_hidden_size


def check_same_feature_layer(student: VLM, teacher: VLM) -> None:
    """The switch feeds the student's features to a projector trained on the teacher's layer.

    The same layer counted from the input or from the output (``-2`` of two towers of different
    depths) passes; otherwise both values are named.
    """
    s_cfg, t_cfg = student.config, teacher.config
    same_from_start = student.feature_layers() == teacher.feature_layers()
    s_depth = int(s_cfg.vision_config.num_hidden_layers)
    t_depth = int(t_cfg.vision_config.num_hidden_layers)
    same_from_end = [s_depth - k for k in student.feature_layers()] == [
        t_depth - k for k in teacher.feature_layers()
    ]
    if not (same_from_start or same_from_end):
        raise ModelError(
            f"student vision_feature_layer {s_cfg.vision_feature_layer} (of {s_depth} layers) != "
            f"teacher vision_feature_layer {t_cfg.vision_feature_layer} (of {t_depth} layers): "
            "the visual switch feeds the student's features to the teacher's projector, trained "
            "on the teacher's layer; set the student's vision_feature_layer in its config.json"
        )


def build_adapter(student: VLM, teacher: VLM, kind: str = "none") -> nn.Module | None:
    """Check that student vision features fit the teacher projector; build the adapter if asked.

    Raises:
        ModelError: Shapes differ and no adapter was asked for (names both shapes and the option),
            or the numbers of visual tokens differ (no linear map fixes that).
    """
    if kind not in ADAPTERS:
        raise ModelError(f"unknown --vsd-adapter '{kind}'; valid: {', '.join(ADAPTERS)}")
    check_same_feature_layer(student, teacher)
    (n_s, d_s), (n_t, d_t) = vision_shapes(student), vision_shapes(teacher)
    if n_s != n_t:
        raise ModelError(
            f"student vision output ({n_s} tokens x {d_s}) and teacher vision output ({n_t} tokens"
            f" x {d_t}) have different token counts; the visual switch needs the same image size "
            "and patch size"
        )
    if kind == "none":
        if d_s != d_t:
            raise ModelError(
                f"student vision output (N, {n_s}, {d_s}) does not fit the teacher projector input"
                f" (N, {n_t}, {d_t}); use --vsd-adapter linear to learn a map between them"
            )
        return None
    adapter = nn.Linear(d_s, d_t)
    if d_s == d_t:  # start from the identity: the paper's switch, refined by training
        nn.init.eye_(adapter.weight)
        nn.init.zeros_(adapter.bias)
    return adapter.to(device=student.device, dtype=student.dtype)
