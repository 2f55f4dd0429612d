"""Reductions over the data-parallel ranks of a mesh (metrics, eval sums); no-ops on one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def dp_sum(tensor: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum ``tensor`` over every data-parallel rank of ``mesh``, in place; returns it."""
    if mesh is None:
        return tensor
    for axis in range(mesh.ndim):
        if mesh.size(axis) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=mesh.get_group(axis))
    return tensor


def dp_mean(values: dict[str, torch.Tensor], mesh: DeviceMesh | None) -> dict[str, torch.Tensor]:
    """The mean over data-parallel ranks of each scalar in ``values`` (one collective per mesh axis)."""
    if mesh is None or not values:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dp_sum(stacked, mesh).div_(mesh.size())
    return dict(zip(values, stacked.unbind()))
