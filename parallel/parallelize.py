"""``parallelize``: the recipe that turns a built (and QAT-prepared) module into its data-parallel form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from parallel.ddp import apply_ddp
from parallel.fsdp import apply_fsdp
from parallel.mesh import REPLICATE_AXIS, SHARD_AXIS, ParallelDims

if TYPE_CHECKING:
    from trainer.config import ParallelConfig


def parallelize(
    model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig, units: Iterable[nn.Module] = ()
) -> nn.Module:
    """Apply FSDP2 / HSDP (in place, each of ``units`` its own FSDP unit) or DDP (a wrapper) to ``model``;
    return the module to train with.

    Call after QAT is prepared and before the optimizer is built. Under FSDP2 the returned
    module is ``model`` itself (now holding DTensor shards); under DDP it wraps ``model``, whose
    parameters stay the ones to checkpoint, prune and export. One rank: ``model`` unchanged.
    """
    if dims.fsdp_enabled:
        assert mesh is not None, "FSDP needs a mesh"
        dp_mesh = mesh[(REPLICATE_AXIS, SHARD_AXIS)] if dims.hsdp_enabled else mesh[SHARD_AXIS]
        return apply_fsdp(
            model,
            dp_mesh,
            units=units,
            param_dtype=cfg.param_dtype,
            reshard_after_forward=cfg.reshard_after_forward,
            cpu_offload=cfg.cpu_offload,
        )
    if dims.ddp_enabled:
        assert mesh is not None, "DDP needs a mesh"
        return apply_ddp(model, mesh[REPLICATE_AXIS])
    return model


@contextlib.contextmanager
def no_gradient_sync(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Accumulate gradients locally in the backward passes inside; the first backward after it reduces.

    DDP: ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` (unsharded gradients accumulate,
    one reduce-scatter at the end). Other modules: nothing to do.
    """
    with contextlib.ExitStack() as stack:
        for module in modules:
            if isinstance(module, DistributedDataParallel):
                stack.enter_context(module.no_sync())
            elif isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(False)
                stack.callback(module.set_requires_gradient_sync, True)
        yield
