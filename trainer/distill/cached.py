"""Teachers read from a cache, no model: top-k logits by (step, rows of the batch), or from a cache kept by document,
by where each student token ends in its document (any student tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from parallel.collectives import first_error
from trainer import cache
from trainer.cache.documents import DocumentCache
from trainer.data import local_slice
from trainer.distill.align import AlignedTopK
from trainer.distill.interface import Teacher, TeacherOutput

if TYPE_CHECKING:
    from trainer.data import Shard


class CachedTeacher(Teacher):
    """Top-k logits read from a cache: the rows of the step's global batch that ``shard`` reads in ``micro``.

    Every row read is verified; ranks read other rows of the same step, so a garbled row on any rank raises
    CacheError on every rank, before the student's forward and its collectives."""

    placement = "cache"
    scores_eval_batches = False

    def __init__(self, reader: cache.CacheReader, shard: Shard):
        super().__init__()
        self.reader, self.shard = reader, shard

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        rows = local_slice(torch.arange(self.reader.manifest.key.batch_size), self.shard, micro)
        values, indices, lse = self.read(step, rows, x.device)
        tokens = x.shape[:1] if x.is_floating_point() else x.shape  # features: one prediction per sample
        values, indices = (t.reshape(*tokens, -1).to(x.device, non_blocking=True) for t in (values, indices))
        return TeacherOutput(topk=(values, indices), lse=lse.reshape(tokens).to(x.device, non_blocking=True))

    def read(
        self, step: int, rows: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values, indices and log-sum-exp of ``rows``; CacheError when any rank's rows are garbled (``device``: the
        collective's)."""
        return read_on_every_rank(lambda: self.reader.read(step, rows), device)


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def read_on_every_rank(read: Callable[[], Rows], device: torch.device) -> Rows:
    """``read()`` (a cache's rows), or CacheError on every rank when it raised one on any (``device``: the
    collective's), so that every rank stops at the same step."""
    rows: Rows = (torch.empty(0), torch.empty(0), torch.empty(0))
    try:
        rows = read()
        problem = None
    except cache.CacheError as e:
        problem = str(e)
    problem = first_error(problem, device)
    if problem is not None:
        raise cache.CacheError(problem)
    return rows


class DocumentCachedTeacher(Teacher):
    """Top-k logits from a cache kept by document (``trainer/cache/documents.py``), whatever the student's
    tokenizer: ``spans(step, micro)`` gives the document and character end of each token of the micro-batch's rows
    and of the token after each (``[rows, T + 1]``); a position is aligned where a teacher token ends at the same
    character and the student's next token ends at another (the last of the student's tokens that end there).
    ``to_student`` maps the teacher's ids to the student's (-1: not in its vocabulary)."""

    placement = "cache"
    scores_eval_batches = False
    needs_student_logits = True

    def __init__(
        self,
        reader: DocumentCache,
        spans: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        to_student: torch.Tensor,
        student_vocab: int,
    ):
        super().__init__()
        self.reader, self.spans, self.to_student, self.student_vocab = reader, spans, to_student, student_vocab

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        documents, ends = self.spans(step, micro)
        last = ~((documents[:, 1:] == documents[:, :-1]) & (ends[:, 1:] == ends[:, :-1]))
        candidate = ((ends[:, :-1] >= 0) & last).reshape(-1)
        positions = torch.full_like(candidate, -1, dtype=torch.long)
        positions[candidate] = self.reader.find(documents[:, :-1].reshape(-1)[candidate],
                                                ends[:, :-1].reshape(-1)[candidate])  # fmt: skip
        rows = (positions >= 0).nonzero().squeeze(-1)
        values, ids, lse = read_on_every_rank(lambda: self.reader.read(positions[rows]), x.device)
        aligned = AlignedTopK(rows.to(x.device), values.to(x.device), self.to_student[ids].to(x.device),
                              lse.to(x.device), self.student_vocab)  # fmt: skip
        return TeacherOutput(aligned_topk=aligned)
