"""Choosing the cut by distilling (Minitron: which cut is best shows only after a short retraining of each).

``python -m trainer.search`` (``trainer/cli/search.py``) with a run's overrides (``student=from_teacher``):

1. **Enumerate.** Every depth of ``search.layers``, head-group fraction of ``search.widths``, MLP fraction of
   ``search.mlp_widths`` and width fraction of ``search.hidden_widths``; its parameters counted on the meta device.
   For each depth and width, the largest cut within the budget (``search.budget`` of the teacher's parameters,
   non-embedding or total) is a candidate when it holds at least ``1 - search.slack`` of the budget.
2. **Score as cut.** The teacher's importance is measured once on the calibration batches; each candidate is cut
   with it (layers by importance) and its validation loss measured on the batches training evaluates on
   (``data.eval_batches``), with the teacher's on the same batches.
3. **Train** the ``search.top`` best as cut for ``search.tokens`` tokens each (``python -m trainer`` with the run's
   overrides and the candidate's ``student.*``, into ``search.dir/<candidate>``; a rerun resumes or skips what is
   done), and rank them by their validation loss after training.

This module holds the steps' logic; what they write (``search.json``, ``search.png``) and how runs are launched is the
CLI's.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import cut
from trainer.models.protocol import ConfigFieldError, Unsupported, family_of

if TYPE_CHECKING:
    from trainer.config import SearchConfig


@dataclass
class Candidate:
    """A cut: its shape, its parameters, and what the search measured of it."""

    layers: int
    width: float
    mlp_width: float
    hidden_width: float
    params: int
    non_embedding: int
    loss_as_cut: float | None = None
    loss_after: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (training tokens, validation loss)

    @property
    def name(self) -> str:
        return f"L{self.layers}_w{self.width:.3g}_m{self.mlp_width:.3g}_h{self.hidden_width:.3g}"

    def overrides(self) -> list[str]:
        """The ``student.*`` overrides of this cut (layers chosen by importance)."""
        return [f"student.layers={self.layers}", "student.layer_select=importance", f"student.width={self.width}",
                f"student.mlp_width={self.mlp_width}", f"student.hidden_width={self.hidden_width}"]  # fmt: skip

    def cut_config(self, base: cut.CutConfig) -> cut.CutConfig:
        return dataclasses.replace(
            base, layers=self.layers, layer_select="importance", width=self.width, mlp_width=self.mlp_width,
            hidden_width=self.hidden_width,
        )  # fmt: skip


def parameters(model: nn.Module) -> tuple[int, int]:
    """``model``'s parameters (a tied embedding and head once) and those outside its embedding and head."""
    family = family_of(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tables = 1 if family.tied_weights(model) else 2
    return total, total - tables * family.vocab_size(model) * family.width(model)


def budget_of(search: SearchConfig, teacher: tuple[int, int]) -> int:
    """The parameter budget: ``search.budget`` of the teacher's (total, non-embedding) count it names, or itself."""
    counted = teacher[0] if search.count == "total" else teacher[1]
    return int(search.budget * counted) if search.budget <= 1 else int(search.budget)


def grids(search: SearchConfig, teacher: nn.Module) -> tuple[list[int], list[float]]:
    """The depths and head-group fractions tried: the config's, or the defaults for ``teacher``."""
    family = family_of(teacher)
    depth = len(family.layers(teacher))
    layers = search.layers or sorted({*range(max(1, depth // 4), depth + 1, max(1, depth // 10)), depth})
    groups = [g.n_units for g in family.unit_groups(teacher) if g.kind == "attn"]
    widths = search.widths or ([k / groups[0] for k in range(1, groups[0] + 1)] if groups else [1.0])
    return layers, widths


def enumerate_candidates(meta_teacher: nn.Module, base: cut.CutConfig, search: SearchConfig) -> list[Candidate]:
    """For each depth and width fraction of the grid, the largest cut of ``meta_teacher`` (on the meta device) within
    the budget, if it holds at least ``1 - search.slack`` of it; ordered by depth, then width."""
    budget = budget_of(search, parameters(meta_teacher))
    layers, widths = grids(search, meta_teacher)
    counted = 0 if search.count == "total" else 1
    found = []
    for hidden in search.hidden_widths:
        per_shape = {}
        for width, mlp in itertools.product(widths, search.mlp_widths):
            try:  # parameters grow linearly with the depth: two cuts give them at every depth
                one, two = (parameters(_cut_sizes(meta_teacher, base, n, width, mlp, hidden)) for n in (1, 2))
            except (ConfigFieldError, Unsupported):
                continue  # a fraction this family cannot cut to (GPT-2's width, say)
            per_shape[width, mlp] = (one, two)
        for depth in layers:
            fits = []
            for (width, mlp), (one, two) in per_shape.items():
                counts = tuple(a + (depth - 1) * (b - a) for a, b in zip(one, two, strict=True))
                if counts[counted] <= budget:
                    fits.append(Candidate(depth, width, mlp, hidden, params=counts[0], non_embedding=counts[1]))
            if fits:
                best = max(fits, key=lambda c: ((c.params, c.non_embedding)[counted], c.width))
                if (best.params, best.non_embedding)[counted] >= (1 - search.slack) * budget:
                    found.append(best)
    return sorted(found, key=lambda c: (c.layers, c.hidden_width))


def _cut_sizes(meta_teacher: nn.Module, base: cut.CutConfig, depth: int, width: float, mlp: float, hidden: float):
    config = dataclasses.replace(base, layers=depth, layer_select="uniform", width=width, mlp_width=mlp,
                                 hidden_width=hidden)  # fmt: skip
    return cut.cut(meta_teacher, config, [])


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on ``batches`` of (inputs, targets)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


def score(
    teacher: nn.Module,
    candidates: list[Candidate],
    base: cut.CutConfig,
    calibration: list[torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Fill each candidate's loss as cut (and its exact parameters: the real cut's) on ``batches``; returns the
    teacher's loss on them. The teacher's importance is measured once, on ``calibration``."""
    importance = cut.measure(teacher, calibration)
    for candidate in candidates:
        student = cut.cut(teacher, candidate.cut_config(base), calibration, importance)
        candidate.params, candidate.non_embedding = parameters(student)
        candidate.loss_as_cut = validation_loss(student, batches)
        del student
    return validation_loss(teacher, batches)


def ranks(values: list[float | None]) -> list[int | None]:
    """1 for the smallest of ``values``, 2 for the next...; None stays None."""
    order = sorted((v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v))
    out: list[int | None] = [None] * len(values)
    for rank, (_, i) in enumerate(order, 1):
        out[i] = rank
    return out


def summary(candidates: list[Candidate], teacher_loss: float, budget: int, search: SearchConfig) -> dict[str, Any]:
    """What ``search.json`` holds: the budget, the teacher's loss, every candidate with its rank as cut and after
    training, the winner (the best after training) and whether the two rankings agree on the trained ones."""
    as_cut = ranks([c.loss_as_cut for c in candidates])
    after = ranks([c.loss_after for c in candidates])
    rows = [
        {**dataclasses.asdict(c), "name": c.name, "rank_as_cut": r1, "rank_after": r2,
         "gap_recovered": _recovered(c, teacher_loss)}
        for c, r1, r2 in zip(candidates, as_cut, after, strict=True)
    ]  # fmt: skip
    trained = [row for row in rows if row["rank_after"] is not None]
    winner = min(trained, key=lambda row: row["rank_after"]) if trained else None
    by_cut = [row["name"] for row in sorted(trained, key=lambda row: row["loss_as_cut"])]
    by_training = [row["name"] for row in sorted(trained, key=lambda row: row["rank_after"])]
    return {
        "budget": budget,
        "count": search.count,
        "teacher_loss": teacher_loss,
        "candidates": rows,
        "trained_by_loss_as_cut": by_cut,
        "trained_by_loss_after": by_training,
        "rankings_agree": by_cut == by_training,
        "winner": winner and {"name": winner["name"], "overrides": Candidate(**_fields(winner)).overrides()},
    }


def _recovered(candidate: Candidate, teacher_loss: float) -> float | None:
    """The share of the gap the cut opened that training closed: (as cut - after) / (as cut - teacher)."""
    if candidate.loss_after is None or candidate.loss_as_cut is None or candidate.loss_as_cut <= teacher_loss:
        return None
    return (candidate.loss_as_cut - candidate.loss_after) / (candidate.loss_as_cut - teacher_loss)


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Candidate)}
    return {k: (list(map(tuple, v)) if k == "curve" else v) for k, v in row.items() if k in names}


def from_json(row: dict[str, Any]) -> Candidate:
    """A candidate as ``summary`` (or the plan) wrote it."""
    return Candidate(**_fields(row))
