"""How the student runs on this rank: one runtime for data-parallel students (one process, DDP, FSDP2, HSDP) and
one for pipelined ones, behind one interface the loop uses (forward-backward of a step, clipping, evaluation
logits, the whole student for export, compression counts, the end-of-run consistency check)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from parallel.collectives import PairwiseGradients, dp_mean, dp_sum
from parallel.ddp import assert_replicas_equal
from parallel.mesh import REPLICATE_AXIS, ParallelDims
from parallel.parallelize import no_gradient_sync, parallelize
from parallel.pipeline import Pipeline, build_pipeline
from trainer import data
from trainer.checkpoint import STUDENT
from trainer.config import DistillConfig, ParallelConfig, TrainConfig
from trainer.distill.features import FeatureDistiller
from trainer.distill.fused import FUSED_CHUNK_SIZE, fused_logit_losses
from trainer.distill.interface import Teacher, TeacherOutput
from trainer.distill.losses import logit_losses
from trainer.distill.on_policy import OnPolicy, summarize
from trainer.models.protocol import HeadFn, ModelFamily, fuses_head

if TYPE_CHECKING:
    from trainer.compress import Compressor
    from trainer.compress.stats import ParamCounts

# (student, compressor) over full tensors: how a runtime hands the whole student to the export (rank 0).
WholeStudent = tuple[nn.Module | None, "Compressor | None"]


@dataclass(frozen=True)
class Layout:
    """Where the student's steps run: its parallel sizes and mesh, the device, this rank's batches, and the
    autocast context of the forward passes."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    device: torch.device
    batches: data.Batches
    autocast: Any


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); a tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class StudentRuntime(ABC):
    """The student as it runs here. ``trainable`` is what the optimizer steps and checkpoints hold (the student,
    or this rank's stages, and any feature projections); ``student`` its student part."""

    trainable: nn.ModuleDict
    compressor: Compressor | None
    dp_mesh: DeviceMesh | None  # the ranks that hold the same part of the student (losses and evals sum over them)
    pipelined = False
    kd_path: str | None = None  # how logit distillation computes its logits (said once at the start of a KD run)

    @property
    def student(self) -> nn.Module:
        return self.trainable[STUDENT]

    @abstractmethod
    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward of step ``step``'s batch on this rank, gradients synced; the loss terms averaged
        over micro-batches and data-parallel ranks, the same on every rank."""

    @abstractmethod
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``nn.utils.clip_grad_norm_`` over the whole student; the total norm."""

    @abstractmethod
    def eval_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The student's logits of an evaluation batch (None on a rank that does not score it)."""

    def share_eval_sums(self, sums: torch.Tensor) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Give every rank the scoring ranks' evaluation sums (in place), after their data-parallel sum."""

    @abstractmethod
    def whole_student(self, plain_copy: Callable[[], WholeStudent], is_main: bool) -> WholeStudent:
        """(student, compressor) over full tensors on rank 0, (None, None) elsewhere (a collective). ``plain_copy``
        builds a new unsharded student with its compressor, into which a sharded one is gathered."""

    @abstractmethod
    def shard_counts(self, is_main: bool) -> dict[str, ParamCounts] | None:
        """The compression counts of the whole student summed over shards and stages, on rank 0 (a collective)."""

    @abstractmethod
    def check_consistency(self) -> str | None:
        """Raise if copies that must be identical differ (DDP replicas, tied stage weights); what was checked."""


class DataParallelRuntime(StudentRuntime):
    """One process, DDP, FSDP2 or HSDP: each rank runs the whole student on its slice of every micro-batch."""

    def __init__(
        self,
        distill: DistillConfig,
        parallel: ParallelConfig,
        train: TrainConfig,
        trainable: nn.ModuleDict,
        family: ModelFamily,
        layout: Layout,
        teacher: Teacher | None,
        compressor: Compressor | None,
    ):
        self.distill, self.trainable, self.layout = distill, trainable, layout
        self.grad_accum, self.accum_order = train.grad_accum, train.accum_order
        self.teacher, self.compressor = teacher, compressor
        self.dims, self.mesh, self.device, self.batches = layout.dims, layout.mesh, layout.device, layout.batches
        self.dp_mesh = layout.dims.dp_mesh(layout.mesh)
        self.student_layers = tuple(f.student_layer for f in distill.features)
        # Logit distillation through the student's head=fn: the loss runs inside its forward (FSDP2 gathers the
        # head's weight once per forward, as for the logits, and reduce-scatters its gradient).
        whole = teacher is not None and teacher.needs_student_logits  # another tokenizer's teacher, an ensemble
        self.fused = distill.fused and distill.loss != "none" and fuses_head(trainable[STUDENT]) and not whole
        if self.fused:
            chunk = distill.chunk_size or FUSED_CHUNK_SIZE
            teacher_side = "its head" if teacher is not None and teacher.gives_head else "its logits"
            self.kd_path = f"fused head + divergence, {chunk} tokens at a time (teacher: {teacher_side})"
        elif whole:
            self.kd_path = "full logits: the teacher is of another tokenizer or an ensemble"
        elif distill.fused and distill.loss != "none":
            self.kd_path = "full logits: the student's head cannot be fused (its family, or a fake-quantized head)"
        # On-policy distillation (distill.lmbda > 0): the student completes some rows before each micro-batch's
        # losses; with lmbda = 0 nothing of it runs.
        agree = partial(agree_span, mesh=self.dp_mesh) if layout.dims.fsdp_enabled else None
        total = partial(dp_sum, mesh=self.dp_mesh)
        on_policy = distill.lmbda > 0
        self.on_policy = OnPolicy(distill, layout.batches, total=total, agree=agree) if on_policy else None
        # The modules that run forward/backward: DDP wrappers, or the FSDP2-sharded modules themselves.
        self.modules = {
            name: parallelize(
                module,
                layout.dims,
                layout.mesh,
                parallel,
                units=family.layers(module).values() if name == STUDENT else (),
            )
            for name, module in trainable.items()
        }

    def losses(self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The loss terms of micro-batch ``micro`` of step ``step`` (inputs ``x``, labels ``y``)."""
        if self.on_policy is not None:
            assert self.teacher is not None  # preflight: on-policy distillation has a teacher
            return self.on_policy.losses(
                self.modules[STUDENT], self.student, self.teacher, x, y, step, micro, self.fused, self.layout.autocast
            )
        t_out = self.teacher(x, step, micro) if self.teacher is not None else None
        student = self.modules[STUDENT]
        if self.fused:
            assert t_out is not None  # a KD loss has a teacher
            head = partial(fused_logit_losses, y=y, teacher=t_out, d=self.distill)
            s_out = student(x, hidden_layers=self.student_layers, head=head)
            out, s_hidden = s_out if self.student_layers else (s_out, None)
        else:
            s_out = student(x, hidden_layers=self.student_layers)
            logits, s_hidden = s_out if self.student_layers else (s_out, None)
            out = logit_losses(logits, y, t_out, self.distill)
        if s_hidden is not None:
            assert t_out is not None  # feature distillation runs with a live teacher
            feat, parts = self.modules["features"](s_hidden, t_out.hidden)
            out.update(parts)
            out["distill/features"] = feat
            out["train/loss"] = out["train/loss"] + feat
        return out

    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        accum = self.grad_accum
        totals: dict[str, torch.Tensor] = {}
        pairwise = PairwiseGradients(list(self.trainable.parameters())) if self.accum_order == "pairwise" else None
        for micro in range(accum):
            x, y = self.batches.train(step, micro)
            last = micro == accum - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.modules.values()):
                with self.layout.autocast:
                    parts = self.losses(x, y, step, micro)
                    # masked labels: the global batch's mean (on-policy: each part scales itself to its global mean)
                    scale = self.batches.loss_scale(step, micro) if self.on_policy is None else 1.0
                    if scale != 1.0:
                        parts = {key: value * scale for key, value in parts.items()}
                (parts["train/loss"] / accum).backward()
            if pairwise:
                pairwise.push()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / accum
        if pairwise:
            pairwise.finish()
        totals = dp_mean(totals, self.dp_mesh)
        if self.on_policy is not None:
            stats = dp_sum(self.on_policy.pop_stats().to(self.device), self.dp_mesh)
            totals.update(summarize(stats, self.dp_mesh.size() if self.dp_mesh is not None else 1))
        return totals

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return full_tensor(nn.utils.clip_grad_norm_(self.trainable.parameters(), max_norm))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def whole_student(self, plain_copy: Callable[[], WholeStudent], is_main: bool) -> WholeStudent:
        """Without sharding, the live ones. Under FSDP2 the sharded state streams into a plain copy on rank 0, one
        tensor at a time (rank 0 holds one full model, never a second)."""
        if not self.dims.fsdp_enabled:
            return (self.student, self.compressor) if is_main else (None, None)
        student, compressor = plain_copy() if is_main else (None, None)
        target = student.state_dict() if student is not None else None
        for name, tensor in self.student.state_dict().items():
            whole = full_tensor(tensor.detach().to(self.device))  # CPU-offloaded shards gather on the device
            if target is not None:
                target[name].copy_(whole)
        compress_state = _full_compress_state(self.compressor)
        if compressor:
            assert compress_state is not None  # the copy has a compressor when the live student has one
            compressor.load_state_dict(compress_state)
        return student, compressor

    def shard_counts(self, is_main: bool) -> dict[str, ParamCounts] | None:
        assert self.compressor is not None  # asked only of a compressed student
        counts = self.compressor.shard_counts()
        return counts if is_main else None

    def check_consistency(self) -> str | None:
        if not self.dims.ddp_enabled:
            return None
        assert self.mesh is not None  # DDP runs on a device mesh
        assert_replicas_equal(self.trainable, self.mesh[REPLICATE_AXIS])
        return f"ddp: parameters identical on all {self.dims.dp_replicate} ranks"


class PipelineLoss:
    """The pipeline's loss on the last stage, per micro-batch: the teacher's output, then ``logit_losses``.

    The target packs the micro-batch's tokens and labels as ``[rows, tokens, 2]``, so the teacher runs on the
    micro-batch the student saw, as the data-parallel runtime does under accumulation. Returns the loss over
    ``microbatches`` (the pipeline does not rescale gradients) and keeps the step's averaged terms.

    Fused, the loss runs inside the last stage's forward instead: ``queue`` takes the step's tokens and labels,
    ``next_head`` gives the stage each micro-batch's head function in turn (``fused_logit_losses``, the teacher's
    output computed then), and the stage's output is the loss itself.
    """

    def __init__(self, teacher: Teacher | None, distill: DistillConfig, microbatches: int, fused: bool):
        self.teacher, self.distill, self.microbatches, self.fused = teacher, distill, microbatches, fused
        self.keys = ["train/ce", "train/loss"] + (["distill/kd"] if distill.loss != "none" else [])
        self.totals: dict[str, torch.Tensor] = {}
        self.pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return output.sum() / self.microbatches  # the stage's forward computed and recorded it, as [1]
        x, y = target.unbind(-1)
        t_out = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = TeacherOutput(logits=self.teacher.eval_logits(x))
        return self.record(logit_losses(output, y, t_out, self.distill))

    def record(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add a micro-batch's terms to the step's; its loss."""
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value.detach() / self.microbatches
        return parts["train/loss"] if self.fused else parts["train/loss"] / self.microbatches

    def queue(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The step's tokens and labels, split into micro-batches as the schedule splits its inputs."""
        assert not self.pending, "the previous step left micro-batches unused"
        self.pending.extend(zip(x.tensor_split(self.microbatches), y.tensor_split(self.microbatches)))

    def next_head(self) -> HeadFn | None:
        """The next queued micro-batch's head function (None when nothing is queued: an evaluation forward)."""
        if not self.pending:
            return None
        x, y = self.pending.popleft()
        assert self.teacher is not None  # a fused loss is a KD loss
        t_out = self.teacher(x, -1, -1)
        fused = partial(fused_logit_losses, y=y, teacher=t_out, d=self.distill)
        return lambda hidden, weight, bias, **options: self.record(fused(hidden, weight, bias, **options))

    def pop_totals(self) -> dict[str, torch.Tensor]:
        """The terms averaged over the micro-batches since the last call."""
        totals, self.totals = self.totals, {}
        return totals


class PipelineRuntime(StudentRuntime):
    """Pipeline stages (x data parallelism inside each): the schedule splits this rank's rows into micro-batches,
    the last stage computes the losses with the teacher replicated there."""

    pipelined = True

    def __init__(
        self,
        distill: DistillConfig,
        parallel: ParallelConfig,
        batch_size: int,
        student: nn.Module,
        family: ModelFamily,
        layout: Layout,
        teacher: Teacher | None,
        compressor: Compressor | None,
    ):
        assert layout.mesh is not None  # a pipeline runs on a device mesh
        dims, mesh, device, batches = layout.dims, layout.mesh, layout.device, layout.batches
        self.layout = layout
        self.dims, self.mesh, self.device, self.batches = dims, mesh, device, batches
        self.dp_mesh = dims.dp_mesh(mesh)
        # Fused, the loss runs inside the last stage's forward (FSDP2 gathers the head's weight there, as in the
        # data-parallel runtime); the teacher, replicated on the last stage, gives its head's input when it can.
        fused = distill.fused and distill.loss != "none" and fuses_head(student)
        self.loss = PipelineLoss(teacher, distill, parallel.microbatches, fused)
        rows = batch_size // (dims.dp_size * parallel.microbatches)
        self.pipeline: Pipeline = build_pipeline(
            student,
            family,
            dims,
            mesh,
            parallel,
            loss_fn=self.loss,
            microbatch=(rows, batches.tokens_per_sample),
            device=device,
            next_head=self.loss.next_head if fused else None,
        )
        if fused:
            assert teacher is not None  # a KD loss has a teacher
            chunk = distill.chunk_size or FUSED_CHUNK_SIZE
            teacher_side = "its head" if teacher.gives_head else "its logits"
            self.kd_path = (
                f"fused head + divergence on the last stage, {chunk} tokens at a time (teacher: {teacher_side})"
            )
        elif distill.fused and distill.loss != "none":
            self.kd_path = "full logits: the student's head cannot be fused (its family, or a fake-quantized head)"
        # From here on the student is this rank's stages; the compressor covers their parameters.
        self.trainable = nn.ModuleDict({STUDENT: self.pipeline.part})
        self.compressor = compressor.for_part(self.pipeline.part) if compressor else None

    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        x, y = self.batches.train(step)
        if self.loss.fused and self.pipeline.has_last:
            self.loss.queue(x, y)
        with self.layout.autocast:
            self.pipeline.step(x, target=torch.stack([x, y], dim=-1))
        self.pipeline.sync_tied_grads()
        keys = self.loss.keys
        if self.pipeline.has_last:
            totals = dp_mean(self.loss.pop_totals(), self.dp_mesh)
            values = torch.stack([totals[key].float() for key in keys])
        else:
            values = torch.zeros(len(keys), device=self.device)
        return dict(zip(keys, self.pipeline.broadcast_from_last(values).unbind()))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.pipeline.clip_grad_norm_(max_norm)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.pipeline.forward(x)

    def share_eval_sums(self, sums: torch.Tensor) -> None:
        self.pipeline.broadcast_from_last(sums)

    def whole_student(self, plain_copy: Callable[[], WholeStudent], is_main: bool) -> WholeStudent:
        """The stages' states, gathered to rank 0's CPU and loaded into a plain copy of the student there."""
        student, compressor = plain_copy() if is_main else (None, None)
        state = {name: full_tensor(tensor).detach().cpu() for name, tensor in self.student.state_dict().items()}
        compress_state = _full_compress_state(self.compressor)
        first_replica = self.batches.shard.rank == 0
        stages = self.pipeline.gather_to_first((state, compress_state)) if first_replica else None
        if not is_main:
            return None, None
        assert student is not None and stages is not None  # rank 0 has a plain copy and is a first replica
        student.load_state_dict({name: tensor for stage_state, _ in stages for name, tensor in stage_state.items()})
        if compressor:  # steps and schedule positions are the same on every stage
            assert compress_state is not None  # the copy has a compressor when the live student has one
            compress_state["masks"] = {name: mask for _, stage in stages for name, mask in stage["masks"].items()}
            compressor.load_state_dict(compress_state)
        return student, compressor

    def shard_counts(self, is_main: bool) -> dict[str, ParamCounts] | None:
        assert self.compressor is not None  # asked only of a compressed student
        counts = self.compressor.shard_counts()
        stages = self.pipeline.gather_to_first(counts) if self.batches.shard.rank == 0 else None
        if not is_main:
            return None
        assert stages is not None  # rank 0 is a first replica
        merged: dict[str, ParamCounts] = {}
        for stage in stages:  # the tied embedding is on the first and the last stage: counted once
            for name, param_counts in stage.items():
                merged.setdefault(name, param_counts)
        return merged

    def check_consistency(self) -> str | None:
        self.pipeline.assert_tied_weights_equal()
        tied = self.pipeline.tied
        return f"pipeline: tied {', '.join(tied)} identical on the first and the last stage" if tied else None


def agree_span(first: int, last: int, mesh: DeviceMesh | None) -> tuple[int, int]:
    """The smallest ``first`` and the largest ``last`` over the data-parallel ranks of ``mesh`` (a collective)."""
    span = torch.tensor([-first, last], dtype=torch.int64, device=mesh.device_type if mesh is not None else "cpu")
    if mesh is not None:
        for axis in range(mesh.ndim):
            if mesh.size(axis) > 1:
                torch.distributed.all_reduce(span, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group(axis))
    return -int(span[0]), int(span[1])


def _full_compress_state(compressor: Compressor | None) -> dict | None:
    """The compressor's state with its masks gathered whole (a collective under FSDP2) and on the CPU."""
    if compressor is None:
        return None
    state = compressor.state_dict()
    state["masks"] = {name: full_tensor(mask).cpu() for name, mask in state["masks"].items()}
    return state


def build_runtime(
    distill: DistillConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    student: nn.Module,
    family: ModelFamily,
    features: FeatureDistiller | None,
    layout: Layout,
    teacher: Teacher | None,
    compressor: Compressor | None,
) -> StudentRuntime:
    """The runtime of ``layout``'s parallel sizes (``parallel``: its settings), training with ``distill``'s losses on
    ``train``'s batches. Call after QAT is prepared and before the optimizer exists."""
    if layout.dims.pp_enabled:
        return PipelineRuntime(distill, parallel, train.batch_size, student, family, layout, teacher, compressor)
    trainable = nn.ModuleDict({STUDENT: student, **({"features": features} if features is not None else {})})
    return DataParallelRuntime(distill, parallel, train, trainable, family, layout, teacher, compressor)
