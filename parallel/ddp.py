"""DDP over the ``dp_replicate`` axis: replicated parameters, gradients all-reduced in backward."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> DistributedDataParallel:
    """Wrap ``model`` in DDP over the 1-D ``mesh``.

    No ``static_graph``: with it, ``no_sync()`` in the first iteration crashes or skips the
    all-reduce (pytorch issue 143580), and accumulation uses ``no_sync()`` from step one.
    """
    assert mesh.ndim == 1, f"DDP needs a 1-D mesh, got {mesh}"
    return DistributedDataParallel(model, device_mesh=mesh)


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``named_parameters()`` order."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def assert_replicas_equal(model: nn.Module, mesh: DeviceMesh) -> None:
    """Raise unless every rank of ``mesh`` holds bit-identical parameters (a collective)."""
    digests: list[str | None] = [None] * mesh.size()
    dist.all_gather_object(digests, parameter_digest(model), group=mesh.get_group())
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: parameter digests differ across ranks {digests}")
