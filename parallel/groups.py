"""The process group of the trainer's own collectives (checkpoints, metrics, stop requests).

It is the whole world, except when teacher ranks serve beside the student (``teacher.placement=remote``):
then it is the student's ranks, and the teacher ranks take part in none of the trainer's collectives.
"""

from __future__ import annotations

import torch.distributed as dist

_student_group: dist.ProcessGroup | None = None


def set_student_ranks(ranks: list[int]) -> None:
    """Make the student's group of ``ranks`` (a collective: every rank of the world calls it)."""
    global _student_group
    _student_group = dist.new_group(ranks)


def trainer_group() -> dist.ProcessGroup | None:
    """The group the trainer's collectives use; None means the default group (the whole world)."""
    return _student_group
