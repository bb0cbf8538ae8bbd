"""What the distillation losses share: their defaults (a recipe's), their result type, and the
chunked row machinery of :mod:`edgekd.distill.losses` and :mod:`edgekd.distill.losses_topk`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgekd.profiles.schema import LossConfig

# The losses' defaults are a recipe's (written once, in the schema); bild's k is its own.
RECIPE = LossConfig()
DEFAULT_CHUNK = RECIPE.chunk_size
BILD_K = 8


@dataclass(frozen=True)
class LossOutput:
    """Result of a distillation loss.

    Attributes:
        loss: float32 scalar, mean over supervised positions; carries the graph.
        n_tokens: number of supervised positions.
        k_t: mean teacher-led k over supervised positions (top-k losses only; detached).
        k_s: mean student-led k over supervised positions (top-k losses only; detached).
        parts: detached named components of ``loss`` (e.g. teacher-led / student-led terms).
        k_at_min: share of (position, side) pairs whose k is the clamp's lower bound (DBiLD
            only; detached). A position at k = k_min may be a knee there or clamped up to it.
        k_at_max: the same for the upper bound (clamped down, or no knee in the window).
    """

    loss: Tensor
    n_tokens: int
    k_t: Tensor | None = None
    k_s: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    k_at_min: Tensor | None = None
    k_at_max: Tensor | None = None


LossFn = Callable[..., LossOutput]


# --------------------------------------------------------------------------------------------
# row machinery


def check_logits(
    student: Tensor, teacher: Tensor, mask: Tensor, temperature: float, chunk: int
) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ; logit distillation needs the same positions and the same vocabulary"
        )
    if tuple(mask.shape) != tuple(student.shape[:-1]):
        raise ValueError(
            f"mask {tuple(mask.shape)} must equal the logits' leading shape "
            f"{tuple(student.shape[:-1])} (logits {tuple(student.shape)})"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")


def supervised_rows(mask: Tensor) -> Tensor:
    """Flat indices (N,) of the supervised positions."""
    return mask.reshape(-1).ne(0).nonzero().squeeze(1)


def zero_output(student: Tensor, teacher: Tensor) -> LossOutput:
    # Summing an empty slice gives an exact 0 that is still attached to both inputs, so callers
    # can backward() through an all-masked batch and get zero (not missing, not NaN) gradients.
    loss = student[..., :0].float().sum() + teacher[..., :0].float().sum()
    return LossOutput(loss=loss, n_tokens=0)


def needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def log_softmax_(x: Tensor, probs: Tensor, invalid: Tensor | None) -> None:
    """In place over the last dim: ``x`` becomes log_softmax(x) and ``probs`` softmax(x).

    Entries where ``invalid`` is true become -inf in ``x`` and exactly 0 in ``probs``.
    """
    if invalid is not None:
        x.masked_fill_(invalid, float("-inf"))
    x.sub_(x.amax(dim=-1, keepdim=True))
    torch.exp(x, out=probs)
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    x.sub_(total.log_())


def kl_and_grads_(
    la: Tensor,
    pa: Tensor,
    lb: Tensor,
    pb: Tensor,
    invalid: Tensor | None,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Row-wise KL(softmax(la) || softmax(lb)) and its gradients w.r.t. la and lb, in place.

    With p = softmax(a), q = softmax(b), KL = sum p (log p - log q):
    dKL/db = q - p and dKL/da = p * (log p - log q - KL). ``la``, ``lb`` are (c, P) float32
    logits and are overwritten; ``pa``, ``pb`` are (c, P) scratch. Everything happens in these
    four buffers so a chunk costs no further (c, P) allocation. Entries where ``invalid`` is
    true get probability 0 and contribute exactly 0 to the KL and both gradients (the -inf - -inf
    NaNs are overwritten before use).

    Returns:
        kl (c,), grad_a (a view of ``la``) or None, grad_b (a view of ``pb``) or None.
    """
    log_softmax_(la, pa, invalid)
    log_softmax_(lb, pb, invalid)
    grad_b = pb.sub_(pa) if need_b else None
    ratio = la.sub_(lb)
    if invalid is not None:
        ratio.masked_fill_(invalid, 0.0)
    kl = torch.bmm(pa.unsqueeze(1), ratio.unsqueeze(2)).view(-1)  # row dot, no (c, P) temporary
    grad_a = ratio.sub_(kl[:, None]).mul_(pa) if need_a else None
    return kl, grad_a, grad_b


def row_chunks(rows: Tensor, chunk: int) -> Iterator[tuple[Tensor, slice | None]]:
    """Yield each chunk's row indices and, when they are consecutive, the equivalent slice.

    ``rows`` is sorted and unique (from ``nonzero``), so a chunk is consecutive exactly when its
    span equals its length; a slice then reads and writes views instead of copies.
    """
    n = rows.numel()
    starts = list(range(0, n, chunk))
    firsts = rows[starts].tolist()
    lasts = rows[[min(s + chunk, n) - 1 for s in starts]].tolist()
    for s, first, last in zip(starts, firsts, lasts):
        r = rows[s : s + chunk]
        yield r, (slice(first, last + 1) if last - first + 1 == r.numel() else None)
