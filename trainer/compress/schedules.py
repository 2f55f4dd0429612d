"""Sparsity schedules as functions of the optimizer step (number of optimizer steps completed).

A schedule updates masks at ``start_step + k * every`` (and at ``end_step``), and holds them
in between and after ``end_step``. Before ``start_step`` a modifier prunes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("agp", "linear", "constant")


def agp(t: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): ``s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` for t in [t0, t0 + n*dt]."""
    if end == start:
        return final
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def linear(t: int, start: int, end: int, initial: float, final: float) -> float:
    """Straight line from ``initial`` at ``start`` to ``final`` at ``end``."""
    if end == start:
        return final
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    return initial + (final - initial) * progress


def constant(t: int, start: int, end: int, initial: float, final: float) -> float:
    """One shot: ``final`` from ``start`` on."""
    return final


CURVES = {"agp": agp, "linear": linear, "constant": constant}


@dataclass(frozen=True)
class Schedule:
    kind: str
    start_step: int
    end_step: int
    every: int = 1
    initial: float = 0.0
    final: float = 0.5

    def last_update(self, step: int) -> int | None:
        """The most recent mask-update step at or before ``step`` (None before ``start_step``)."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return self.end_step
        return self.start_step + (step - self.start_step) // self.every * self.every

    def sparsity(self, step: int) -> float:
        """Target sparsity in force after ``step`` optimizer steps (0 before ``start_step``)."""
        update = self.last_update(step)
        if update is None:
            return 0.0
        return CURVES[self.kind](update, self.start_step, self.end_step, self.initial, self.final)
