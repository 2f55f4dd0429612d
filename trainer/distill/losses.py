"""Logit distillation losses: forward KL, reverse KL, a generalised Jensen-Shannon divergence, and any divergence
registered with ``@divergence(name)`` (``trainer.distill.divergence.DIVERGENCES``).

Every divergence is computed in fp32 from ``log_softmax`` of temperature-scaled logits, averaged over the
tokens whose label is not ``ignore_index`` and multiplied by ``T**2`` (so gradient magnitudes do not shrink
as the temperature grows). The teacher never receives gradient.

``fused_linear_kd_loss`` (``trainer.distill.fused``, named here too) takes the models' last hidden states and heads
instead of logits and computes the logits a chunk of tokens at a time, so no ``[tokens, V]`` logits exist for either
model. The divergences themselves are in ``trainer.distill.divergence``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer.distill.align import aligned_kd, topk_span_kd
from trainer.distill.divergence import (
    DIVERGENCES,
    ChunkedDivergence,
    check_args,
    check_tail,
    chunked_sum,
    divergence,
    select_rows,
    summed_divergence,
    teacher_buckets,
    token_divergence,
)
from trainer.distill.fused import fused_linear_kd_loss

if TYPE_CHECKING:
    from trainer.config import DistillConfig
    from trainer.distill.interface import TeacherOutput


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
        check_tail(teacher_values.shape[-1], student_logits.shape[-1])
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
    - any other registered kind: its function of ``log p_s``, ``log p_t`` and ``beta``

    ``top_k=k`` restricts both distributions to the teacher's top-k vocabulary indices ``idx`` and
    renormalises them there (the tail is dropped on both sides): ``p_t = softmax(teacher[idx] / T)``,
    ``p_s = softmax(student[idx] / T)``, then the same divergence. ``top_k = V`` is the full loss. With
    ``top_k_tail`` both distributions keep a (k+1)-th bucket holding the rest of their mass at ``T`` instead.

    Args:
        student_logits: ``[..., V]`` logits (any float dtype; computed in fp32).
        teacher_logits: ``[..., V]`` logits; detached.
        kind: a registered divergence (``DIVERGENCES``: ``forward_kl``, ``reverse_kl``, ``jsd``, ...).
        temperature: softmax temperature ``T > 0``; the loss is multiplied by ``T**2``.
        beta: mixture weight of the teacher in ``jsd`` (in ``[0, 1]``; every kind is given it).
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
    check_args(kind, temperature, beta, chunk_size)
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
    if keep is not None and bool(keep.all()):
        keep = None  # every token counts: no [tokens, V] copies of the kept rows
    div = partial(summed_divergence, kind=kind, temperature=temperature, beta=beta, tail=tail)

    if chunk_size is None:
        everything = slice(None)
        s, t = select_rows(student, everything, keep), select_rows(teacher, everything, keep)
        total = div(s, t, select_rows(indices, everything, keep))
    elif torch.is_grad_enabled() and student.requires_grad:
        total = ChunkedDivergence.apply(student, teacher, indices, keep, div, chunk_size)
    else:
        total = chunked_sum(student, teacher, indices, keep, div, chunk_size)
    return total * (temperature**2) / count


class KDLoss(nn.Module):
    """Module wrapper of :func:`kd_loss` with fixed settings.

    Args:
        kind: a registered divergence (``DIVERGENCES``: ``forward_kl``, ``reverse_kl``, ``jsd``, ...).
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
        check_args(kind, temperature, beta, chunk_size)
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
    """``train/ce``, ``distill/kd`` (with a KD loss) and ``train/loss`` = (1 - alpha) * CE + alpha * KD of a batch;
    an ensemble's KD is the weighted sum of its members' (each also as ``distill/kd/member{i}``)."""
    reported_only = d.alpha == 1 and d.loss != "none"  # CE is then a metric: no backward through its log-softmax
    with torch.set_grad_enabled(torch.is_grad_enabled() and not reported_only):
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    out = {"train/ce": ce, "train/loss": (1 - d.alpha) * ce}
    if d.loss != "none":
        assert teacher is not None  # preflight: a KD loss has a teacher
        if teacher.members is None:
            kd = _kd_term(logits, y, teacher, d, out, "")
        else:
            terms = [
                (w, _kd_term(logits, y, member, d, out, f"/member{i}")) for i, (w, member) in enumerate(teacher.members)
            ]
            for i, (_, term) in enumerate(terms):
                out[f"distill/kd/member{i}"] = term.detach()
            kd = sum(w * term for w, term in terms)  # type: ignore[assignment]
        out["distill/kd"] = kd
        out["train/loss"] = out["train/loss"] + d.alpha * kd
    return out


def _kd_term(logits: Tensor, y: Tensor, teacher: TeacherOutput, d: DistillConfig, out: dict, suffix: str) -> Tensor:
    """The KD term against one teacher's output; what an alignment kept goes into ``out`` (its keys + ``suffix``)."""
    options: dict[str, Any] = dict(
        kind=d.loss, temperature=d.temperature, beta=d.beta, labels=y, chunk_size=d.chunk_size
    )
    aligned = None
    if teacher.aligned_topk is not None:  # a cache kept by document
        aligned = topk_span_kd(logits, teacher.aligned_topk, y, kind=d.loss, temperature=d.temperature, beta=d.beta)
    elif teacher.aligned is not None:  # a live teacher of another tokenizer
        a = teacher.aligned
        aligned = aligned_kd(
            logits, a.logits, a.alignment, a.shared, y, how=a.how, kind=d.loss, temperature=d.temperature, beta=d.beta
        )
    if aligned is not None:
        out[f"distill/aligned_fraction{suffix}"] = aligned.aligned_fraction
        out[f"distill/shared_mass{suffix}"] = aligned.shared_mass
        return aligned.kd
    if teacher.topk is not None:
        return kd_loss_topk(logits, *teacher.topk, teacher_lse=teacher.lse if d.top_k_tail else None, **options)
    # full logits, or a fused teacher's head (a student that cannot fuse computes the teacher's logits here)
    t_logits = F.linear(*teacher.head) if teacher.head is not None else teacher.logits
    assert t_logits is not None  # a teacher's output has full logits, its head or a top-k pair
    real = t_logits.shape[-1]  # the real vocabulary: the student's rows past it are padding
    return kd_loss(logits[..., :real], t_logits, top_k=d.top_k, top_k_tail=d.top_k_tail, **options)


__all__ = [
    "DIVERGENCES",
    "KDLoss",
    "divergence",
    "fused_linear_kd_loss",
    "kd_loss",
    "kd_loss_topk",
    "logit_losses",
    "token_divergence",
]
