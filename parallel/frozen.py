"""The mechanics of placing a frozen teacher over the data-parallel ranks: its mesh, FSDP2 sharding for forward
only, and where a rank's rows of a sharded parameter start. What a teacher is, and which placement a run uses,
is ``trainer/distill/placement.py``'s."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims

TEACHER_AXIS = "teacher_dp"


def teacher_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """One flat axis over every data-parallel rank (DDP's replicas and FSDP's shards alike)."""
    assert not dims.pp_enabled, "a sharded teacher spans the data-parallel ranks only (no pipeline stages)"
    return init_device_mesh(device_type, (dims.dp_size,), mesh_dim_names=(TEACHER_AXIS,))


def shard_frozen(module: nn.Module, mesh: DeviceMesh, units: Iterable[nn.Module], param_dtype: str) -> nn.Module:
    """FSDP2 over ``mesh`` for a frozen module that only runs forward: each of ``units`` (its layers) is a unit,
    parameters resharded after every forward, so a rank holds about 1/N of it between forwards."""
    return apply_fsdp(module, mesh, units=units, param_dtype=param_dtype, reshard_after_forward=True, cpu_offload=False)


def local_row_offset(param: torch.Tensor) -> int:
    """The first row of ``param``'s local shard: FSDP2 splits dim 0 like ``torch.chunk`` over its shard ranks."""
    if not isinstance(param, DTensor):
        return 0
    (placement,), mesh = param.placements, param.device_mesh
    assert placement.is_shard(0), f"expected a dim-0 shard, got {placement}"
    rows_per_rank = -(-param.shape[0] // mesh.size())
    return min(mesh.get_local_rank() * rows_per_rank, param.shape[0])
