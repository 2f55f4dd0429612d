"""Dedicated teacher ranks (``teacher.placement=remote``): the last K ranks of the world hold the teacher.

Student rank ``s`` of ``S`` is served by teacher rank ``S + s % K``. A teacher rank holds every teacher that runs
remotely (one, or the remote members of an ensemble), each with its index. A request is point-to-point messages on
the pair: a header ``[kind, tag, rows, tokens, start, teacher]``, the input tokens ``[rows, tokens]``, and the reply,
teacher ``teacher``'s logits ``[rows, tokens - start, vocab]`` (fp32) from position ``start`` on (0 for a data set's
batch; on-policy distillation sends the student's samples and needs only the positions of their completions); the
inputs and the reply travel under the request's own tag. A request of kind ``PACKED`` is answered by that teacher's
``Wire`` instead: the tensors its ``pack`` makes of those logits (the trainer's compact top-k with its tail: a few
hundred bytes a token where fp32 logits take 4 x vocab), one message each. A request of kind ``GRADED`` (on-policy
samples over a packed wire) carries one more input token, the label after each row (not read by the teacher), and
its reply adds the teacher's log-probability of each position's next token (fp32 ``[rows, tokens - 1 - start]``):
what grading a sampled token needs when it is off the top-k. A teacher rank serves its students round-robin in rank
order (every student makes the same sequence of requests: the same steps, micro-batches and eval batches), so no
message needs an any-source receive and the protocol runs on gloo and NCCL alike.

The student overlaps the teacher with its own step: as soon as it has a micro-batch's logits it sends the next
micro-batch's inputs (batches are a pure function of the step), so the teacher computes them while the student
runs forward and backward. Closing drains a request still in flight and sends a stop header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

REQUEST, STOP, PACKED, GRADED = 1, 0, 2, 3
HEADER_TAG = 0
HEADER_SIZE = 6  # kind, tag, rows, tokens, start, teacher


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


@dataclass(frozen=True)
class Wire:
    """A packed reply: ``pack(logits [rows, tokens, vocab])`` gives the tensors sent, each ``[rows, tokens, *tail]``
    of one of ``parts`` (its trailing shape and dtype), in that order."""

    pack: Callable[[torch.Tensor], list[torch.Tensor]]
    parts: tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class Served:
    """What a teacher rank sent: requests answered, and the bytes and token positions of their replies by kind
    (``REQUEST``: fp32 logits; ``PACKED``: the wire's parts; ``GRADED``: those and the next tokens' log-probability)."""

    requests: int = 0
    bytes: dict[int, int] = field(default_factory=lambda: {REQUEST: 0, PACKED: 0, GRADED: 0})
    tokens: dict[int, int] = field(default_factory=lambda: {REQUEST: 0, PACKED: 0, GRADED: 0})

    def bytes_per_token(self, kind: int) -> float | None:
        return self.bytes[kind] / self.tokens[kind] if self.tokens[kind] else None


@torch.no_grad()
def serve(teachers: list[tuple[nn.Module, Wire | None]], students: list[int], device: torch.device) -> Served:
    """Answer ``students``' requests, each with the logits of the module of ``teachers`` it names (packed by that
    teacher's wire for a ``PACKED`` request), until each student has sent a stop for each of ``teachers``."""
    stops_left, served = dict.fromkeys(students, len(teachers)), Served()
    while stops_left:
        for student in list(stops_left):
            header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=device)
            dist.recv(header, src=student, tag=HEADER_TAG)
            kind, tag, rows, tokens, start, teacher = header.tolist()
            if kind == STOP:
                stops_left[student] -= 1
                if not stops_left[student]:
                    del stops_left[student]
                continue
            x = torch.empty(rows, tokens, dtype=torch.int64, device=device)
            dist.recv(x, src=student, tag=tag)
            module, wire = teachers[teacher]
            logits = module(x[:, :-1] if kind == GRADED else x)[:, start:].float().contiguous()
            if kind in (PACKED, GRADED):
                assert wire is not None, "a packed request to a server without a wire"
                reply = [part.to(device).contiguous() for part in wire.pack(logits)]
                if kind == GRADED:
                    following = x[:, start + 1 :].unsqueeze(-1)
                    reply.append(logits.log_softmax(-1).gather(-1, following).squeeze(-1).contiguous())
            else:
                reply = [logits]
            for part in reply:
                dist.send(part, dst=student, tag=tag)
            served.requests += 1
            served.bytes[kind] += sum(part.numel() * part.element_size() for part in reply)
            served.tokens[kind] += logits.shape[0] * logits.shape[1]
    return served


class PendingLogits:
    """A request in flight: the sends to wait for and the reply being received (the logits, or ``wire``'s parts)."""

    def __init__(
        self,
        server: int,
        tag: int,
        x: torch.Tensor,
        vocab: int,
        start: int = 0,
        wire: Wire | None = None,
        teacher: int = 0,
        graded: bool = False,
    ):
        kind = GRADED if graded else REQUEST if wire is None else PACKED
        self.header = torch.tensor([kind, tag, *x.shape, start, teacher], dtype=torch.int64, device=x.device)
        self.x = x.contiguous()
        rows, tokens = x.shape[0], x.shape[1] - start - graded  # a graded request's last input is a label
        parts: list[tuple[tuple[int, ...], torch.dtype]] = (
            [((vocab,), torch.float32)] if wire is None else list(wire.parts)
        )
        if graded:
            assert wire is not None, "a graded request is packed"
            parts.append(((), torch.float32))
        self.reply = [torch.empty(rows, tokens, *shape, dtype=dtype, device=x.device) for shape, dtype in parts]
        self.works = [
            dist.isend(self.header, server, tag=HEADER_TAG),
            dist.isend(self.x, server, tag=tag),
            *(dist.irecv(part, server, tag=tag) for part in self.reply),
        ]

    def wait_parts(self) -> list[torch.Tensor]:
        for work in self.works:
            assert work is not None  # isend/irecv return None only on a rank outside the group
            work.wait()
        return self.reply

    def wait(self) -> torch.Tensor:
        """The logits of a request that was not packed."""
        (logits,) = self.wait_parts()
        return logits


class RemoteClient:
    """The student side: ``logits(x, key)`` from the serving teacher rank, the next key's request sent ahead.

    ``next_input(key)`` gives the inputs and key of the micro-batch after ``key`` (None after the last), so
    the teacher computes them while the student trains on the current one. ``teacher`` is (index, count): which of
    the teachers the server holds this client asks, of how many; each client of a student rank tags its requests
    with its own residue modulo the count, so no two of them share a tag.
    """

    def __init__(
        self,
        server: int,
        vocab: int,
        next_input: Callable[[tuple], tuple[tuple, torch.Tensor] | None],
        wire: Wire | None = None,
        teacher: tuple[int, int] = (0, 1),
    ):
        self.server, self.vocab, self.next_input, self.wire = server, vocab, next_input, wire
        self.teacher, self.teachers = teacher
        self.sequence = 0
        self.ahead: tuple[tuple, PendingLogits] | None = None

    def request(self, x: torch.Tensor, start: int = 0, packed: bool = False, graded: bool = False) -> PendingLogits:
        """Send ``x`` to the teacher rank; its logits from position ``start`` on come back (``wait``), or with
        ``packed`` the wire's parts (``wait_parts``), with ``graded`` (``x``'s last column: the labels after the rows)
        the next tokens' log-probability after them."""
        self.sequence += 1
        tag = self.sequence * self.teachers + self.teacher
        wire = self.wire if packed or graded else None
        return PendingLogits(self.server, tag, x, self.vocab, start, wire, self.teacher, graded)

    def logits(self, x: torch.Tensor, key: tuple | None) -> list[torch.Tensor]:
        """The teacher's reply for ``x``: ``key`` (step, micro) names a training micro-batch, whose reply is packed
        when the client has a wire; None an eval batch, whose reply is its logits (one tensor)."""
        if key is None:
            return self.request(x).wait_parts()
        packed = self.wire is not None
        if self.ahead is not None and self.ahead[0] == key:
            pending = self.ahead[1]
        else:
            self.drain()
            pending = self.request(x, packed=packed)
        self.ahead = None
        following = self.next_input(key)
        if following is not None:
            next_key, next_x = following
            self.ahead = (next_key, self.request(next_x, packed=packed))
        return pending.wait_parts()

    def drain(self) -> None:
        """Receive a request still in flight (its logits are not needed)."""
        if self.ahead is not None:
            self.ahead[1].wait_parts()
            self.ahead = None

    def close(self) -> None:
        """Drain, then tell the server this client is done (a student rank is done once each of its clients is)."""
        self.drain()
        dist.send(torch.tensor([STOP, 0, 0, 0, 0, self.teacher], dtype=torch.int64), self.server, tag=HEADER_TAG)
