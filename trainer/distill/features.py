"""Feature (hidden-state) distillation: match chosen student layers to teacher layers.

Each pair gets a learned linear projection from the student width to the teacher width when the two
differ. The projections train with the student but live here, outside the student model, so they are
never part of an exported student.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FEATURE_LOSSES = ("mse", "cosine")


def feature_loss(student_h: Tensor, teacher_h: Tensor, kind: str) -> Tensor:
    """Unweighted fp32 loss between hidden states of equal shape ``[..., D]`` (teacher detached).

    ``mse``: mean squared error over all elements. ``cosine``: mean over tokens of
    ``1 - cos(student, teacher)`` along the last dim.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss {kind!r}; expected one of: {', '.join(FEATURE_LOSSES)}")
    if student_h.shape != teacher_h.shape:
        raise ValueError(
            f"student features {tuple(student_h.shape)} and teacher features {tuple(teacher_h.shape)} differ in shape"
        )
    s, t = student_h.float(), teacher_h.detach().float()
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


class FeatureDistiller(nn.Module):
    """Weighted sum of feature losses over (student layer, teacher layer) pairs.

    Args:
        specs: items with ``student_layer``, ``teacher_layer``, ``loss`` (``mse`` | ``cosine``) and
            ``weight`` attributes (e.g. ``FeatureConfig``).
        student_width: hidden size of the student.
        teacher_width: hidden size of the teacher; a bias-free ``Linear(student_width, teacher_width)``
            projects the student features when the widths differ.
    """

    def __init__(self, specs: Sequence[Any], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs: list[tuple[int, int, str, float]] = []
        for spec in specs:
            pair = (int(spec.student_layer), int(spec.teacher_layer), str(spec.loss), float(spec.weight))
            if pair[2] not in FEATURE_LOSSES:
                raise ValueError(f"unknown feature loss {pair[2]!r}; expected one of: {', '.join(FEATURE_LOSSES)}")
            if any(p[:2] == pair[:2] for p in self.pairs):
                raise ValueError(f"feature pair student {pair[0]} / teacher {pair[1]} is listed twice")
            self.pairs.append(pair)
        widths_differ = student_width != teacher_width
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) if widths_differ else nn.Identity() for _ in self.pairs
        )

    @staticmethod
    def key(student_layer: int, teacher_layer: int) -> str:
        """Metric name of one pair's unweighted loss."""
        return f"distill/feat_s{student_layer}_t{teacher_layer}"

    def forward(
        self, student_hidden: dict[int, Tensor], teacher_hidden: dict[int, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the feature losses.

        Args:
            student_hidden: student hidden states ``[..., student_width]`` by layer index.
            teacher_hidden: teacher hidden states ``[..., teacher_width]`` by layer index (detached).

        Returns:
            The weighted total (fp32 scalar) and each pair's unweighted loss keyed by :meth:`key`.
        """
        parts: dict[str, Tensor] = {}
        weighted: list[Tensor] = []
        for (s_layer, t_layer, kind, weight), project in zip(self.pairs, self.projections):
            if s_layer not in student_hidden or t_layer not in teacher_hidden:
                raise KeyError(
                    f"feature pair needs student layer {s_layer} and teacher layer {t_layer}; "
                    f"got student {sorted(student_hidden)} and teacher {sorted(teacher_hidden)}"
                )
            loss = feature_loss(project(student_hidden[s_layer].float()), teacher_hidden[t_layer], kind)
            parts[self.key(s_layer, t_layer)] = loss
            weighted.append(weight * loss)
        total = torch.stack(weighted).sum() if weighted else torch.zeros(())
        return total, parts
