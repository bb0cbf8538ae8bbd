"""The training objective of each method, as one function of logits and labels.

    sft        L = CE
    kd         L = w_ce CE + w_align KL(p_t || p_s)                 (T = 1)
    rkl        L = w_ce CE + w_align KL(p_s || p_t)                 (T = 1)
    bild       L = w_ce CE + w_align s BiLD(z_s, z_t)               (k = 8, T = loss.temperature)
    dbild      L = w_ce CE + w_align s DBiLD(z_s, z_t)
    switch-kd  L = w_ce CE + w_align s DBiLD(z_s, z_t) + w_vsd s DBiLD(z_v, z_t)

with s = T^2 (``t2_scale``, the default) or 1. switch-kd with ``logit_loss="kd"`` uses
KL(p_t || p_s) at T = 1 for both of its logit terms (an ablation of DBiLD).

**Why T^2.** A loss on z / T has gradients of order 1 / T^2 in z (Hinton et al., 2015): one
1 / T from the chain rule, one from the softened distributions' differences. Measured on the demo's
trained teacher and student logits, the per-token gradient of DBiLD at T = 3 is 0.09-0.24x CE's,
so with w_ce = w_align = 1 a dbild run is sft with a small add-on; times T^2 (9) it is 0.8-2.2x
CE (1.8-2x on the trained pair), the same order, as KD at T = 1 is (0.9x). The KL baselines
run at T = 1, where s = 1 either way. In the 5-seed study (docs/results.md) dbild without the
scale is not shown different from dbild with it; the default keeps the balance the gradients
call for.

**Positions.** Logits at t predict the token at t + 1; only answer tokens (label != -100) are
supervised. CE covers all of them. The distillation terms leave out the positions whose target
is in ``exclude_ids`` (by default the tokenizer's special tokens, such as the end-of-turn
token): there the teacher is certain, and the pairwise terms would only fit the order of
irrelevant runner-up tokens. In the study, distilling them cost dbild 19 points on easy-vqa
(95% interval over 5 seeds [-37.9, -0.8]: borderline, one task, no correction for the study's
many comparisons). The same default applies to every distillation method, kd and rkl
included. L_VSD covers the rows that have an image.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from edgekd.distill import methods
from edgekd.distill.losses import BILD_K, LossOutput
from edgekd.distill.methods import logit_method
from edgekd.profiles.schema import LogitLoss, LossConfig

LOGIT_LOSSES: tuple[str, ...] = get_args(LogitLoss)  # dbild, kd
IGNORE_INDEX = -100


_LOSS = LossConfig()  # the recipe schema's defaults: written there, once


@dataclass(frozen=True)
class Objective:
    """Loss weights and settings of one method (from a recipe's ``loss`` block; the defaults
    are the recipe schema's)."""

    method: str = "switch-kd"
    w_ce: float = _LOSS.w_ce
    w_align: float = _LOSS.w_align
    w_vsd: float = _LOSS.w_vsd
    temperature: float = _LOSS.temperature
    t2_scale: bool = _LOSS.t2_scale
    top_n: int = _LOSS.top_n
    k_min: int = _LOSS.k_min
    k_max: int = _LOSS.k_max
    bild_k: int = BILD_K
    logit_loss: str = _LOSS.logit_loss
    exclude_ids: frozenset[int] = frozenset()
    chunk_size: int = _LOSS.chunk_size

    def __post_init__(self) -> None:
        methods.get(self.method)  # ValueError naming the valid ones
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(
                f"unknown logit_loss '{self.logit_loss}'; valid: {', '.join(LOGIT_LOSSES)}"
            )

    @property
    def logit_method(self) -> str:
        """The loss between logits: the method's own, or kd for switch-kd with logit_loss kd."""
        return logit_method(self.method, self.logit_loss)

    @property
    def scale(self) -> float:
        """s: T^2 for the temperature-softened losses when ``t2_scale``, else 1."""
        softened = methods.get(self.logit_method).softened
        return self.temperature**2 if self.t2_scale and softened else 1.0

    @property
    def needs_teacher(self) -> bool:
        return methods.get(self.method).reads_teacher_logits

    @property
    def uses_switch(self) -> bool:
        return methods.get(self.method).switch and self.w_vsd > 0

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
    ) -> LossOutput:
        """The method's logit loss between (N..., V) student and teacher logits at ``mask``.

        Unscaled: ``__call__`` multiplies it by :attr:`scale`.
        """
        spec = methods.get(self.logit_method)
        top_n = min(self.top_n, student.shape[-1])  # the k clamp fits the vocabulary
        settings = {
            "temperature": self.temperature if spec.temperature is None else spec.temperature,
            "chunk_size": self.chunk_size,
            "k": self.bild_k,
            "top_n": top_n,
            "k_min": min(self.k_min, top_n),
            "k_max": min(self.k_max, top_n),
        }
        fn = spec.loss_fn()
        return fn(student, teacher, mask, **{k: settings[k] for k in _takes(fn) & set(settings)})

    def __call__(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        switch_logits: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts.

        Args:
            student_logits: (B, L, V), or (B, P, V) at ``positions``.
            labels: (B, L), -100 outside answer tokens (unshifted, as in the batch).
            teacher_logits: like ``student_logits``; needed unless the method is sft.
            switch_logits: (B_img, L or P, V) for the rows where ``has_image``; switch-kd only.
            has_image: (B,) bool.
            positions: (P,) the sequence positions the logits were computed at (sorted, each
                < L - 1), e.g. :func:`supervised_positions`; None: every position. Logits at
                the other positions get no gradient, so leaving them out changes nothing.

        Returns:
            (loss, stats) with stats ``ce``, ``align``, ``vsd`` (unscaled), ``k_t``, ``k_s``,
            ``k_at_min``, ``k_at_max`` (the share of positions and sides whose k is the clamp's
            bound) as detached 0-d tensors: reading them is left to the logging step, so a
            training step does not wait for the device.
        """
        if positions is None:
            student_logits = student_logits[:, :-1]
            targets = labels[:, 1:]
            teacher_logits = teacher_logits[:, :-1] if teacher_logits is not None else None
            switch_logits = switch_logits[:, :-1] if switch_logits is not None else None
        else:
            targets = labels[:, positions + 1]
        mask = targets != IGNORE_INDEX
        n = mask.sum().clamp(min=1)
        ce = F.cross_entropy(student_logits[mask].float(), targets[mask], reduction="sum") / n
        loss = self.w_ce * ce
        stats = {"ce": ce.detach()}
        if not self.needs_teacher:
            return loss, stats
        if teacher_logits is None:
            raise ValueError(f"method '{self.method}' needs teacher logits")
        distilled = self.distilled(mask, targets)
        align = self.distill(student_logits, teacher_logits, distilled)
        loss = loss + self.w_align * self.scale * align.loss
        stats["align"] = align.loss.detach()
        _k_stats(stats, align)
        if self.uses_switch and switch_logits is not None:
            rows = has_image if has_image is not None else torch.ones_like(mask[:, 0])
            vsd = self.distill(switch_logits, teacher_logits[rows], distilled[rows])
            loss = loss + self.w_vsd * self.scale * vsd.loss
            stats["vsd"] = vsd.loss.detach()
        return loss, stats

    def distilled(self, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: supervised positions whose target is not one of ``exclude_ids``
        (``mask`` itself when nothing is excluded: no tensor made at each step)."""
        if not self.exclude_ids:
            return mask
        return mask & ~torch.isin(targets, _id_tensor(self.exclude_ids, targets.device))


@functools.lru_cache(maxsize=8)
def _id_tensor(ids: frozenset[int], device: torch.device) -> torch.Tensor:
    """The ids as a tensor on ``device``, made once per set (not again at every step)."""
    return torch.tensor(sorted(ids), device=device)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(P,) the positions t < L - 1 whose next token is supervised in any row (sorted).

    The only logits a step's losses read: computing the language-model head there alone, in
    the student and in both teacher routes, gives the same loss and gradients.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def _k_stats(stats: dict[str, torch.Tensor], out: LossOutput) -> None:
    for key in ("k_t", "k_s", "k_at_min", "k_at_max"):
        value = getattr(out, key)
        if value is not None:
            stats[key] = torch.as_tensor(value).detach()


@functools.cache
def _takes(fn) -> frozenset[str]:
    """The keyword settings a loss function names."""
    return frozenset(inspect.signature(fn).parameters)
