"""Which rows of a step's global batch a process reads: the step's generator, and this rank's slice of it."""

from __future__ import annotations

from dataclasses import dataclass

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
