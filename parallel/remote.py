"""Dedicated teacher ranks (``teacher.placement=remote``): the last K ranks of the world hold the teacher.

Student rank ``s`` of ``S`` is served by teacher rank ``S + s % K``. A request is three point-to-point messages
on the pair: a header ``[kind, sequence, rows, tokens, start]``, the input tokens ``[rows, tokens]``, and the reply,
the teacher's logits ``[rows, tokens - start, vocab]`` (fp32) from position ``start`` on (0 for a data set's batch;
on-policy distillation sends the student's samples and needs only the positions of their completions). A teacher
rank serves its students round-robin in rank order (every student makes the same sequence of requests: the same
steps, micro-batches and eval batches), so no message needs an any-source receive and the protocol runs on gloo and
NCCL alike.

The student overlaps the teacher with its own step: as soon as it has a micro-batch's logits it sends the next
micro-batch's inputs (batches are a pure function of the step), so the teacher computes them while the student
runs forward and backward. Closing drains a request still in flight and sends a stop header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

REQUEST, STOP = 1, 0
HEADER_TAG = 0
HEADER_SIZE = 5  # kind, sequence, rows, tokens, start


@dataclass(frozen=True)
class Roles:
    """Which ranks train the student and which serve the teacher, in a world of ``world_size`` ranks."""

    world_size: int
    teacher_ranks: int

    def __post_init__(self) -> None:
        assert 0 < self.teacher_ranks < self.world_size, (
            f"{self.teacher_ranks} teacher ranks need a world of more ranks (world size {self.world_size})"
        )

    @property
    def students(self) -> list[int]:
        return list(range(self.world_size - self.teacher_ranks))

    def is_teacher(self, rank: int) -> bool:
        return rank >= len(self.students)

    def server_of(self, student: int) -> int:
        """The teacher rank that serves ``student``."""
        return len(self.students) + student % self.teacher_ranks

    def served_by(self, teacher: int) -> list[int]:
        """The students ``teacher`` serves, in the order it serves them."""
        return [s for s in self.students if self.server_of(s) == teacher]


@torch.no_grad()
def serve(module: nn.Module, students: list[int], device: torch.device) -> int:
    """Answer ``students``' requests with ``module``'s logits until each has sent a stop; returns the count served."""
    open_students, served = list(students), 0
    while open_students:
        for student in list(open_students):
            header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=device)
            dist.recv(header, src=student, tag=HEADER_TAG)
            kind, sequence, rows, tokens, start = header.tolist()
            if kind == STOP:
                open_students.remove(student)
                continue
            x = torch.empty(rows, tokens, dtype=torch.int64, device=device)
            dist.recv(x, src=student, tag=sequence)
            logits = module(x)[:, start:].float().contiguous()
            dist.send(logits, dst=student, tag=sequence)
            served += 1
    return served


class PendingLogits:
    """A request in flight: the sends to wait for and the reply being received."""

    def __init__(self, server: int, sequence: int, x: torch.Tensor, vocab: int, start: int = 0):
        self.header = torch.tensor([REQUEST, sequence, *x.shape, start], dtype=torch.int64, device=x.device)
        self.x = x.contiguous()
        self.logits = torch.empty(x.shape[0], x.shape[1] - start, vocab, device=x.device)
        self.works = [
            dist.isend(self.header, server, tag=HEADER_TAG),
            dist.isend(self.x, server, tag=sequence),
            dist.irecv(self.logits, server, tag=sequence),
        ]

    def wait(self) -> torch.Tensor:
        for work in self.works:
            assert work is not None  # isend/irecv return None only on a rank outside the group
            work.wait()
        return self.logits


class RemoteClient:
    """The student side: ``logits(x, key)`` from the serving teacher rank, the next key's request sent ahead.

    ``next_input(key)`` gives the inputs and key of the micro-batch after ``key`` (None after the last), so
    the teacher computes them while the student trains on the current one.
    """

    def __init__(self, server: int, vocab: int, next_input: Callable[[tuple], tuple[tuple, torch.Tensor] | None]):
        self.server, self.vocab, self.next_input = server, vocab, next_input
        self.sequence = 0
        self.ahead: tuple[tuple, PendingLogits] | None = None

    def request(self, x: torch.Tensor, start: int = 0) -> PendingLogits:
        """Send ``x`` to the teacher rank; its logits from position ``start`` on come back (``wait``)."""
        self.sequence += 1
        return PendingLogits(self.server, self.sequence, x, self.vocab, start)

    def logits(self, x: torch.Tensor, key: tuple | None) -> torch.Tensor:
        """The teacher's logits of ``x``; ``key`` (step, micro) names a training micro-batch, None an eval batch."""
        if key is None:
            return self.request(x).wait()
        if self.ahead is not None and self.ahead[0] == key:
            pending = self.ahead[1]
        else:
            self.drain()
            pending = self.request(x)
        self.ahead = None
        following = self.next_input(key)
        if following is not None:
            next_key, next_x = following
            self.ahead = (next_key, self.request(next_x))
        return pending.wait()

    def drain(self) -> None:
        """Receive a request still in flight (its logits are not needed)."""
        if self.ahead is not None:
            self.ahead[1].wait()
            self.ahead = None

    def close(self) -> None:
        """Drain, then tell the server this student is done."""
        self.drain()
        dist.send(torch.tensor([STOP, 0, 0, 0, 0], dtype=torch.int64), self.server, tag=HEADER_TAG)
