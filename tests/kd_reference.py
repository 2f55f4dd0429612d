"""The float64 per-token divergences that the KD loss tests compare against, written the plain way."""

from __future__ import annotations

import torch


def per_token_divergence(p_s: torch.Tensor, p_t: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student) for forward_kl, KL(student || teacher) for reverse_kl, and the generalized JSD
    ``beta * KL(t || m) + (1 - beta) * KL(s || m)`` with ``m = beta * t + (1 - beta) * s`` for jsd; over the last dim
    of the probabilities ``p_s`` (student) and ``p_t`` (teacher)."""

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
