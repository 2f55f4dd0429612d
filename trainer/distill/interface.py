"""The teacher as the loop sees it: ``teacher(x, step, micro)`` gives a ``TeacherOutput``; each placement
(``trainer/distill/placement.py``, ``trainer/distill/cached.py``) is a ``Teacher``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from trainer.distill.align import AlignedLogits, AlignedTopK


@dataclass
class TeacherOutput:
    """Full logits ``[..., V]`` (live teachers), the head's input and parameters ``(last hidden state [..., H], weight
    [V, H], bias or None)`` (a replicated teacher whose family has ``fused_head``, in a fused run), or a top-k
    ``(raw logit values, vocabulary indices)`` pair, each ``[..., k]``, with the log-sum-exp of the whole rows at
    the cache's ``lse_temperature`` ``[...]`` (a cache); hidden states by layer when asked for."""

    logits: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    hidden: dict[int, torch.Tensor] | None = None
    head: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    lse: torch.Tensor | None = None
    aligned: AlignedLogits | None = None  # a teacher of another tokenizer: its logits of the text, aligned
    aligned_topk: AlignedTopK | None = None  # a cache kept by document: its top-k at the aligned positions
    members: list[tuple[float, TeacherOutput]] | None = None  # an ensemble: each member's weight and output
    # on-policy samples over a compact wire: the teacher's log-probability (T = 1) of each position's next token
    label_logprob: torch.Tensor | None = None


class Teacher(ABC):
    """``teacher(x, step, micro)``: the teacher's output for micro-batch ``micro`` of step ``step`` (input ``x``).

    ``module`` is the live model (None for a cache). Every call adds to the time the student waited on it
    (on a GPU the call synchronizes, so that is the teacher's compute, not its kernel launches).
    """

    placement: str
    module: nn.Module | None = None
    scores_eval_batches = True  # whether ``eval_logits`` works (a cache holds no logits for evaluation batches)
    gives_head = False  # whether its output is its head's input and parameters (a fused loss computes the logits)
    scores_apart = False  # whether it computes on ranks of its own (the student may write the next samples meanwhile)
    # whether the loss needs the student's full logits (a teacher of another tokenizer, whose logits meet the
    # student's at aligned positions; an ensemble): no fused head
    needs_student_logits = False

    def __init__(self) -> None:
        self.wait_seconds = 0.0

    def __call__(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        start = time.perf_counter()
        out = self.forward(x, step, micro)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.wait_seconds += time.perf_counter() - start
        return out

    @abstractmethod
    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        """The teacher's output for micro-batch ``micro`` of step ``step`` (inputs ``x``)."""

    def send_samples(self, x: torch.Tensor, labels: torch.Tensor, on: torch.Tensor, start: int) -> Any:
        """On-policy distillation: hand the teacher the rows ``on`` (bool) of ``x`` that the student wrote, as soon as
        they exist (of those rows only the positions from ``start`` on are needed; ``labels``: the completions' tokens
        each position predicts); what ``score`` then collects. A live teacher scores them in ``score`` itself (None
        here)."""
        return None

    def score(
        self, x: torch.Tensor, on: torch.Tensor, start: int, step: int, micro: int, sent: Any = None
    ) -> TeacherOutput:
        """The teacher's output for micro-batch ``micro`` of step ``step`` whose rows ``on`` the student wrote
        (``sent``: what ``send_samples`` returned for them). Timed like a call."""
        started = time.perf_counter()
        out = self.forward_samples(x, on, start, step, micro, sent)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.wait_seconds += time.perf_counter() - started
        return out

    def forward_samples(
        self, x: torch.Tensor, on: torch.Tensor, start: int, step: int, micro: int, sent: Any
    ) -> TeacherOutput:
        """``score`` untimed: a live teacher scores the whole micro-batch in one forward."""
        return self.forward(x, step, micro)

    @property
    def whole_module(self) -> nn.Module | None:
        """The teacher as one module on this rank (a replicated teacher), None where its forward is a collective
        (sharded) or there is no module here (cache, remote)."""
        return None

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's full logits of an evaluation batch ``x`` (not timed; a live or remote teacher only)."""
        logits = self.forward(x, -1, -1).logits
        assert logits is not None  # live and remote teachers return full logits
        return logits

    def parameters(self) -> list[torch.Tensor]:
        """The teacher parameters this rank holds (none for a cache or a remote teacher)."""
        return list(self.module.parameters()) if self.module is not None else []

    def close(self) -> None:  # noqa: B027 - an optional hook: most teachers hold nothing to release
        """Release what the teacher holds beyond the run (remote: tell the teacher rank this student is done)."""

    def pop_wait_seconds(self) -> float:
        """Seconds spent in the teacher since the last call."""
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited
