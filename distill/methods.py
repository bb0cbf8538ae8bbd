"""The distillation methods: each registered once, with everything downstream needs of it.

A method is its loss between student and teacher logits (a pure function, as in
:mod:`edgekd.distill.losses`) plus what it asks of a run: whether it reads a teacher, whether it
adds the visual switch, whether its loss is temperature-softened (scaled by T^2). The recipe
schema (valid names, the loss weights a method ignores, its own checks), the objective, the
distillation planner and the CLI help all read this registry, so a new method is its loss
function and one :func:`register` call::

    register(Method(
        name="mykd", summary="my logit loss",
        loss="mypkg.losses:my_kl",   # (student, teacher, mask, **settings) -> LossOutput
    ))

The loss receives, by keyword, the objective's settings its signature names (``temperature``,
``chunk_size``, ``k`` (bild's k), ``top_n``, ``k_min``, ``k_max``). References are
``"module:attribute"`` strings, imported on first use, so that reading the registry (profiles,
``edgekd --help``) imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgekd.registry import Registry, resolve


@dataclass(frozen=True)
class Method:
    """One training objective.

    Attributes:
        name: ``--method`` name and the recipe's ``method``.
        summary: One line for the CLI help and ``edgekd profiles``.
        loss: The logit loss (``"module:function"`` or the function); None: CE only (sft).
        temperature: A fixed temperature for the loss (kd and rkl: 1); None: the recipe's.
        softened: Its gradient is of order 1 / T^2: multiplied by T^2 when ``t2_scale``.
        switch: Adds the visual-switch term (L_VSD): the student's vision features through
            the teacher's projector and language model; trains the student's vision tower.
        problems: ``(loss block) -> [(key, message)]``: loss settings this loss cannot train
            with (checked with every recipe whose logits it compares).
    """

    name: str
    summary: str
    loss: Any = None
    temperature: float | None = None
    softened: bool = False
    switch: bool = False
    problems: Callable[[Any], list[tuple[str, str]]] | None = None

    @property
    def reads_teacher_logits(self) -> bool:
        return self.loss is not None

    @property
    def unused_weights(self) -> tuple[str, ...]:
        """Loss weights this method ignores (set to 0 when left out, an error when given)."""
        if self.loss is None:
            return ("w_align", "w_vsd")
        return () if self.switch else ("w_vsd",)

    def loss_fn(self) -> Callable[..., Any]:
        return resolve(self.loss)


METHODS = Registry("method")
register, get, names = METHODS.add, METHODS.require, METHODS.names


def help_text() -> str:
    """``sft, kd, ... or switch-kd`` for the CLI help."""
    listed = list(METHODS)
    return ", ".join(listed[:-1]) + f" or {listed[-1]}" if len(listed) > 1 else "".join(listed)


def logit_method(method: str, logit_loss: str) -> str:
    """The method whose loss compares student and teacher logits: the method itself, or, for a
    method with the visual switch, ``logit_loss`` (switch-kd's default, dbild, is the paper's)."""
    return logit_loss if get(method).switch else method


def _kneedle_k_min(loss) -> list[tuple[str, str]]:
    if loss.k_min < 3:
        msg = (
            f"must be >= 3, got {loss.k_min}: at k = 2 the one pairwise difference has "
            "softmax 1, a zero loss term (the default is 3; it was 2 before)"
        )
        return [("loss.k_min", msg)]
    return []


# ---- the built-in methods ------------------------------------------------------------------
register(Method("sft", "cross-entropy on the answers only (no teacher logits)"))
register(
    Method("kd", "CE + KL(teacher || student) at T = 1", "edgekd.distill.losses:forward_kl", 1.0)
)
register(
    Method("rkl", "CE + KL(student || teacher) at T = 1", "edgekd.distill.losses:reverse_kl", 1.0)
)
register(
    Method(
        "bild", "CE + BiLD (top-8 logit differences)", "edgekd.distill.losses:bild", softened=True
    )
)
register(
    Method(
        "dbild",
        "CE + DBiLD (Kneedle-chosen k, both directions, reverse KL)",
        "edgekd.distill.losses:dbild",
        softened=True,
        problems=_kneedle_k_min,
    )
)
register(
    Method(
        "switch-kd",
        "CE + DBiLD + the visual switch's DBiLD through the teacher (the paper's method)",
        "edgekd.distill.losses:dbild",
        softened=True,
        switch=True,
    )
)
