"""Logit distillation losses: forward KL, reverse KL and a generalised Jensen-Shannon divergence.

Every divergence is computed in fp32 from ``log_softmax`` of temperature-scaled logits, averaged over the
tokens whose label is not ``ignore_index`` and multiplied by ``T**2`` (so gradient magnitudes do not shrink
as the temperature grows). The teacher never receives gradient.

``fused_linear_kd_loss`` takes the models' last hidden states and heads instead of logits and computes the
logits a chunk of tokens at a time, so no ``[tokens, V]`` logits exist for either model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from trainer.config import DistillConfig
    from trainer.distill.placement import TeacherOutput

KINDS = ("forward_kl", "reverse_kl", "jsd")

# div(student_rows, teacher_rows, index_rows_or_None) -> summed divergence of those rows (fp32 scalar).
Divergence = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _check_args(kind: str, temperature: float, beta: float, chunk_size: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Row-wise KL(p || q) from log-probabilities over the last dim."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def token_divergence(student: Tensor, teacher: Tensor, kind: str, temperature: float, beta: float) -> Tensor:
    """Per-token divergence of logits ``[..., V]`` in fp32 (not scaled by ``T**2``, not reduced)."""
    logp_s = F.log_softmax(student.float() / temperature, dim=-1)
    logp_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return _kl(logp_t, logp_s)
    if kind == "reverse_kl":
        return _kl(logp_s, logp_t)
    # log m = log(beta * p_t + (1 - beta) * p_s); log(0) = -inf keeps beta in {0, 1} finite.
    log_m = torch.logaddexp(logp_t + _log(beta), logp_s + _log(1.0 - beta))
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


# The tail bucket's logit where the tail holds no mass in fp32 (finite, so that 0 * log 0 terms stay 0).
TAIL_FLOOR = -1e30


def teacher_buckets(values: Tensor, lse: Tensor, temperature: float) -> Tensor:
    """The teacher's top-k logits ``[..., k]`` and one tail bucket: ``[..., k + 1]`` logits whose softmax at
    ``temperature`` is the top-k probabilities and the rest of the mass (``lse``: ``logsumexp(logits / T)`` of the
    whole row)."""
    values, lse = values.detach().float(), lse.detach().float().unsqueeze(-1)
    top = torch.logsumexp(values / temperature, dim=-1, keepdim=True)
    rest = lse + torch.log(-torch.expm1((top - lse).clamp_max(0.0)))  # log(sum of exp(logits / T) off the top-k)
    return torch.cat([values, (temperature * rest).clamp_min(TAIL_FLOOR)], dim=-1)


def student_buckets(student: Tensor, indices: Tensor, temperature: float, tail: bool) -> Tensor:
    """The student's logits at the teacher's top-k ``indices``, and with ``tail`` one bucket holding the rest of
    its probability mass at ``temperature`` (``[..., k]`` or ``[..., k + 1]``)."""
    picked = student.gather(-1, indices)
    if not tail:
        return picked
    rest = student.float().scatter(-1, indices, -math.inf)
    bucket = temperature * torch.logsumexp(rest / temperature, dim=-1, keepdim=True)
    return torch.cat([picked.float(), bucket.clamp_min(TAIL_FLOOR)], dim=-1)


def _summed_divergence(
    student: Tensor,
    teacher: Tensor,
    indices: Tensor | None,
    *,
    kind: str,
    temperature: float,
    beta: float,
    tail: bool = False,
) -> Tensor:
    if indices is not None:
        student = student_buckets(student, indices, temperature, tail)
    return token_divergence(student, teacher, kind, temperature, beta).sum()


@overload
def _rows(x: Tensor, rows: slice, keep: Tensor | None) -> Tensor: ...
@overload
def _rows(x: Tensor | None, rows: slice, keep: Tensor | None) -> Tensor | None: ...
def _rows(x: Tensor | None, rows: slice, keep: Tensor | None) -> Tensor | None:
    if x is None:
        return None
    x = x[rows]
    return x if keep is None else x[keep]


def _chunked_sum(
    student: Tensor,
    teacher: Tensor,
    indices: Tensor | None,
    keep: Tensor | None,
    div: Divergence,
    chunk_size: int,
    grad: Tensor | None = None,
) -> Tensor:
    """Sum ``div`` over row chunks; when ``grad`` is given, also write d(sum)/d(student) into it."""
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for start in range(0, student.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        sel = None if keep is None else keep[rows]
        s, t, idx = _rows(student, rows, sel), _rows(teacher, rows, sel), _rows(indices, rows, sel)
        if grad is None:
            total += div(s, t, idx)
            continue
        with torch.enable_grad():
            s = s.detach().requires_grad_()
            loss = div(s, t, idx)
        (g,) = torch.autograd.grad(loss, s)
        if sel is None:
            grad[rows] = g
        else:
            grad[rows][sel] = g
        total += loss.detach()
    return total


class _ChunkedDivergence(torch.autograd.Function):
    """Chunked sum whose student gradient is computed chunk by chunk during forward.

    Only one chunk's fp32 intermediates are alive at a time, in forward and backward alike; the saved
    state is a single gradient buffer shaped (and typed) like the student logits.
    """

    @staticmethod
    def forward(ctx, student, teacher, indices, keep, div, chunk_size):
        grad = torch.zeros_like(student)
        total = _chunked_sum(student, teacher, indices, keep, div, chunk_size, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def kd_loss_topk(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    teacher_lse: Tensor | None = None,
) -> Tensor:
    """Distillation loss against a precomputed teacher top-k (e.g. read from a logit cache).

    Args:
        student_logits: ``[..., V]`` student logits.
        teacher_values: ``[..., k]`` teacher logits at ``teacher_indices``.
        teacher_indices: ``[..., k]`` vocabulary indices of those logits (integer).
        kind, temperature, beta, labels, ignore_index, chunk_size: as in :func:`kd_loss`.
        teacher_lse: ``[...]`` ``logsumexp(teacher_logits / T)`` of the teacher's whole rows: adds the tail
            bucket (the rest of the probability mass) to both distributions (``k < V``).

    Returns:
        fp32 scalar: ``T**2`` times the mean over kept tokens of the divergence between
        ``softmax(teacher_values / T)`` and ``softmax(student_logits[teacher_indices] / T)`` (each with its tail).
    """
    if teacher_values.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher values {tuple(teacher_values.shape)} and indices {tuple(teacher_indices.shape)} differ in shape"
        )
    if teacher_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(teacher_values.shape)} does not match student logits "
            f"{tuple(student_logits.shape)} outside the last dim"
        )
    tail = teacher_lse is not None
    if teacher_lse is not None:
        _check_tail(teacher_values.shape[-1], student_logits.shape[-1])
        teacher_values = teacher_buckets(teacher_values, teacher_lse, temperature)
    return _kd(
        student_logits,
        teacher_values,
        teacher_indices.long(),
        kind,
        temperature,
        beta,
        labels,
        ignore_index,
        chunk_size,
        tail,
    )


def _check_tail(k: int, vocab: int) -> None:
    if k >= vocab:
        raise ValueError(f"the top-k tail needs k < the vocabulary ({vocab}), got k={k}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    top_k: int | None = None,
    top_k_tail: bool = False,
) -> Tensor:
    """Distillation loss between student and teacher logits.

    With ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)`` over the last dim:

    - ``forward_kl``: KL(p_t || p_s)
    - ``reverse_kl``: KL(p_s || p_t)
    - ``jsd``: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), with m = beta * p_t + (1 - beta) * p_s

    ``top_k=k`` restricts both distributions to the teacher's top-k vocabulary indices ``idx`` and
    renormalises them there (the tail is dropped on both sides): ``p_t = softmax(teacher[idx] / T)``,
    ``p_s = softmax(student[idx] / T)``, then the same divergence. ``top_k = V`` is the full loss. With
    ``top_k_tail`` both distributions keep a (k+1)-th bucket holding the rest of their mass at ``T`` instead.

    Args:
        student_logits: ``[..., V]`` logits (any float dtype; computed in fp32).
        teacher_logits: ``[..., V]`` logits; detached.
        kind: one of ``forward_kl``, ``reverse_kl``, ``jsd``.
        temperature: softmax temperature ``T > 0``; the loss is multiplied by ``T**2``.
        beta: mixture weight of the teacher in ``jsd`` (in ``[0, 1]``).
        labels: ``[...]`` targets; tokens equal to ``ignore_index`` are excluded. None keeps all tokens.
        ignore_index: label value of ignored tokens.
        chunk_size: tokens per chunk; bounds the fp32 working set to ``chunk_size x V`` in forward and
            backward. Same value and gradient as unchunked (no double backward).
        top_k: restrict to the teacher's top-k logits (see above).
        top_k_tail: with ``top_k``, add the tail bucket (see above).

    Returns:
        fp32 scalar: ``T**2`` times the mean divergence over kept tokens (0 if none are kept).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if top_k is None:
        return _kd(student_logits, teacher_logits, None, kind, temperature, beta, labels, ignore_index, chunk_size)
    vocab = student_logits.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
    values, indices = teacher_logits.detach().topk(top_k, dim=-1)
    lse = torch.logsumexp(teacher_logits.detach().float() / temperature, dim=-1) if top_k_tail else None
    return kd_loss_topk(
        student_logits,
        values,
        indices,
        kind=kind,
        temperature=temperature,
        beta=beta,
        labels=labels,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        teacher_lse=lse,
    )


def _kd(
    student: Tensor,
    teacher: Tensor,
    indices: Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    labels: Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
    tail: bool = False,
) -> Tensor:
    _check_args(kind, temperature, beta, chunk_size)
    if labels is not None and labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match logits {tuple(student.shape)} without the last dim"
        )
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.detach().reshape(-1, teacher.shape[-1])
    if indices is not None:
        indices = indices.reshape(-1, indices.shape[-1])
    keep = None if labels is None else labels.reshape(-1) != ignore_index
    count = max(student.shape[0], 1) if keep is None else keep.sum().clamp_min(1)
    div = partial(_summed_divergence, kind=kind, temperature=temperature, beta=beta, tail=tail)

    if chunk_size is None:
        everything = slice(None)
        total = div(
            _rows(student, everything, keep), _rows(teacher, everything, keep), _rows(indices, everything, keep)
        )
    elif torch.is_grad_enabled() and student.requires_grad:
        total = _ChunkedDivergence.apply(student, teacher, indices, keep, div, chunk_size)
    else:
        total = _chunked_sum(student, teacher, indices, keep, div, chunk_size)
    return total * (temperature**2) / count


@dataclass(frozen=True)
class TeacherSide:
    """The teacher of a fused loss, read a chunk of tokens at a time: its last hidden state ``[N, H]`` and head
    (logits computed per chunk), its full logits ``[N, V]`` (a remote or sharded teacher), or its top-k raw logits and
    indices ``[N, k]`` (a cache) with, for the tail, ``logsumexp(logits / T)`` of its whole rows ``[N]``."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk: tuple[Tensor, Tensor] | None = None
    lse: Tensor | None = None

    @property
    def vocab(self) -> int | None:
        """The teacher's (real) vocabulary: the student's logits past it are padding; None for a top-k teacher."""
        if self.weight is not None:
            return self.weight.shape[0]
        return None if self.logits is None else self.logits.shape[-1]

    def flat(self) -> TeacherSide:
        """The same teacher with its tokens flattened to one leading dim."""

        def flat(x: Tensor, dims: int) -> Tensor:
            return x.detach().reshape(-1, *x.shape[x.dim() - dims :])

        def maybe(x: Tensor | None, dims: int) -> Tensor | None:
            return None if x is None else flat(x, dims)

        topk = None if self.topk is None else (flat(self.topk[0], 1), flat(self.topk[1], 1))
        return TeacherSide(
            maybe(self.hidden, 1), self.weight, self.bias, maybe(self.logits, 1), topk, maybe(self.lse, 0)
        )

    @torch.no_grad()
    def rows(self, index: Tensor, top_k: int | None, tail: bool, temperature: float) -> tuple[Tensor, Tensor | None]:
        """Rows ``index``: the teacher's logits (or top-k buckets, with the tail bucket when ``tail``) and the
        vocabulary indices of the top-k (None for full logits)."""
        if self.topk is not None:
            values, indices = (t.index_select(0, index) for t in self.topk)
            if not tail:
                return values, indices.long()
            assert self.lse is not None  # a cached teacher's tail needs its logsumexp
            return teacher_buckets(values, self.lse.index_select(0, index), temperature), indices.long()
        if self.hidden is not None:
            assert self.weight is not None  # a teacher's head has a weight
            logits = F.linear(self.hidden.index_select(0, index), self.weight, self.bias)
        else:
            assert self.logits is not None  # a teacher side has a head, logits or a top-k
            logits = self.logits.index_select(0, index)
        if top_k is None:
            return logits, None
        values, indices = logits.topk(top_k, dim=-1)
        if not tail:
            return values, indices
        return teacher_buckets(values, torch.logsumexp(logits.float() / temperature, dim=-1), temperature), indices


@dataclass(frozen=True)
class FusedSettings:
    """What a fused loss computes: the KD kind and its settings, the CE weight ``1 - alpha``, the tokens per chunk."""

    kind: str
    temperature: float
    beta: float
    alpha: float
    top_k: int | None
    tail: bool
    chunk_size: int


def _fused_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    kept: Tensor,
    teacher: TeacherSide,
    how: FusedSettings,
    with_grads: bool,
) -> tuple[Tensor, Tensor, list[Tensor | None] | None]:
    """The KD and CE means over the ``kept`` rows, a chunk of them at a time; with ``with_grads`` also the gradients
    of ``alpha * T**2 * KD + (1 - alpha) * CE`` (both averaged over the kept rows) for hidden, weight and bias: each
    chunk's logits gradient is multiplied into them at once (the weight's and bias's accumulated in fp32 in place)."""
    count = max(kept.numel(), 1)
    kd_scale, ce_scale = how.alpha * how.temperature**2 / count, (1.0 - how.alpha) / count
    vocab = teacher.vocab or weight.shape[0]
    kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    ce_sum = torch.zeros_like(kd_sum)
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    grads: list[Tensor | None] | None = None
    if with_grads:
        grads = [
            torch.zeros_like(hidden),
            torch.zeros_like(weight, dtype=torch.float32),
            None if bias is None else torch.zeros_like(bias, dtype=torch.float32),
        ]
    for start in range(0, kept.numel(), how.chunk_size):
        index = kept[start : start + how.chunk_size]
        t_rows, t_indices = teacher.rows(index, how.top_k, how.tail, how.temperature)
        h = hidden.detach().index_select(0, index)
        logits = F.linear(h, weight, bias).requires_grad_(with_grads)
        with torch.enable_grad():
            kd = _summed_divergence(
                logits[:, :vocab],
                t_rows,
                t_indices,
                kind=how.kind,
                temperature=how.temperature,
                beta=how.beta,
                tail=how.tail,
            )
            ce = torch.zeros_like(kd)
            if labels is not None:
                ce = F.cross_entropy(logits.float(), labels.index_select(0, index), reduction="sum")
            loss = kd_scale * kd + (ce_scale * ce if ce_scale else 0.0)
        kd_sum += kd.detach()
        ce_sum += ce.detach()
        if grads is not None:
            (grad_logits,) = torch.autograd.grad(loss, logits)
            grad_hidden, grad_weight, grad_bias = grads
            assert grad_hidden is not None and grad_weight is not None  # made above
            grad_hidden.index_copy_(0, index, (grad_logits @ weight).to(grad_hidden.dtype))
            grad_weight.addmm_(grad_logits.t().float(), h.float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.float().sum(0))
    return kd_sum * how.temperature**2 / count, ce_sum / count, grads


class _FusedLinearKD(torch.autograd.Function):
    """(alpha * KD + (1 - alpha) * CE, KD, CE) of a head's logits computed a chunk of tokens at a time; the
    gradients for hidden, weight and bias are computed chunk by chunk during forward, kept, and scaled in place by
    backward, which hands them over (so backward runs once: a second backward through it raises)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, kept, teacher, how):
        kd, ce, grads = _fused_pass(hidden, weight, bias, labels, kept, teacher, how, with_grads=True)
        assert grads is not None
        ctx.grads = [None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias))]
        ctx.mark_non_differentiable(kd, ce)
        return how.alpha * kd + (1.0 - how.alpha) * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads, ctx.grads = ctx.grads, None  # not kept: the parameters' .grad may take these tensors as they are
        if grads is None:
            raise RuntimeError("the fused KD loss's backward ran twice (its gradients are handed over once)")
        return *(None if g is None else g.mul_(grad_loss) for g in grads), None, None, None, None


def fused_kd_terms(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherSide,
    how: FusedSettings,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha * KD + (1 - alpha) * CE, KD, CE)`` of the student's head on ``hidden`` ``[..., H]`` against
    ``teacher``; only the first carries gradient (to hidden, weight and bias). CE is 0 without ``labels``."""
    _check_args(how.kind, how.temperature, how.beta, how.chunk_size)
    if labels is not None and labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)} without the last dim"
        )
    if labels is None and how.alpha < 1:
        raise ValueError("the cross-entropy part (alpha < 1) needs labels")
    k = how.top_k if teacher.topk is None else teacher.topk[0].shape[-1]
    if how.tail:
        if k is None:
            raise ValueError("the top-k tail needs top_k")
        _check_tail(k, teacher.vocab or weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    rows = torch.arange(flat_hidden.shape[0], device=hidden.device)
    kept = rows if flat_labels is None else rows[flat_labels != ignore_index]
    flat_teacher = teacher.flat()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedLinearKD.apply(flat_hidden, weight, bias, flat_labels, kept, flat_teacher, how)
    kd, ce, _ = _fused_pass(flat_hidden, weight, bias, flat_labels, kept, flat_teacher, how, with_grads=False)
    return how.alpha * kd + (1.0 - how.alpha) * ce, kd, ce


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    alpha: float = 1.0,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    top_k: int | None = None,
    top_k_tail: bool = False,
) -> Tensor:
    """:func:`kd_loss` of the logits ``hidden @ weight.T + bias`` of both models, never holding logits for more than
    ``chunk_size`` tokens at a time (forward and backward: the gradients for the student's hidden states, head
    weight and bias are computed chunk by chunk). ``alpha < 1`` adds the cross-entropy of the student's logits with
    ``labels``: ``alpha * KD + (1 - alpha) * CE``, both averaged over the tokens whose label is not ``ignore_index``.

    Args:
        student_hidden: ``[..., H_s]`` the student's last hidden states (the head's input).
        student_head_weight: ``[V_s, H_s]`` (may be the tied embedding: its gradient adds to the embedding's).
        teacher_hidden: ``[..., H_t]`` the teacher's last hidden states (no gradient).
        teacher_head_weight: ``[V_t, H_t]``; the student's logits past ``V_t`` (padding) are left out of the KD.
        kind, temperature, beta, labels, ignore_index, top_k, top_k_tail: as in :func:`kd_loss`.
        chunk_size: tokens whose logits are computed at once.
        alpha: weight of the KD term (1: the KD term alone, as :func:`kd_loss` returns it).
        student_head_bias, teacher_head_bias: ``[V]`` head biases, if any.

    Returns:
        fp32 scalar.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} differ outside the last dim"
        )
    teacher = TeacherSide(hidden=teacher_hidden, weight=teacher_head_weight, bias=teacher_head_bias)
    how = FusedSettings(kind, temperature, beta, alpha, top_k, top_k_tail, chunk_size)
    loss, _, _ = fused_kd_terms(
        student_hidden, student_head_weight, student_head_bias, teacher, how, labels, ignore_index
    )
    return loss


class KDLoss(nn.Module):
    """Module wrapper of :func:`kd_loss` with fixed settings.

    Args:
        kind: one of ``forward_kl``, ``reverse_kl``, ``jsd``.
        temperature: softmax temperature ``T > 0``.
        beta: teacher weight of the ``jsd`` mixture, in ``[0, 1]``.
        ignore_index: label value of tokens excluded from the mean.
        chunk_size: tokens per chunk, or None for one pass.
        top_k: restrict to the teacher's top-k logits, or None for the full vocabulary.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        top_k: int | None = None,
    ):
        super().__init__()
        _check_args(kind, temperature, beta, chunk_size)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.kind, self.temperature, self.beta = kind, temperature, beta
        self.ignore_index, self.chunk_size, self.top_k = ignore_index, chunk_size, top_k

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``[..., V]`` student logits.
            teacher_logits: ``[..., V]`` teacher logits (detached).
            labels: optional ``[...]`` targets; ``ignore_index`` tokens are excluded.

        Returns:
            fp32 scalar loss.
        """
        return kd_loss(
            student_logits,
            teacher_logits,
            kind=self.kind,
            temperature=self.temperature,
            beta=self.beta,
            labels=labels,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            top_k=self.top_k,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, temperature={self.temperature}, beta={self.beta}, "
            f"chunk_size={self.chunk_size}, top_k={self.top_k}"
        )


def logit_losses(logits: Tensor, y: Tensor, teacher: TeacherOutput | None, d: DistillConfig) -> dict[str, Tensor]:
    """``train/ce``, ``distill/kd`` (with a KD loss) and ``train/loss`` = (1 - alpha) * CE + alpha * KD of a batch."""
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    out = {"train/ce": ce, "train/loss": (1 - d.alpha) * ce}
    if d.loss != "none":
        assert teacher is not None  # preflight: a KD loss has a teacher
        options: dict[str, Any] = dict(
            kind=d.loss, temperature=d.temperature, beta=d.beta, labels=y, chunk_size=d.chunk_size
        )
        if teacher.topk is not None:
            kd = kd_loss_topk(logits, *teacher.topk, teacher_lse=teacher.lse if d.top_k_tail else None, **options)
        else:
            # full logits, or a fused teacher's head (a student that cannot fuse computes the teacher's logits here)
            t_logits = F.linear(*teacher.head) if teacher.head is not None else teacher.logits
            assert t_logits is not None  # a teacher's output has full logits, its head or a top-k pair
            real = t_logits.shape[-1]  # the real vocabulary: the student's rows past it are padding
            kd = kd_loss(logits[..., :real], t_logits, top_k=d.top_k, top_k_tail=d.top_k_tail, **options)
        out["distill/kd"] = kd
        out["train/loss"] = out["train/loss"] + d.alpha * kd
    return out


FUSED_CHUNK_SIZE = 256  # tokens per chunk of the fused loss when distill.chunk_size is not set


def fused_logit_losses(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, teacher: TeacherOutput, d: DistillConfig
) -> dict[str, Tensor]:
    """:func:`logit_losses` of the head ``(weight, bias)`` on the student's last hidden states ``hidden``, never
    holding logits for more than a chunk of tokens (of either model, when the teacher gives its head): a model's
    ``head=`` function. Only ``train/loss`` carries gradient."""
    side = TeacherSide(logits=teacher.logits, topk=teacher.topk, lse=teacher.lse if d.top_k_tail else None)
    if teacher.head is not None:
        t_hidden, t_weight, t_bias = teacher.head
        side = TeacherSide(hidden=t_hidden, weight=t_weight, bias=t_bias)
    how = FusedSettings(d.loss, d.temperature, d.beta, d.alpha, d.top_k, d.top_k_tail, d.chunk_size or FUSED_CHUNK_SIZE)
    loss, kd, ce = fused_kd_terms(hidden, weight, bias, side, how, labels=y)
    return {"train/ce": ce, "distill/kd": kd, "train/loss": loss}
