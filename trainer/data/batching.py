"""Which rows of a step's global batch a process reads: the step's generator, and this rank's slice of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

_STEP_STRIDE = 1_000_003


@dataclass(frozen=True)
class Shard:
    """Which part of the global batch this process reads."""

    rank: int = 0
    world: int = 1
    grad_accum: int = 1


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _STEP_STRIDE + step)


def local_slice(global_indices: torch.Tensor, shard: Shard, micro: int) -> torch.Tensor:
    """Rows of the global batch that micro-batch ``micro`` of ``shard.rank`` reads."""
    per_rank = len(global_indices) // shard.world
    per_micro = per_rank // shard.grad_accum
    start = shard.rank * per_rank + micro * per_micro
    return global_indices[start : start + per_micro]


WHOLE = Shard()  # one process reading the whole global batch


class StreamWindows(ABC):
    """Windows of ``block_size + 1`` tokens at random starts of a token stream: a step's from its generator, the
    validation ones from a fixed generator (the same for every eval and every run). A subclass holds the streams
    (``train_tokens``, ``val_tokens``) and cuts rows out of them (``_windows``)."""

    train_tokens: Any
    val_tokens: Any
    block_size: int
    eval_batches: int

    @abstractmethod
    def _windows(self, tokens: Any, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token labels of the windows starting at ``starts`` in ``tokens``."""

    def train_starts(self, seed: int, step: int, batch_size: int, shard: Shard, micro: int = 0) -> torch.Tensor:
        """Where in the training stream the rows of micro-batch ``micro`` of ``shard`` start."""
        high = len(self.train_tokens) - self.block_size - 1
        starts = torch.randint(high, (batch_size,), generator=step_generator(seed, step))
        return local_slice(starts, shard, micro)

    def train_batch(self, seed: int, step: int, batch_size: int, shard: Shard, micro: int = 0):
        return self._windows(self.train_tokens, self.train_starts(seed, step, batch_size, shard, micro))

    def val_batches(self, batch_size: int, shard: Shard = WHOLE):
        """A fixed list of validation batches."""
        high = len(self.val_tokens) - self.block_size - 1
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.eval_batches):
            starts = torch.randint(high, (batch_size,), generator=gen)
            yield self._windows(self.val_tokens, local_slice(starts, shard, 0))
