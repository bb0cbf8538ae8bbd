"""The top-k logit-difference losses: BiLD (fixed k) and DBiLD (k per row from the Kneedle knee).

The indices are chosen without grad; O(k) values per row are gathered with one indexing op (its
backward scatters into those entries only), and only (N, k) gradients of the pairwise softmax
are kept (``_PairwiseDiffKL``). Conventions as in :mod:`edgekd.distill.losses`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from edgekd.distill.losses_common import (
    BILD_K,
    DEFAULT_CHUNK,
    RECIPE,
    LossOutput,
    check_logits,
    kl_and_grads_,
    needs_grad,
    row_chunks,
    supervised_rows,
    zero_output,
)


def kneedle_k(sorted_desc_logits: Tensor, k_min: int, k_max: int) -> Tensor:
    """Per-row k from the Kneedle knee of descending-sorted logits (Satopaa et al., 2011).

    Each row (y_0 >= ... >= y_{n-1}) is min-max normalised to ``y'`` in [0, 1] with ranks
    ``x_i = i / (n - 1)``. A descending convex curve lies below the chord from (0, 1) to (1, 0),
    so the knee is ``i* = argmax_i (1 - x_i) - y'_i`` (first index on ties). ``k = i* + 1``: the
    entries before the knee plus the knee itself, where the curve turns flat. A steeper head
    puts the knee earlier and gives a smaller k. Rows with no knee (flat, linear or concave:
    largest gap <= 1e-6) get ``k_max``, since their mass is spread rather than concentrated.

    Args:
        sorted_desc_logits: (..., n) logits sorted descending along the last dim, n >= 1.
        k_min: smallest k returned.
        k_max: largest k returned (also used for rows with no knee); clipped to n.

    Returns:
        (...) int64 k per row, in [min(k_min, n), min(k_max, n)].
    """
    y = sorted_desc_logits.detach().float()
    n = y.shape[-1]
    lo, hi = kneedle_bounds(k_min, k_max, n)
    if n < 3:  # fewer than three points have no interior knee
        return torch.full(y.shape[:-1], hi, dtype=torch.long, device=y.device)
    top, bottom = y[..., :1], y[..., -1:]
    span = top - bottom
    y_norm = (y - bottom) / span.clamp_min(torch.finfo(torch.float32).tiny)
    x = torch.linspace(0.0, 1.0, n, device=y.device)
    gap, knee = ((1.0 - x) - y_norm).max(dim=-1)
    k = (knee + 1).clamp_(lo, hi)
    no_knee = (span.squeeze(-1) <= 0) | (gap <= 1e-6)
    return k.masked_fill_(no_knee, hi)


class _PairwiseDiffKL(torch.autograd.Function):
    """Per-row KL(softmax(d(a)) || softmax(d(b))) over pairwise differences of k-vectors.

    For a row x of K values and its own k <= K, d(x) is the flattened K x K matrix
    x_i - x_j restricted to i < j < k (the upper triangle of the top-k block); other entries are
    excluded from the softmax. Gradients are computed in the forward pass, chunk by chunk, and
    only the (N, K) results are kept: dL/dx_i = sum_j G_ij - sum_j G_ji for G = dL/dd. The
    (c, K, K) work buffers are allocated once per call: fresh allocations in the loop cost more
    than the arithmetic on small chunks (page faults, allocator trimming).
    """

    @staticmethod
    def forward(ctx, a, b, k_rows, chunk, need_a, need_b):
        n, kk = a.shape
        c = min(chunk, n)
        idx = torch.arange(kk, device=a.device)
        lower = idx[:, None] >= idx[None, :]  # i >= j: never a pair
        da, pa, db, pb = (a.new_empty(c, kk, kk) for _ in range(4))
        invalid = torch.empty(c, kk, kk, dtype=torch.bool, device=a.device)
        out = a.new_empty(n)
        grads = [torch.empty_like(a) if need_a else None, torch.empty_like(b) if need_b else None]
        for start in range(0, n, chunk):
            sl, m = slice(start, start + chunk), min(chunk, n - start)
            torch.ge(idx.expand(kk, kk), k_rows[sl, None, None], out=invalid[:m])  # j >= k
            inv = invalid[:m].logical_or_(lower).view(m, -1)
            torch.sub(a[sl, :, None], a[sl, None, :], out=da[:m])
            torch.sub(b[sl, :, None], b[sl, None, :], out=db[:m])
            flat = (t[:m].view(m, -1) for t in (da, pa, db, pb))
            out[sl], *gs = kl_and_grads_(*flat, inv, need_a, need_b)
            for buf, g in zip(grads, gs):
                if buf is not None:
                    g = g.view(m, kk, kk)
                    torch.sub(g.sum(2), g.sum(1), out=buf[sl])
        ctx.save_for_backward(*grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ga, gb = ctx.saved_tensors
        g = grad_out[:, None]
        return (
            ga * g if ga is not None else None,
            gb * g if gb is not None else None,
            None, None, None, None,
        )  # fmt: skip


KFn = Callable[[Tensor], Tensor]  # sorted top-n values (c, n) -> k per row (c,)


def _topk_pair_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    *,
    n_select: int,
    k_fn: KFn,
    temperature: float,
    reverse: bool,
    chunk_size: int,
    bounds: Callable[[int], tuple[int, int]] | None = None,
) -> LossOutput:
    """Teacher-led + student-led pairwise-difference KL shared by BiLD and DBiLD.

    ``bounds``: n_select -> the (lo, hi) clamp of ``k_fn``; the shares of k at each are
    reported (DBiLD).
    """
    check_logits(student, teacher, mask, temperature, chunk_size)
    rows = supervised_rows(mask)
    if rows.numel() == 0:
        return zero_output(student, teacher)
    v = student.shape[-1]
    if v < 2:
        raise ValueError(f"top-k pair losses need a vocabulary of at least 2, got V={v}")
    n_select = min(n_select, v)
    idx_t, idx_s, k_t, k_s = _select(student, teacher, rows, n_select, k_fn, chunk_size)
    kk = idx_t.shape[1]

    # One indexing op per input: its backward is a single zeros + scatter into the gathered
    # entries. Indexing the original tensor (not a reshaped view) lets autograd adopt that
    # buffer as .grad without copying it.
    pos = torch.unravel_index(rows, student.shape[:-1])
    cols = torch.cat([idx_t, idx_s], dim=1)
    index = (*(p[:, None] for p in pos), cols)
    vs = student[index].float() / temperature
    vt = teacher[index].float() / temperature

    parts = {}
    sides = (("teacher_led", slice(0, kk), k_t), ("student_led", slice(kk, None), k_s))
    for name, sl, k_rows in sides:
        xs, xt = vs[:, sl], vt[:, sl]
        a, b = (xs, xt) if reverse else (xt, xs)  # KL(a || b)
        need_a, need_b = (needs_grad(a), needs_grad(b))
        parts[name] = _PairwiseDiffKL.apply(a, b, k_rows, int(chunk_size), need_a, need_b)
    n = rows.numel()
    loss = (parts["teacher_led"].sum() + parts["student_led"].sum()) / n
    shares = {}
    if bounds is not None:
        lo, hi = bounds(n_select)
        both = torch.cat([k_t, k_s])
        shares = {"k_at_min": (both == lo).float().mean(), "k_at_max": (both == hi).float().mean()}
    return LossOutput(
        loss=loss,
        n_tokens=n,
        k_t=k_t.float().mean(),
        k_s=k_s.float().mean(),
        parts={name: p.detach().mean() for name, p in parts.items()},
        **shares,
    )


@torch.no_grad()
def _select(student, teacher, rows, n_select, k_fn, chunk) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-``n_select`` indices of each side, cut to K = max k, and each row's k."""
    v = student.shape[-1]
    s2, t2 = student.reshape(-1, v), teacher.reshape(-1, v)
    out: list[list[Tensor]] = [[], [], [], []]
    bufs: list[Tensor | None] = [None, None]  # for non-consecutive rows; else views
    for r, sl in row_chunks(rows, chunk):
        for i, x2 in enumerate((t2, s2)):
            if sl is not None:
                x = x2[sl]
            else:
                if bufs[i] is None:
                    bufs[i] = x2.new_empty(min(chunk, rows.numel()), v)
                x = torch.index_select(x2, 0, r, out=bufs[i][: r.numel()])
            values, indices = torch.topk(x, n_select, dim=-1, sorted=True)
            out[i].append(indices)
            out[2 + i].append(k_fn(values))
    idx_t, idx_s, k_t, k_s = (torch.cat(x) for x in out)
    kk = int(torch.maximum(k_t.max(), k_s.max()))
    return idx_t[:, :kk], idx_s[:, :kk], k_t, k_s


def bild(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int = BILD_K,
    temperature: float = RECIPE.temperature,
    direction: str = "forward",
    chunk_size: int = DEFAULT_CHUNK,
) -> LossOutput:
    """Bi-directional Logits Difference loss (Li et al., COLING 2025, arXiv 2406.13555).

    Per supervised position, for the teacher-led index set I_t = top-k(z_t) and the student-led
    set I_s = top-k(z_s) (each in its leader's descending order, no grad through the choice):
    x = z[I] / T for both models, d_ij = x_i - x_j for i < j (k(k-1)/2 values), q = softmax(d),
    and ``L_I = KL(q_t || q_s)`` (``direction="forward"``, as published) or
    ``KL(q_s || q_t)`` (``"reverse"``). ``loss = mean_n (L_{I_t} + L_{I_s})``; no T^2 factor.
    Reference code: github.com/fpcsong/BiLD, ``distil_losses/BILD.py``.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        mask: (...) bool or 0/1, true at supervised positions.
        k: top-k size (clipped to V), >= 2.
        temperature: T > 0.
        direction: "forward" (KL(teacher || student)) or "reverse".
        chunk_size: supervised positions per chunk of the top-k search and pairwise softmax.

    Returns:
        LossOutput with the loss, ``n_tokens``, ``k_t = k_s = k`` and the two led parts.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to form a pair, got {k}")
    k_eff = min(k, student_logits.shape[-1])
    return _topk_pair_loss(
        student_logits, teacher_logits, mask,
        n_select=k_eff,
        k_fn=lambda values: torch.full(values.shape[:-1], k_eff, device=values.device),
        temperature=temperature, reverse=direction == "reverse", chunk_size=chunk_size,
    )  # fmt: skip


def dbild(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = RECIPE.temperature,
    top_n: int = RECIPE.top_n,
    k_min: int = RECIPE.k_min,
    k_max: int = RECIPE.k_max,
    chunk_size: int = DEFAULT_CHUNK,
) -> LossOutput:
    """Dynamic Bi-directional Logits Difference loss (Switch-KD, arXiv 2604.14629).

    BiLD with two changes (Switch-KD spec, SWITCH_KD.md, section "DBiLD"):

    1. k per position and per side from :func:`kneedle_k` on that side's top-``top_n`` sorted
       logits: k_t from the teacher's curve (teacher-led set), k_s from the student's.
    2. Reverse KL in both parts: ``L_t = KL(q_s || q_t)`` on the teacher-led top-k_t set and
       ``L_s = KL(q_s || q_t)`` on the student-led top-k_s set, q = softmax over the
       k(k-1)/2 pairwise differences (z_i - z_j) / T, i < j, in the leader's order.

    ``loss = mean_n (L_t + L_s)``; no T^2 factor (the objective applies it, see
    :mod:`edgekd.distill.objective`). With k_min == k_max == k this equals
    ``bild(..., k=k, direction="reverse")``. k_min = 2 is allowed here but degenerate: a
    position at k = 2 has one pairwise difference, whose softmax is 1, so its term is exactly 0
    (recipes require k_min >= 3). Options the paper leaves open are marked [U] and
    default to the values in SWITCH_KD.md.

    Args:
        student_logits: (..., V) student (or visual-switch) logits.
        teacher_logits: (..., V) teacher logits.
        mask: (...) bool or 0/1, true at supervised positions.
        temperature: [U] T > 0, default 3.0 as in BiLD.
        top_n: [U] Kneedle search window, the top-N logits of each side (clipped to V).
        k_min: [U] smallest k, >= 2 (3 or more to be useful).
        k_max: [U] largest k (clipped to top_n); rows without a knee use it.
        chunk_size: supervised positions per chunk of the top-k search and pairwise softmax.

    Returns:
        LossOutput with the loss, ``n_tokens``, mean ``k_t`` / ``k_s``, the two led parts and
        the shares of k at the clamp's bounds (``k_at_min``, ``k_at_max``).
    """
    if not 2 <= k_min <= k_max:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if top_n < 2:
        raise ValueError(f"top_n must be >= 2, got {top_n}")
    return _topk_pair_loss(
        student_logits, teacher_logits, mask,
        n_select=top_n,
        k_fn=lambda values: kneedle_k(values, k_min, k_max),
        temperature=temperature, reverse=True, chunk_size=chunk_size,
        bounds=lambda n: kneedle_bounds(k_min, k_max, n),
    )  # fmt: skip


def kneedle_bounds(k_min: int, k_max: int, n: int) -> tuple[int, int]:
    """The clamp of :func:`kneedle_k` over ``n`` candidates: ``(min(k_min, hi), hi)``,
    ``hi = min(k_max, n)``."""
    hi = min(k_max, n)
    return min(k_min, hi), hi
