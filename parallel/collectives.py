"""Reductions over the data-parallel ranks of a mesh (metrics, eval sums), and an error agreed by the trainer's
ranks; no-ops on one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from parallel import groups


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


def first_error(error: str | None, device: torch.device) -> str | None:
    """The error of the lowest trainer rank that has one, on every trainer rank (each calls this at the same point,
    ``error`` None where all went well): one integer all_reduce, and a broadcast only when some rank failed."""
    if not dist.is_initialized():
        return error
    group = groups.trainer_group()
    size = dist.get_world_size(group)
    first = torch.tensor([size if error is None else dist.get_rank(group)], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    if int(first.item()) == size:
        return None
    box = [error]
    dist.broadcast_object_list(box, group=group, group_src=int(first.item()))
    return box[0]


class PairwiseGradients:
    """Sums micro-batch gradients as a balanced tree, (g0+g1)+(g2+g3), the order in which a data-parallel run's
    collectives add its ranks' gradients, instead of autograd's running sum ((g0+g1)+g2)+g3.

    Call ``push`` after each micro-batch's backward (it takes the gradients out of ``.grad``) and ``finish``
    after the last (it puts the sum back). A partial sum of 2^k micro-batches merges with the next one of
    the same size, like a binary counter; what is left is added earliest first.
    """

    def __init__(self, parameters: list[torch.Tensor]):
        self.parameters = parameters
        self.partials: list[tuple[int, list[torch.Tensor | None]]] = []

    def push(self) -> None:
        node = (1, [p.grad for p in self.parameters])
        for p in self.parameters:
            p.grad = None
        while self.partials and self.partials[-1][0] == node[0]:
            size, earlier = self.partials.pop()
            node = (2 * size, [_add(a, b) for a, b in zip(earlier, node[1])])
        self.partials.append(node)

    def finish(self) -> None:
        total = self.partials.pop()[1]
        while self.partials:
            total = [_add(a, b) for a, b in zip(self.partials.pop()[1], total)]
        for p, grad in zip(self.parameters, total):
            p.grad = grad


def _add(earlier: torch.Tensor | None, later: torch.Tensor | None) -> torch.Tensor | None:
    return later if earlier is None else earlier if later is None else earlier + later
