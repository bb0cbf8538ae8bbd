"""The training objective of each method, as one function of logits and labels.

    sft        L = CE
    kd         L = w_ce CE + w_align KL(p_t || p_s)                 (T = 1)
    rkl        L = w_ce CE + w_align KL(p_s || p_t)                 (T = 1)
    bild       L = w_ce CE + w_align BiLD(z_s, z_t)                 (k = 8, T = loss.temperature)
    dbild      L = w_ce CE + w_align DBiLD(z_s, z_t)
    switch-kd  L = w_ce CE + w_align DBiLD(z_s, z_t) + w_vsd DBiLD(z_v, z_t)

Positions: logits at t predict the token at t + 1; only answer tokens (label != -100) are
supervised, for CE and distillation alike. L_VSD covers the rows that have an image.
The KL baselines use T = 1 as GKD and MiniLLM do; BiLD and DBiLD use the recipe's temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from edgekd.distill.losses import LOSSES, LossOutput
from edgekd.profiles.schema import Method

METHODS: tuple[str, ...] = get_args(Method)  # sft, kd, rkl, bild, dbild, switch-kd
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Objective:
    """Loss weights and settings of one method (from a recipe's ``loss`` block)."""

    method: str = "switch-kd"
    w_ce: float = 1.0
    w_align: float = 1.0
    w_vsd: float = 1.0
    temperature: float = 3.0
    top_n: int = 256
    k_min: int = 2
    k_max: int = 64
    bild_k: int = 8
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; valid: {', '.join(METHODS)}")

    @property
    def needs_teacher(self) -> bool:
        return self.method != "sft"

    @property
    def uses_switch(self) -> bool:
        return self.method == "switch-kd" and self.w_vsd > 0

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
    ) -> LossOutput:
        """The method's logit loss between (N..., V) student and teacher logits at ``mask``."""
        if self.method in ("kd", "rkl"):
            return LOSSES[self.method](
                student, teacher, mask, temperature=1.0, chunk_size=self.chunk_size
            )
        if self.method == "bild":
            return LOSSES["bild"](
                student,
                teacher,
                mask,
                k=self.bild_k,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
            )
        top_n = min(self.top_n, student.shape[-1])
        return LOSSES["dbild"](
            student,
            teacher,
            mask,
            temperature=self.temperature,
            top_n=top_n,
            k_min=min(self.k_min, top_n),
            k_max=min(self.k_max, top_n),
            chunk_size=self.chunk_size,
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        switch_logits: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts.

        Args:
            student_logits: (B, L, V).
            labels: (B, L), -100 outside answer tokens (unshifted, as in the batch).
            teacher_logits: (B, L, V), needed unless the method is sft.
            switch_logits: (B_img, L, V) for the rows where ``has_image``; switch-kd only.
            has_image: (B,) bool.

        Returns:
            (loss, stats) with stats ``ce``, ``align``, ``vsd``, ``k_t``, ``k_s`` as detached 0-d
            tensors: reading them is left to the logging step, so a training step does not wait
            for the device.
        """
        logits, targets = student_logits[:, :-1], labels[:, 1:]
        mask = targets != IGNORE_INDEX
        n = mask.sum().clamp(min=1)
        ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum") / n
        loss = self.w_ce * ce
        stats = {"ce": ce.detach()}
        if self.needs_teacher:
            if teacher_logits is None:
                raise ValueError(f"method '{self.method}' needs teacher logits")
            align = self.distill(logits, teacher_logits[:, :-1], mask)
            loss = loss + self.w_align * align.loss
            stats["align"] = align.loss.detach()
            _k_stats(stats, align)
        if self.uses_switch and switch_logits is not None:
            rows = has_image if has_image is not None else torch.ones_like(mask[:, 0])
            vsd = self.distill(switch_logits[:, :-1], teacher_logits[rows][:, :-1], mask[rows])
            loss = loss + self.w_vsd * vsd.loss
            stats["vsd"] = vsd.loss.detach()
        return loss, stats


def _k_stats(stats: dict[str, torch.Tensor], out: LossOutput) -> None:
    if out.k_t is not None:
        stats["k_t"] = torch.as_tensor(out.k_t).detach()
    if out.k_s is not None:
        stats["k_s"] = torch.as_tensor(out.k_s).detach()
