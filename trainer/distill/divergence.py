"""The divergence core every KD loss shares: the registered per-token divergences (``DIVERGENCES``: forward KL,
reverse KL and generalised JSD, and any kind registered with ``@divergence(name)``) of temperature-scaled logits in
fp32, the top-k buckets (with the tail bucket of the rest of the mass), and the sum over row chunks whose student
gradient is computed chunk by chunk.

A new KD kind is one function of the student's and the teacher's log-probabilities over the last dim (at the
temperature) and ``distill.beta``, returning the per-token divergence; registered, ``distill.loss=<name>`` passes the
preflight and works in every path (full logits, chunked, top-k with or without the tail bucket, fused)::

    @divergence("total_variation")
    def total_variation(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
        return 0.5 * (logp_s.exp() - logp_t.exp()).abs().sum(-1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

# A KD kind: (log p_s, log p_t, beta) -> per-token divergence ``[...]`` (fp32, not scaled by ``T**2``, not reduced).
TokenDivergence = Callable[[Tensor, Tensor, float], Tensor]

DIVERGENCES: dict[str, TokenDivergence] = {}  # distill.loss=<name> -> its divergence; filled by @divergence(name)

# div(student_rows, teacher_rows, index_rows_or_None) -> summed divergence of those rows (fp32 scalar).
Divergence = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def divergence(name: str) -> Callable[[TokenDivergence], TokenDivergence]:
    """Register the decorated function as the KD kind ``distill.loss=name`` (see the module docstring)."""

    def register(fn: TokenDivergence) -> TokenDivergence:
        if name == "none" or name in DIVERGENCES:
            raise ValueError(f"the divergence name {name!r} is taken")
        DIVERGENCES[name] = fn
        return fn

    return register


def lookup(kind: str) -> TokenDivergence:
    """The registered divergence ``kind``; ValueError listing the registered ones for any other name."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown distillation loss kind {kind!r}; expected one of: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[kind]


def check_args(kind: str, temperature: float, beta: float, chunk_size: int | None) -> None:
    lookup(kind)
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


@divergence("forward_kl")
def forward_kl(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """KL(p_t || p_s)."""
    return _kl(logp_t, logp_s)


@divergence("reverse_kl")
def reverse_kl(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """KL(p_s || p_t)."""
    return _kl(logp_s, logp_t)


@divergence("jsd")
def jsd(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), with m = beta * p_t + (1 - beta) * p_s."""
    # log m = log(beta * p_t + (1 - beta) * p_s); log(0) = -inf keeps beta in {0, 1} finite.
    log_m = torch.logaddexp(logp_t + _log(beta), logp_s + _log(1.0 - beta))
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in fp32 (no copy at T=1: a [tokens, V] copy and its backward cost as much as the
    divergence's own passes)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_divergence(student: Tensor, teacher: Tensor, kind: str, temperature: float, beta: float) -> Tensor:
    """Per-token divergence ``kind`` (a registered one) of logits ``[..., V]`` in fp32 (not scaled by ``T**2``, not
    reduced)."""
    div = lookup(kind)
    logp_s = F.log_softmax(_scaled(student, temperature), dim=-1)
    logp_t = F.log_softmax(_scaled(teacher, temperature), dim=-1)
    return div(logp_s, logp_t, beta)


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


def summed_divergence(
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
def select_rows(x: Tensor, rows: slice, keep: Tensor | None) -> Tensor: ...
@overload
def select_rows(x: Tensor | None, rows: slice, keep: Tensor | None) -> Tensor | None: ...
def select_rows(x: Tensor | None, rows: slice, keep: Tensor | None) -> Tensor | None:
    if x is None:
        return None
    x = x[rows]
    return x if keep is None else x[keep]


def chunked_sum(
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
        s, t, idx = select_rows(student, rows, sel), select_rows(teacher, rows, sel), select_rows(indices, rows, sel)
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


class ChunkedDivergence(torch.autograd.Function):
    """Chunked sum whose student gradient is computed chunk by chunk during forward.

    Only one chunk's fp32 intermediates are alive at a time, in forward and backward alike; the saved
    state is a single gradient buffer shaped (and typed) like the student logits.
    """

    @staticmethod
    def forward(ctx, student, teacher, indices, keep, div, chunk_size):
        grad = torch.zeros_like(student)
        total = chunked_sum(student, teacher, indices, keep, div, chunk_size, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def check_tail(k: int, vocab: int) -> None:
    if k >= vocab:
        raise ValueError(f"the top-k tail needs k < the vocabulary ({vocab}), got k={k}")
