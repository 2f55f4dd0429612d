"""Parallel sizes (``ParallelDims``) and the DeviceMesh they describe.

The mesh always has two named data-parallel axes, ``dp_replicate`` (outer) and ``dp_shard``
(inner), either of size 1: DDP replicates over ``dp_replicate``, FSDP2 shards over ``dp_shard`` and
HSDP does both. With pipeline parallelism a ``pp`` axis comes first (outermost): the ranks of one
``pp`` slice hold the successive stages of one replica. The data shard is the rank's place in the
flattened ``(dp_replicate, dp_shard)`` grid, so the stages of one pipeline read the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

REPLICATE_AXIS = "dp_replicate"
SHARD_AXIS = "dp_shard"
PP_AXIS = "pp"
MESH_AXES = (REPLICATE_AXIS, SHARD_AXIS)
SIZES = ("dp_replicate", "dp_shard", "pp")
INFER = -1


class ParallelDimsError(ValueError):
    """Sizes that cannot form a mesh; ``field`` names the ``ParallelDims`` field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class ParallelDims:
    """Sizes over ``world_size`` ranks; ``-1`` in one of ``dp_replicate``, ``dp_shard``, ``pp`` means "the rest"."""

    dp_replicate: int
    dp_shard: int
    world_size: int
    pp: int = 1

    def __post_init__(self) -> None:
        for name in SIZES:
            size = getattr(self, name)
            if size != INFER and size < 1:
                raise ParallelDimsError(name, f"must be >= 1 or -1 (infer) (got {size})")
        inferred = [name for name in SIZES if getattr(self, name) == INFER]
        if len(inferred) > 1:
            raise ParallelDimsError(inferred[1], f"only one of {', '.join(inferred)} may be -1 (infer)")
        known = [(name, getattr(self, name)) for name in SIZES if name not in inferred]
        if inferred:
            product = math.prod(size for _, size in known)
            if self.world_size % product:
                factors = " x ".join(f"{name}={size}" for name, size in known if size != 1)
                raise ParallelDimsError(
                    inferred[0], f"-1 (infer) needs the world size {self.world_size} to be divisible by {factors}"
                )
            object.__setattr__(self, inferred[0], self.world_size // product)
        sizes = [(name, getattr(self, name)) for name in SIZES if name != "pp" or self.pp != 1]
        if math.prod(size for _, size in sizes) != self.world_size:
            at_fault = "pp" if self.pp != 1 else "dp_shard" if self.dp_shard != 1 else "dp_replicate"
            factors = " x ".join(f"{name}={size}" for name, size in sizes)
            raise ParallelDimsError(
                at_fault,
                f"{factors} = {math.prod(size for _, size in sizes)} ranks, but the world size is {self.world_size}",
            )

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded (FSDP2, or HSDP when also replicated)."""
        return self.dp_shard > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_shard > 1 and self.dp_replicate > 1

    @property
    def ddp_enabled(self) -> bool:
        """Parameters are replicated and gradients all-reduced (DDP)."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def pp_enabled(self) -> bool:
        """The student is split into pipeline stages over the ``pp`` axis."""
        return self.pp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The ``(dp_replicate, dp_shard)`` mesh, ``(pp, dp_replicate, dp_shard)`` with pipeline parallelism;
        None for one rank (no process group needed)."""
        if self.world_size == 1:
            return None
        shape, names = (
            ((self.pp, self.dp_replicate, self.dp_shard), (PP_AXIS, *MESH_AXES))
            if self.pp_enabled
            else ((self.dp_replicate, self.dp_shard), MESH_AXES)
        )
        if self.world_size < dist.get_world_size():
            # Teacher ranks beside the student: the mesh is the first world_size ranks. Every rank of the world
            # builds it (its groups are made collectively); a rank outside it has no coordinate.
            return DeviceMesh(device_type, torch.arange(self.world_size).reshape(shape), mesh_dim_names=names)
        return init_device_mesh(device_type, shape, mesh_dim_names=names)

    def dp_mesh(self, mesh: DeviceMesh | None) -> DeviceMesh | None:
        """The ``(dp_replicate, dp_shard)`` part of ``mesh``: the ranks that hold the same stage."""
        return mesh[MESH_AXES] if mesh is not None and self.pp_enabled else mesh

    def dp_rank(self, mesh: DeviceMesh | None) -> int:
        """This rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
        if mesh is None:
            return 0
        coordinate = mesh.get_coordinate()
        assert coordinate is not None  # None only on a rank outside the mesh; every rank is in its own
        *_, replicate, shard = coordinate
        return replicate * self.dp_shard + shard
