"""FSDP2 (``fully_shard``) per decoder layer, then the root; HSDP when given a 2-D mesh."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: compute in the parameters' own dtype


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    units: Iterable[nn.Module],
    param_dtype: str,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> nn.Module:
    """Shard ``model`` in place: each of ``units`` (its decoder layers, from the model protocol) is its own
    unit, the root holds the rest.

    A 1-D ``mesh`` shards (FSDP); a 2-D ``(replicate, shard)`` mesh shards over the inner axis and
    replicates over the outer one (HSDP). Parameters become DTensors: build the optimizer after
    this, and prepare QAT before it. Gradients are reduced in fp32 whatever ``param_dtype`` is.
    """
    assert mesh.ndim in (1, 2), f"FSDP needs a 1-D or (replicate, shard) mesh, got {mesh}"
    assert param_dtype in PARAM_DTYPES, f"param_dtype must be one of {list(PARAM_DTYPES)}, got {param_dtype}"
    options: dict[str, Any] = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy(),
    )
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model
