"""Logit-distillation losses: full-vocabulary KL, BiLD and DBiLD (Switch-KD).

Each loss is a pure function ``(student_logits, teacher_logits, mask, *, ...) -> LossOutput``
with logits ``(..., V)`` (e.g. ``(B, L, V)``, any float dtype) and ``mask`` ``(...)`` bool or
0/1, true at supervised positions. The math runs in float32; the loss is the float32 mean over
supervised positions; an all-masked batch gives 0, still attached to the graph (zero
gradients). Gradients reach both inputs when they require grad (the teacher usually does not).

Memory: at V = 151,936 one fp32 copy of (2048, V) logits is 1.2 GB. Supervised rows are
processed in chunks of ``chunk_size`` and the gradient goes straight into one dense buffer the
size of the logits (autograd needs a dense ``.grad``; no other full-size copy is made). The full
KL computes its gradient in the same chunked pass as the loss (``_FullVocabKL``) instead of
letting autograd keep every chunk's ``log_softmax``; the top-k losses choose indices without
grad, gather O(k) values per row with one indexing op (its backward scatters into those entries
only) and keep only (N, k) gradients of the pairwise softmax (``_PairwiseDiffKL``).

This module is the losses' public face and holds the full-vocabulary KL; the top-k losses live
in :mod:`edgekd.distill.losses_topk`, what both share in :mod:`edgekd.distill.losses_common`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgekd.distill.losses_common import (
    BILD_K,
    DEFAULT_CHUNK,
    LossFn,
    LossOutput,
    check_logits,
    kl_and_grads_,
    needs_grad,
    row_chunks,
    supervised_rows,
    zero_output,
)
from edgekd.distill.losses_topk import bild, dbild, kneedle_bounds, kneedle_k

__all__ = [
    "BILD_K", "DEFAULT_CHUNK", "LOSSES", "LossOutput", "bild", "dbild", "forward_kl",
    "kneedle_bounds", "kneedle_k", "reverse_kl",
]  # fmt: skip


def _load(dst: Tensor, src: Tensor, r: Tensor, sl: slice | None) -> Tensor:
    """Copy rows ``r`` of ``src`` (M, V) into ``dst`` (len(r), V), converting the dtype."""
    if sl is not None:
        return dst.copy_(src[sl])
    if src.dtype == dst.dtype:
        return torch.index_select(src, 0, r, out=dst)
    return dst.copy_(src.index_select(0, r))


# --------------------------------------------------------------------------------------------
# full-vocabulary KL


class _FullVocabKL(torch.autograd.Function):
    """Mean over ``rows`` of KL at temperature T, gradient computed in the forward pass.

    The softmaxes the loss needs are the gradient's too, so one chunked pass yields both and
    nothing (c, V)-sized is kept for backward. Four (c, V) fp32 buffers are reused across chunks
    (fresh large allocations pay page faults every time). The dense gradient buffer is filled
    chunk by chunk; backward hands it to autograd without a copy, so a second backward through
    the same graph is refused rather than returning a scaled buffer.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, reverse, chunk, need_s, need_t):
        v = student.shape[-1]
        s2, t2 = student.reshape(-1, v), teacher.reshape(-1, v)
        n = rows.numel()
        scale = 1.0 / (temperature * n)  # d(z/T)/dz and the mean over rows
        grads = [
            _grad_buffer(x, rows) if need else None for x, need in ((s2, need_s), (t2, need_t))
        ]
        c = min(chunk, n)
        ls, ps, lt, pt = (s2.new_empty(c, v, dtype=torch.float32) for _ in range(4))
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for r, sl in row_chunks(rows, chunk):
            m = r.numel()
            zs, zt = _load(ls[:m], s2, r, sl), _load(lt[:m], t2, r, sl)
            if temperature != 1.0:
                zs.div_(temperature)
                zt.div_(temperature)
            if reverse:  # KL(p_s || p_t)
                kl, gs, gt = kl_and_grads_(zs, ps[:m], zt, pt[:m], None, need_s, need_t)
            else:  # KL(p_t || p_s)
                kl, gt, gs = kl_and_grads_(zt, pt[:m], zs, ps[:m], None, need_t, need_s)
            for buf, g in zip(grads, (gs, gt)):
                if buf is None:
                    continue
                g.mul_(scale)
                if sl is not None:
                    buf[sl].copy_(g)
                else:
                    buf.index_copy_(0, r, g.to(buf.dtype))
            total += kl.sum()
        ctx.grads = [g.view(student.shape) if g is not None else None for g in grads]
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("full-vocabulary KL allows one backward; recompute the loss")
        ctx.grads = None  # drop our reference so autograd can take the buffer without a copy
        if bool(grad_out != 1):
            grads = [g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads]
        return grads[0], grads[1], None, None, None, None, None, None


def _grad_buffer(x2: Tensor, rows: Tensor) -> Tensor:
    # empty + zeroing only the unsupervised rows: when every row is supervised (the common
    # case) this skips a full memset of the logits-sized buffer.
    buf = torch.empty_like(x2)
    if rows.numel() < x2.shape[0]:
        keep = torch.ones(x2.shape[0], dtype=torch.bool, device=x2.device)
        keep[rows] = False
        buf[keep] = 0
    return buf


def _full_vocab_kl(student, teacher, mask, temperature, chunk_size, reverse) -> LossOutput:
    check_logits(student, teacher, mask, temperature, chunk_size)
    rows = supervised_rows(mask)
    if rows.numel() == 0:
        return zero_output(student, teacher)
    loss = _FullVocabKL.apply(
        student, teacher, rows, float(temperature), reverse, int(chunk_size),
        needs_grad(student), needs_grad(teacher),
    )  # fmt: skip
    return LossOutput(loss=loss, n_tokens=rows.numel())


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> LossOutput:
    """Forward KL over the full vocabulary (Hinton et al. 2015; torchtune ``ForwardKLLoss``).

    ``loss = mean_{supervised n} sum_v p_t(v) (log p_t(v) - log p_s(v))`` with
    ``p = softmax(z / T)`` over all V entries. No T^2 factor (multiply outside if wanted).

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        mask: (...) bool or 0/1, true at supervised positions.
        temperature: softmax temperature T > 0.
        chunk_size: supervised positions per chunk; bounds the fp32 temporaries to a few
            (chunk_size, V) tensors.

    Returns:
        LossOutput with the float32 loss and ``n_tokens``.
    """
    return _full_vocab_kl(student_logits, teacher_logits, mask, temperature, chunk_size, False)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> LossOutput:
    """Reverse KL over the full vocabulary (as in MiniLLM / GKD): ``KL(p_s || p_t)``.

    ``loss = mean_{supervised n} sum_v p_s(v) (log p_s(v) - log p_t(v))``, ``p = softmax(z/T)``.
    Arguments and return value as in :func:`forward_kl`.
    """
    return _full_vocab_kl(student_logits, teacher_logits, mask, temperature, chunk_size, True)


LOSSES: dict[str, LossFn] = {"kd": forward_kl, "rkl": reverse_kl, "bild": bild, "dbild": dbild}
