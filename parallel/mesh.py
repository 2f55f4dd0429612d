"""Data-parallel sizes (``ParallelDims``) and the DeviceMesh they describe.

The mesh always has two named axes, ``dp_replicate`` (outer) and ``dp_shard`` (inner), either
of size 1: DDP replicates over ``dp_replicate``, FSDP2 shards over ``dp_shard`` and HSDP does
both. Every rank is a data-parallel rank, so the data shard is the rank's place in the flattened
``(dp_replicate, dp_shard)`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

REPLICATE_AXIS = "dp_replicate"
SHARD_AXIS = "dp_shard"
MESH_AXES = (REPLICATE_AXIS, SHARD_AXIS)
INFER = -1


class ParallelDimsError(ValueError):
    """Sizes that cannot form a mesh; ``field`` names the ``ParallelDims`` field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel sizes over ``world_size`` ranks; ``-1`` in one of them means "the rest"."""

    dp_replicate: int
    dp_shard: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard"):
            size = getattr(self, name)
            if size != INFER and size < 1:
                raise ParallelDimsError(name, f"must be >= 1 or -1 (infer) (got {size})")
        if self.dp_replicate == INFER and self.dp_shard == INFER:
            raise ParallelDimsError("dp_shard", "only one of dp_replicate and dp_shard may be -1 (infer)")
        if INFER in (self.dp_replicate, self.dp_shard):
            known_name, known = (("dp_replicate", self.dp_replicate) if self.dp_shard == INFER
                                 else ("dp_shard", self.dp_shard))
            inferred_name = "dp_shard" if self.dp_shard == INFER else "dp_replicate"
            if self.world_size % known:
                raise ParallelDimsError(inferred_name, f"-1 (infer) needs the world size {self.world_size} "
                                        f"to be divisible by {known_name}={known}")
            object.__setattr__(self, inferred_name, self.world_size // known)
        if self.dp_replicate * self.dp_shard != self.world_size:
            raise ParallelDimsError(
                "dp_shard" if self.dp_shard != 1 else "dp_replicate",
                f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} = "
                f"{self.dp_replicate * self.dp_shard} ranks, but the world size is {self.world_size}")

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

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The ``(dp_replicate, dp_shard)`` mesh; None for one rank (no process group needed)."""
        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=MESH_AXES)

    def dp_rank(self, mesh: DeviceMesh | None) -> int:
        """This rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
        if mesh is None:
            return 0
        replicate, shard = mesh.get_coordinate()
        return replicate * self.dp_shard + shard
