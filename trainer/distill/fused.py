"""KD of the models' last hidden states and heads that never holds ``[tokens, V]`` logits: each chunk of tokens'
logits is computed, its divergence (and cross-entropy) taken with the shared core (``trainer.distill.divergence``),
and its gradient multiplied into the hidden states', head weight's and bias's at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.distill.divergence import check_args, check_tail, summed_divergence, teacher_buckets

if TYPE_CHECKING:
    from trainer.config import DistillConfig
    from trainer.distill.interface import TeacherOutput


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
    softcap: float | None = None  # the student's logits are softcap * tanh(z / softcap) of its head's output z


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
        head_out = F.linear(h, weight, bias).requires_grad_(with_grads)
        with torch.enable_grad():
            logits = head_out if how.softcap is None else how.softcap * torch.tanh(head_out / how.softcap)
            kd = summed_divergence(
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
            (grad_logits,) = torch.autograd.grad(loss, head_out)
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
    check_args(how.kind, how.temperature, how.beta, how.chunk_size)
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
        check_tail(k, teacher.vocab or weight.shape[0])
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


FUSED_CHUNK_SIZE = 256  # tokens per chunk of the fused loss when distill.chunk_size is not set


def fused_logit_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    teacher: TeacherOutput,
    d: DistillConfig,
    softcap: float | None = None,
) -> dict[str, Tensor]:
    """:func:`logit_losses` of the head ``(weight, bias)`` on the student's last hidden states ``hidden`` (its logits
    soft-capped at ``softcap``, if any), never holding logits for more than a chunk of tokens (of either model, when
    the teacher gives its head): a model's ``head=`` function. Only ``train/loss`` carries gradient."""
    side = TeacherSide(logits=teacher.logits, topk=teacher.topk, lse=teacher.lse if d.top_k_tail else None)
    if teacher.head is not None:
        t_hidden, t_weight, t_bias = teacher.head
        side = TeacherSide(hidden=t_hidden, weight=t_weight, bias=t_bias)
    chunk = d.chunk_size or FUSED_CHUNK_SIZE
    how = FusedSettings(d.loss, d.temperature, d.beta, d.alpha, d.top_k, d.top_k_tail, chunk, softcap)
    loss, kd, ce = fused_kd_terms(hidden, weight, bias, side, how, labels=y)
    return {"train/ce": ce, "distill/kd": kd, "train/loss": loss}
