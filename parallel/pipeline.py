"""Pipeline parallelism for a student: stages split at decoder-layer boundaries, run by a
torch.distributed.pipelining schedule.

Stage ``s`` of ``S = pp * stages_per_rank`` holds a contiguous run of layers; the first stage also holds
the embeddings, the last the final norm and the head. Stage ``s`` runs on pipeline rank ``s % pp`` (one stage
per rank, or interleaved), so the first stage is on pipeline rank 0 and the last on pipeline rank ``pp - 1``.

A stage is the student with what it does not own deleted (the model protocol's ``pipeline_stage``, as
torchtitan does it): its forward is the student's own, skipping the absent parts. Modules keep their names
(``blocks.3.attn.qkv``: the layers are a dict keyed by layer index), so a rank's stages together
(``Pipeline.part``, built the same way from all the layers it owns) name their parameters as the whole
student does: compression targets and masks, optimizer state and checkpoint keys are those of an unsplit
run, and a checkpoint written with one layout loads into another.

A tied head (GPT's reads ``tok_emb.weight``) needs the embedding on the last stage too: the last stage keeps
a replica (unused in its forward; the head reads its weight), the first the original. Every step
``sync_tied_grads`` sums the two gradients across the pair and both copies take the same optimizer step, so
they stay identical (``assert_tied_weights_equal``) and checkpoints and exports hold one copy.

A fused loss (``next_head``) runs inside the last stage's forward through the model protocol's ``head=fn``, as in
a data-parallel run: FSDP2 gathers the head's weight for that forward, and the stage returns the micro-batch's
scalar loss instead of its ``[rows, tokens, V]`` logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from parallel.fsdp import PARAM_DTYPES
from parallel.mesh import PP_AXIS, ParallelDims
from parallel.parallelize import parallelize

if TYPE_CHECKING:
    from trainer.config import ParallelConfig
    from trainer.models.protocol import HeadFn, ModelFamily


def schedule_classes() -> dict[str, type]:
    """The schedule class of each ``parallel.pp_schedule``. ``torch.distributed.pipelining`` is imported here, when
    a pipeline is built, not with this module: its import costs every process 0.7 s of CPU."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_blocks(n_layer: int, n_stages: int) -> list[range]:
    """The layers of each stage: contiguous runs, as even as possible, earlier stages taking the remainder
    (the last stage also runs the head, the loss and the teacher)."""
    assert 1 <= n_stages <= n_layer, f"{n_stages} stages for {n_layer} layers: every stage needs a layer"
    size, extra = divmod(n_layer, n_stages)
    starts = [s * size + min(s, extra) for s in range(n_stages + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def rank_stages(
    student: nn.Module, family: ModelFamily, n_stages: int, pp: int, pp_rank: int
) -> tuple[list[int], list[nn.Module], nn.Module]:
    """The stages pipeline rank ``pp_rank`` holds (stage s on rank s % pp): their indices, the stages (views of
    ``student`` sharing its modules) and the rank's part (one view holding all of them; the stage itself when
    there is one)."""
    layer_names = list(family.layers(student))
    runs = [[layer_names[i] for i in run] for run in stage_blocks(len(layer_names), n_stages)]
    indices = list(range(pp_rank, n_stages, pp))
    stages = [family.pipeline_stage(student, runs[s], first=s == 0, last=s == n_stages - 1) for s in indices]
    part = (
        stages[0]
        if len(stages) == 1
        else family.pipeline_stage(
            student, [name for s in indices for name in runs[s]], first=0 in indices, last=n_stages - 1 in indices
        )
    )
    return indices, stages, part


class LossInsideStage(nn.Module):
    """The last stage with its loss computed inside its forward: ``next_head()`` gives the head function of the
    next micro-batch (the last stage runs its forwards in micro-batch order in every schedule) and the forward
    returns what that function returns, the scalar loss, as ``[1]`` (the schedule concatenates the micro-batches'
    outputs). With none pending (evaluation) it returns logits."""

    def __init__(self, stage: nn.Module, next_head: Callable[[], HeadFn | None]):
        super().__init__()
        self.stage, self.next_head = stage, next_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.next_head()
        return self.stage(hidden) if head is None else self.stage(hidden, head=head).reshape(1)


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
    tied: list[str]  # parameters held by the first and the last stage (a tied embedding and head)
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
        """Sum the gradients of each tied weight on the first stage and of its replica on the last (a collective
        of the pair; both then hold the same bits, as addition is commutative)."""
        if self.has_first == self.has_last:
            return
        peer = self.ranks[-1] if self.has_first else self.ranks[0]
        for name in self.tied:
            tied_grad = self.part.get_parameter(name).grad
            assert tied_grad is not None  # the step's backward gave every tied weight a gradient
            grad = _local(tied_grad)
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
        owned = [
            i for i, name in enumerate(self.param_names) if name in params and (name not in self.tied or self.has_first)
        ]
        norms = torch.zeros(len(self.param_names), device=params[self.param_names[owned[0]]].device)
        # after the step's backward every owned parameter has a gradient
        grads = cast(list[torch.Tensor], [params[self.param_names[i]].grad for i in owned])
        local_norms = torch._foreach_norm(grads)
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
        """Raise unless each tied weight on the first stage and its replica on the last hold the same bits."""
        for name in self.tied:
            digest = None
            if self.has_first or self.has_last:
                weight = _local(self.part.get_parameter(name)).detach().cpu().contiguous()
                digest = hashlib.sha256(weight.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            digests: list[str | None] = [None] * len(self.ranks)
            dist.all_gather_object(digests, digest, group=self.group)
            if digests[0] != digests[-1]:
                raise RuntimeError(f"pipeline: the tied {name} differs between the first and the last stage")


def build_pipeline(
    student: nn.Module,
    family: ModelFamily,
    dims: ParallelDims,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    microbatch: tuple[int, int],
    device: torch.device,
    next_head: Callable[[], HeadFn | None] | None = None,
) -> Pipeline:
    """Split ``student`` (of ``family``, built and QAT-prepared the same way on every rank) into this rank's
    stages, apply data parallelism to each, and build the schedule. Call before the optimizer exists.

    ``loss_fn(output, target)`` runs on the last stage for each micro-batch and returns what to backpropagate
    (scaled by the caller: gradients are not rescaled); ``output`` is the logits, or with ``next_head`` the loss
    the last stage computed inside its forward (``LossInsideStage``). ``microbatch`` is (rows, tokens) of one
    micro-batch.
    """
    assert dims.pp_enabled and mesh is not None, "a pipeline needs pp > 1 and a mesh"
    pp_mesh = mesh[PP_AXIS]
    param_names = [name for name, _ in student.named_parameters()]  # before sharding replaces only some ties
    n_stages = dims.pp * cfg.stages_per_rank
    indices, stages, part = rank_stages(student, family, n_stages, dims.pp, pp_mesh.get_local_rank())
    last = n_stages - 1

    def runs(index: int, stage: nn.Module) -> nn.Module:
        """The stage as the schedule runs it: the last one with the loss inside when fused, then parallelized."""
        wrapped = LossInsideStage(stage, next_head) if index == last and next_head is not None else stage
        return parallelize(wrapped, dims, mesh, cfg, units=family.layers(stage).values())

    modules = [runs(index, stage) for index, stage in zip(indices, stages)]
    width, vocab = family.width(student), family.vocab_size(student)
    activation_dtype = (PARAM_DTYPES[cfg.param_dtype] if dims.fsdp_enabled else None) or torch.float32

    def meta(*shape: int, dtype: torch.dtype = activation_dtype) -> torch.Tensor:
        """What a stage receives or returns (static, so the schedule infers nothing); activations carry gradients."""
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    rows, tokens = microbatch
    last_output = meta(1, dtype=torch.float32) if next_head is not None else meta(rows, tokens, vocab)
    pipeline_stages = [
        PipelineStage(
            module,
            s,
            n_stages,
            device,
            group=pp_mesh.get_group(),
            input_args=meta(rows, tokens, dtype=torch.long) if s == 0 else meta(rows, tokens, width),
            output_args=last_output if s == last else meta(rows, tokens, width),
        )
        for s, module in zip(indices, modules)
    ]
    schedule_cls = schedule_classes()[cfg.pp_schedule]
    schedule = schedule_cls(
        pipeline_stages if schedule_cls is ScheduleInterleaved1F1B else pipeline_stages[0],
        n_microbatches=cfg.microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
    return Pipeline(
        part=part,
        stage_indices=indices,
        modules=modules,
        schedule=schedule,
        group=pp_mesh.get_group(),
        n_stages=n_stages,
        param_names=param_names,
        tied=family.tied_weights(student),
        width=width,
        activation_dtype=activation_dtype,
    )
