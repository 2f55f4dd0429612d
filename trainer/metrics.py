"""Per-rank memory figures: training-state bytes this rank holds, and its peak memory."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (only the local shard of a DTensor)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def state_bytes(
    parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer, masks: Iterable[torch.Tensor] = ()
) -> dict[str, int]:
    """Parameter, gradient, optimizer-state and mask bytes on this rank."""
    optimizer_tensors = (v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "params": held_bytes(parameters),
        "grads": held_bytes(p.grad for p in parameters if p.grad is not None),
        "optimizer": held_bytes(optimizer_tensors),
        "masks": held_bytes(masks),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
