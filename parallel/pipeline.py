"""Pipeline parallelism for a GPT student: stages split at block boundaries, run by a torch.distributed.pipelining schedule.

Stage ``s`` of ``S = pp * stages_per_rank`` holds a contiguous run of blocks; the first stage also holds
the embeddings, the last ``ln_f`` and the head. Stage ``s`` runs on pipeline rank ``s % pp`` (one stage per
rank, or interleaved), so the first stage is on pipeline rank 0 and the last on pipeline rank ``pp - 1``.

Modules keep their GPT names (``blocks.3.attn.qkv``: a stage's blocks are a dict keyed by block index),
so a rank's stages together (``Pipeline.part``) name their parameters as the whole student does:
compression targets and masks, optimizer state and checkpoint keys are those of an unsplit run, and a
checkpoint written with one layout loads into another.

The head's weight is tied to ``tok_emb``. The last stage holds a replica of ``tok_emb`` (named
``tok_emb`` too and unused in its forward; the head reads its weight), the first stage the original.
Every step ``sync_tied_grads`` sums the two gradients across the pair and both copies take the same
optimizer step, so they stay identical (``assert_tied_weights_equal``) and checkpoints and exports hold
one ``tok_emb.weight``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from parallel.fsdp import PARAM_DTYPES
from parallel.mesh import PP_AXIS, ParallelDims
from parallel.parallelize import parallelize

if TYPE_CHECKING:
    from trainer.config import ParallelConfig

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
TIED_WEIGHT = "tok_emb.weight"


def stage_blocks(n_layer: int, n_stages: int) -> list[range]:
    """The blocks of each stage: contiguous runs, as even as possible, earlier stages taking the remainder
    (the last stage also runs the head, the loss and the teacher)."""
    assert 1 <= n_stages <= n_layer, f"{n_stages} stages for {n_layer} blocks: every stage needs a block"
    size, extra = divmod(n_layer, n_stages)
    starts = [s * size + min(s, extra) for s in range(n_stages + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


class GPTStage(nn.Module):
    """Some consecutive blocks of a GPT under their GPT names; the first stage embeds tokens, the last
    returns logits. Its modules are the GPT's own (not copies): build stages from one GPT per process."""

    def __init__(self, gpt: nn.Module, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first or last:
            self.tok_emb = gpt.tok_emb  # on the last stage: the replica whose weight the head reads
        if first:
            self.pos_emb, self.drop = gpt.pos_emb, gpt.drop
        self.blocks = nn.ModuleDict({str(i): gpt.blocks[i] for i in blocks})
        if last:
            self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


def merge_stages(stages: list[GPTStage]) -> nn.Module:
    """A rank's stages as one module under GPT names (the stage itself when there is one)."""
    if len(stages) == 1:
        return stages[0]
    part = nn.Module()
    part.blocks = nn.ModuleDict()
    for stage in stages:
        for name, child in stage.named_children():
            if name == "blocks":
                part.blocks.update(child)
            else:
                part.add_module(name, child)
    return part


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@dataclass
class Pipeline:
    """This rank's stages of the student and the schedule that runs them; collectives over ``group``."""

    part: nn.Module  # this rank's stages as one module, under the student's parameter names
    stage_indices: list[int]
    modules: list[nn.Module]  # the stages as they run (FSDP2-sharded or DDP-wrapped over the data-parallel ranks)
    schedule: Any  # a torch.distributed.pipelining schedule
    group: dist.ProcessGroup  # the pipeline ranks of this replica, in stage-rank order
    n_stages: int
    param_names: list[str]  # the whole student's parameters in its own order (the order of the grad norm)
    width: int  # the residual stream's width (what one stage sends the next)
    activation_dtype: torch.dtype

    @property
    def ranks(self) -> list[int]:
        """Global ranks of the pipeline ranks, by stage rank."""
        return dist.get_process_group_ranks(self.group)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_indices

    def step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Forward and backward of this rank's batch: ``x`` feeds the first stage, ``target`` the loss on the last."""
        args = (x.contiguous(),) if self.has_first else ()  # the layout the stage was declared with
        self.schedule.step(*args, target=target if self.has_last else None)

    def sync_tied_grads(self) -> None:
        """Sum the gradients of ``tok_emb.weight`` on the first stage and of its replica on the last (a collective
        of the pair; both then hold the same bits, as addition is commutative)."""
        if self.has_first == self.has_last:
            return
        grad = _local(self.part.get_parameter(TIED_WEIGHT).grad)
        peer = self.ranks[-1] if self.has_first else self.ranks[0]
        received = torch.empty_like(grad)
        ops = [dist.P2POp(dist.isend, grad, peer, self.group), dist.P2POp(dist.irecv, received, peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        grad.add_(received)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``nn.utils.clip_grad_norm_`` over the whole student (the tied weight once); returns the total norm.

        Each stage computes the norms of its own gradients; a sum over the pipeline ranks of vectors that are
        zero elsewhere puts them in the student's parameter order, and the total is the norm of that vector,
        which is how ``clip_grad_norm_`` computes it in one process.
        """
        params = dict(self.part.named_parameters())
        owned = [i for i, name in enumerate(self.param_names)
                 if name in params and (name != TIED_WEIGHT or self.has_first)]
        norms = torch.zeros(len(self.param_names), device=params[self.param_names[owned[0]]].device)
        local_norms = torch._foreach_norm([params[self.param_names[i]].grad for i in owned])
        norms[owned] = torch.stack([_full(norm) for norm in local_norms])
        dist.all_reduce(norms, group=self.group)
        total = torch.linalg.vector_norm(norms)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for param in params.values():
            if param.grad is not None:
                _local(param.grad).mul_(scale)
        return total

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Give every pipeline rank the last stage's ``tensor`` (in place); returns it."""
        dist.broadcast(tensor, src=self.ranks[-1], group=self.group)
        return tensor

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Logits of the whole batch ``x`` on the rank of the last stage, None elsewhere (forward only).

        Stages run in order, each sending its activations to the next; every rank passes the same ``x``.
        """
        pp = len(self.ranks)
        out = None
        for index, module in zip(self.stage_indices, self.modules):
            if index == 0:
                hidden = x
            else:
                hidden = torch.empty(*x.shape, self.width, dtype=self.activation_dtype, device=x.device)
                dist.recv(hidden, src=self.ranks[(index - 1) % pp], group=self.group)
            out = module(hidden)
            if index < self.n_stages - 1:
                dist.send(out.contiguous(), dst=self.ranks[(index + 1) % pp], group=self.group)
        return out if self.has_last else None

    def gather_to_first(self, value: Any) -> list[Any] | None:
        """Every pipeline rank's ``value`` (picklable), by stage rank, on the first pipeline rank; None elsewhere."""
        gathered = [None] * len(self.ranks) if self.has_first else None
        dist.gather_object(value, gathered, dst=self.ranks[0], group=self.group)
        return gathered

    def assert_tied_weights_equal(self) -> None:
        """Raise unless ``tok_emb.weight`` on the first stage and its replica on the last hold the same bits."""
        digest = None
        if self.has_first or self.has_last:
            weight = _local(self.part.get_parameter(TIED_WEIGHT)).detach().cpu().contiguous()
            digest = hashlib.sha256(weight.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        digests: list[str | None] = [None] * len(self.ranks)
        dist.all_gather_object(digests, digest, group=self.group)
        if digests[0] != digests[-1]:
            raise RuntimeError(f"pipeline: the tied {TIED_WEIGHT} differs between the first and the last stage")


def build_pipeline(student: nn.Module, dims: ParallelDims, mesh: DeviceMesh, cfg: ParallelConfig, *,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], microbatch: tuple[int, int],
                   device: torch.device) -> Pipeline:
    """Split ``student`` (a GPT built, and QAT-prepared, the same way on every rank) into this rank's stages,
    apply data parallelism to each, and build the schedule. Call before the optimizer exists.

    ``loss_fn(logits, target)`` runs on the last stage for each micro-batch and returns what to backpropagate
    (scaled by the caller: gradients are not rescaled). ``microbatch`` is (rows, tokens) of one micro-batch.
    """
    assert dims.pp_enabled and mesh is not None, "a pipeline needs pp > 1 and a mesh"
    pp_mesh = mesh[PP_AXIS]
    param_names = [name for name, _ in student.named_parameters()]  # before sharding replaces only some ties
    n_stages = dims.pp * cfg.stages_per_rank
    blocks = stage_blocks(len(student.blocks), n_stages)
    indices = list(range(pp_mesh.get_local_rank(), n_stages, dims.pp))
    stages = [GPTStage(student, blocks[s], first=s == 0, last=s == n_stages - 1) for s in indices]
    part = merge_stages(stages)
    modules = [parallelize(stage, dims, mesh, cfg) for stage in stages]
    width, vocab = student.tok_emb.embedding_dim, student.tok_emb.num_embeddings
    activation_dtype = (PARAM_DTYPES[cfg.param_dtype] if dims.fsdp_enabled else None) or torch.float32

    def meta(*shape: int, dtype: torch.dtype = activation_dtype) -> torch.Tensor:
        """What a stage receives or returns (static, so the schedule infers nothing); activations carry gradients."""
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    rows, tokens = microbatch
    pipeline_stages = [
        PipelineStage(module, s, n_stages, device, group=pp_mesh.get_group(),
                      input_args=meta(rows, tokens, dtype=torch.long) if s == 0 else meta(rows, tokens, width),
                      output_args=meta(rows, tokens, vocab) if s == n_stages - 1 else meta(rows, tokens, width))
        for s, module in zip(indices, modules)
    ]
    schedule_cls = SCHEDULES[cfg.pp_schedule]
    schedule = schedule_cls(pipeline_stages if schedule_cls is ScheduleInterleaved1F1B else pipeline_stages[0],
                            n_microbatches=cfg.microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(part=part, stage_indices=indices, modules=modules, schedule=schedule, group=pp_mesh.get_group(),
                    n_stages=n_stages, param_names=param_names, width=width,
                    activation_dtype=activation_dtype)
