"""The teacher as a placement over the mesh: one callable the loop asks for a micro-batch's teacher output.

- ``replicate``: a whole frozen copy on every rank.
- ``shard``: FSDP2 over every data-parallel rank (one flat axis), frozen, forward only, parameters resharded
  after each forward, so a rank holds about 1/N of the teacher between forwards.
- ``cache``: no model; top-k logits written by ``python -m trainer.cache``, read by (step, rows of the batch).
- ``remote``: the teacher on ranks of its own (``parallel.remote``); this rank sends inputs, receives logits.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims
from parallel.remote import RemoteClient, Roles

if TYPE_CHECKING:
    from trainer.config import RunConfig
    from trainer.data import Shard
    from trainer.distill.cache import CacheReader

TEACHER_AXIS = "teacher_dp"


@dataclass
class TeacherOutput:
    """Full logits ``[..., V]`` (live teachers) or a top-k ``(raw logit values, vocabulary indices)`` pair, each
    ``[..., k]`` (a cache); hidden states by layer when asked for."""

    logits: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    hidden: dict[int, torch.Tensor] | None = None


class Teacher(ABC):
    """``teacher(x, step, micro)``: the teacher's output for micro-batch ``micro`` of step ``step`` (input ``x``).

    ``module`` is the live model (None for a cache). Every call adds to the time the student waited on it
    (on a GPU the call synchronizes, so that is the teacher's compute, not its kernel launches).
    """

    placement: str
    module: nn.Module | None = None

    def __init__(self) -> None:
        self.wait_seconds = 0.0

    def __call__(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        start = time.perf_counter()
        out = self.forward(x, step, micro)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.wait_seconds += time.perf_counter() - start
        return out

    @abstractmethod
    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        """The teacher's output for micro-batch ``micro`` of step ``step`` (inputs ``x``)."""

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's full logits of an evaluation batch ``x`` (not timed; a live or remote teacher only)."""
        return self.forward(x, -1, -1).logits

    def close(self) -> None:
        """Release what the teacher holds beyond the run (remote: tell the teacher rank this student is done)."""

    def pop_wait_seconds(self) -> float:
        """Seconds spent in the teacher since the last call."""
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited


class LiveTeacher(Teacher):
    """A frozen model in memory (``replicate`` or ``shard``); ``step`` and ``micro`` are not needed."""

    def __init__(self, module: nn.Module, placement: str, hidden_layers: tuple[int, ...] = ()):
        super().__init__()
        self.module, self.placement, self.hidden_layers = module, placement, hidden_layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        out = self.module(x, hidden_layers=self.hidden_layers)
        logits, hidden = out if self.hidden_layers else (out, None)
        return TeacherOutput(logits=logits, hidden=hidden)


class CachedTeacher(Teacher):
    """Top-k logits read from a cache: the rows of the step's global batch that ``shard`` reads in ``micro``."""

    placement = "cache"

    def __init__(self, reader: CacheReader, shard: Shard):
        super().__init__()
        self.reader, self.shard = reader, shard

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        from trainer.data import local_slice

        rows = local_slice(torch.arange(self.reader.manifest.key.batch_size), self.shard, micro)
        values, indices, _ = self.reader.read(step, rows)
        tokens = x.shape[:1] if x.is_floating_point() else x.shape  # features: one prediction per sample
        values, indices = (t.reshape(*tokens, -1).to(x.device, non_blocking=True) for t in (values, indices))
        return TeacherOutput(topk=(values, indices))

class RemoteTeacher(Teacher):
    """Logits from a dedicated teacher rank; the next training micro-batch's are requested ahead (see
    ``parallel.remote``). ``step`` -1 marks an evaluation batch."""

    placement = "remote"

    def __init__(self, client: RemoteClient):
        super().__init__()
        self.client = client

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        return TeacherOutput(logits=self.client.logits(x, None if step < 0 else (step, micro)))

    def close(self) -> None:
        self.client.close()


def load_sharded_export(cfg: RunConfig, shard: Callable[[nn.Module], nn.Module], device: torch.device) -> nn.Module:
    """A dense GPT export as a frozen FSDP2-sharded teacher, never whole on any rank: built on the meta device,
    sharded by ``shard``, then each parameter's local rows read from the safetensors file."""
    from trainer import models
    from trainer.distill import teacher as teacher_io

    folder = teacher_io.resolve(cfg.teacher.checkpoint)[1]
    with torch.device("meta"):
        module = models.build_from_spec(models.read_export_config(folder))
    shard(module)
    module.to_empty(device=device)
    with safe_open(str(folder / models.WEIGHTS_FILE), framework="pt") as weights, torch.no_grad():
        for name, param in module.named_parameters():  # a tied weight once, under the name it is stored by
            local = param.to_local() if isinstance(param, DTensor) else param
            start = local_row_offset(param)
            local.copy_(weights.get_slice(name)[start:start + local.shape[0]])
    sliced = teacher_io.slice_vocabulary(module, cfg.teacher.checkpoint, teacher_io.run_vocab_size(cfg))
    return teacher_io.freeze(sliced, device)


def local_row_offset(param: torch.Tensor) -> int:
    """The first row of ``param``'s local shard: FSDP2 splits dim 0 like ``torch.chunk`` over its shard ranks."""
    if not isinstance(param, DTensor):
        return 0
    (placement,), mesh = param.placements, param.device_mesh
    assert placement.is_shard(0), f"expected a dim-0 shard, got {placement}"
    rows_per_rank = -(-param.shape[0] // mesh.size())
    return min(mesh.get_local_rank() * rows_per_rank, param.shape[0])


def teacher_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """One flat axis over every data-parallel rank (DDP's replicas and FSDP's shards alike)."""
    assert not dims.pp_enabled, "a sharded teacher spans the data-parallel ranks only (no pipeline stages)"
    return init_device_mesh(device_type, (dims.dp_size,), mesh_dim_names=(TEACHER_AXIS,))


def build_teacher(cfg: RunConfig, dims: ParallelDims, device: torch.device, shard: Shard, vocab: int,
                  next_input: Callable[[tuple], tuple[tuple, torch.Tensor] | None]) -> Teacher:
    """The teacher of ``cfg.teacher.placement``, ready to call; the hidden layers are those feature losses use.

    A remote teacher asks ``next_input((step, micro))`` for the micro-batch after ``(step, micro)`` to request
    it ahead; its logits have ``vocab`` entries.
    """
    from trainer.distill import cache
    from trainer.distill import teacher as teacher_io

    placement = cfg.teacher.placement
    if placement == "remote":
        roles = Roles(dist.get_world_size(), cfg.parallel.teacher_ranks)
        return RemoteTeacher(RemoteClient(roles.server_of(dist.get_rank()), vocab, next_input))
    if placement == "cache":
        manifest = cache.check(cfg)
        return CachedTeacher(cache.CacheReader(Path(cfg.teacher.cache_dir), manifest), shard)
    if placement == "shard":
        mesh = teacher_mesh(dims, device.type)
        shard = functools.partial(apply_fsdp, mesh=mesh, param_dtype=cfg.teacher.param_dtype,
                                  reshard_after_forward=True, cpu_offload=False)
        module = load_sharded_export(cfg, shard, device) if teacher_io.is_dense_gpt_export(cfg.teacher.checkpoint) \
            else shard(teacher_io.load_for_run(cfg, device))
    else:
        module = teacher_io.load_for_run(cfg, device)
    return LiveTeacher(module, placement, tuple(f.teacher_layer for f in cfg.distill.features))
