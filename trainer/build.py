"""Building a run, one part at a time in a fixed order: data, mesh, student, teacher, feature projections,
compression, the student's runtime (its parallel layout), optimizer. Every rank builds the same way, so every
rank draws the same initial weights from the seed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.env import DistEnv
from parallel.mesh import ParallelDims
from trainer import data, models
from trainer.config import ModifierConfig, RunConfig, needs_teacher, parallel_dims, sequence_length
from trainer.cut import from_teacher
from trainer.distill.features import FeatureDistiller
from trainer.distill.placement import Teacher, build_teacher
from trainer.models.protocol import ModelFamily, family_of
from trainer.preflight import student_spec
from trainer.runtime import Layout, StudentRuntime, build_runtime

if TYPE_CHECKING:
    from trainer.compress import Compressor


@dataclass
class RunParts:
    """What a run is made of, once built."""

    dataset: Any  # trainer.data.TokenData | DigitsData
    batches: data.Batches
    dims: ParallelDims
    mesh: DeviceMesh | None
    family: ModelFamily
    teacher: Teacher | None
    runtime: StudentRuntime
    optimizer: torch.optim.Optimizer
    student_spec: dict  # the student's architecture (what a checkpoint must hold)
    autocast: Any  # the context the forward passes run in (bf16 autocast, or nothing)


def build_student(cfg: RunConfig, dataset: Any) -> nn.Module:
    """A freshly initialised student of ``cfg.student``'s family (its vocabulary or input size from the data), or one
    cut out of the teacher (calibrated on ``dataset``'s training batches)."""
    if from_teacher.is_cut(cfg):
        return from_teacher.build(cfg, dataset)
    family, config = student_spec(cfg)
    return family.build(config)


def build_compressor(student: nn.Module, modifiers: list[ModifierConfig]) -> Compressor | None:
    """Masks and fake-quant on ``student`` (None without modifiers: torchao is not even imported)."""
    if not modifiers:
        return None
    from trainer.compress import build_compressor as build

    return build(student, modifiers)


def build_features(cfg: RunConfig, student: nn.Module, teacher: Teacher | None) -> FeatureDistiller | None:
    """The learned projections of feature distillation (None without feature losses)."""
    if not cfg.distill.features:
        return None
    # preflight: feature distillation has a live teacher here (not remote, not a cache)
    assert teacher is not None and teacher.module is not None
    module = teacher.module
    return FeatureDistiller(cfg.distill.features, family_of(student).width(student), family_of(module).width(module))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: matrices decay, vectors (norms, biases) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def micro_batch_after(cfg: RunConfig, batches: data.Batches) -> Callable:
    """``after((step, micro))``: the next (step, micro) of the run and its inputs on this rank, None after the
    last (a remote teacher requests the next micro-batch's logits ahead). With on-policy distillation, the next
    micro-batch that has rows the student does not write, and those rows only (the others do not exist yet)."""
    from trainer.distill.on_policy import on_policy_rows

    t, lmbda = cfg.train, cfg.distill.lmbda
    if lmbda > 0 and bool(on_policy_rows(t.seed, 0, t.batch_size, lmbda).all()):
        return lambda key: None  # every row is the student's: nothing is known ahead

    def after(key: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor] | None:
        step, micro = key
        while True:
            step, micro = step + (micro + 1) // t.grad_accum, (micro + 1) % t.grad_accum
            if step >= (t.stop_at_step or t.max_steps):
                return None
            x, _ = batches.dataset.train_batch(t.seed, step, t.batch_size, batches.shard, micro)
            if lmbda == 0:
                return (step, micro), x.to(batches.device)
            off = ~data.local_slice(on_policy_rows(t.seed, step, t.batch_size, lmbda), batches.shard, micro)
            if bool(off.any()):
                return (step, micro), x[off].to(batches.device)

    return after


def build_run(cfg: RunConfig, env: DistEnv) -> RunParts:
    t = cfg.train
    torch.manual_seed(t.seed)
    dataset = data.build(cfg.data, sequence_length(cfg))
    dims = parallel_dims(cfg.parallel, env.world_size)
    mesh = dims.build_mesh(env.device.type)
    batches = data.Batches(
        dataset, data.Shard(dims.dp_rank(mesh), dims.dp_size, t.grad_accum), t.seed, t.batch_size, env.device
    )
    student = build_student(cfg, dataset).to(env.device)
    teacher = (
        build_teacher(
            cfg, dims, env.device, batches.shard, getattr(dataset, "vocab_size", 0), micro_batch_after(cfg, batches)
        )
        if needs_teacher(cfg)
        else None
    )
    features = build_features(cfg, student, teacher)
    compressor = build_compressor(student, cfg.compress.modifiers)
    spec = models.model_spec(student)
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
    )
    layout = Layout(dims=dims, mesh=mesh, device=env.device, batches=batches, autocast=autocast)
    runtime = build_runtime(cfg, student, family_of(student), features, layout, teacher, compressor)
    if runtime.kd_path and env.is_main:
        print(f"distill: {runtime.kd_path}")
    optimizer = torch.optim.AdamW(
        param_groups(runtime.trainable, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=False
    )
    if runtime.compressor:
        runtime.compressor.attach_optimizer(optimizer)
    return RunParts(
        dataset=dataset,
        batches=batches,
        dims=dims,
        mesh=mesh,
        family=family_of(student),
        teacher=teacher,
        runtime=runtime,
        optimizer=optimizer,
        student_spec=spec,
        autocast=autocast,
    )
