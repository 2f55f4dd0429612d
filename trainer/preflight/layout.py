"""The preflight's checks of the parallel layout (``trainer.preflight.validate`` runs them): the launcher's world
size against the strategy, the teacher's own ranks, and what pipeline parallelism needs and refuses. Each raises
``ConfigError`` naming one key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.config import RunConfig, _check, parallel_dims

if TYPE_CHECKING:
    from parallel.mesh import ParallelDims
    from trainer.models.protocol import ModelFamily


def world_size_from_env() -> int:
    """The number of ranks the launcher started (torchrun's WORLD_SIZE), 1 without a launcher."""
    from parallel.env import detect

    return detect().world_size


def validate_parallel(cfg: RunConfig, family: ModelFamily, model_cfg: Any) -> None:
    """The layout's checks: the launcher's world size against the strategy, teacher ranks, the pipeline's needs;
    ``family`` and ``model_cfg``: the student's (``trainer.preflight.student_spec``)."""
    p, t = cfg.parallel, cfg.train
    world = world_size_from_env()
    _validate_teacher_ranks(cfg, world, family)
    student_ranks = world - p.teacher_ranks
    if p.backend == "nccl":
        import torch

        _check(
            torch.cuda.is_available(),
            "parallel.backend",
            "nccl needs a CUDA GPU and none is available (use parallel.backend=gloo or auto)",
        )
    if p.strategy == "single":
        _check(
            student_ranks == 1,
            "parallel.strategy",
            f"single runs one process but the student has {student_ranks} ranks (use parallel=ddp, fsdp or hsdp)",
        )
    dims = parallel_dims(p, world)
    if dims.fsdp_enabled and cfg.compress.modifiers:
        from trainer.compress.modifiers import PRUNERS

        for i, mod in enumerate(cfg.compress.modifiers):
            _check(
                mod.kind not in PRUNERS or not PRUNERS[mod.kind].structured,
                f"compress.modifiers.{i}.kind",
                f"{mod.kind} pruning needs full weights: use parallel=ddp (FSDP/HSDP shard them)",
            )
    if dims.pp_enabled:
        _validate_pipeline(cfg, dims, family, model_cfg)
        return
    _check(
        t.accum_order == "sequential" or student_ranks == 1,
        "train.accum_order",
        f"pairwise applies to one process (on {student_ranks} ranks gradients are synced inside the last backward)",
    )
    _check(
        t.batch_size % (dims.dp_size * t.grad_accum) == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by data-parallel size {dims.dp_size} x train.grad_accum={t.grad_accum}",
    )


def _validate_teacher_ranks(cfg: RunConfig, world: int, family: ModelFamily) -> None:
    """``parallel.teacher_ranks`` goes with ``teacher.placement=remote`` (or an ensemble's remote members), and leaves
    the student a rank."""
    k = cfg.parallel.teacher_ranks
    if not cfg.teacher.runs_remote or not cfg.distill.needs_teacher:
        _check(
            k == 0,
            "parallel.teacher_ranks",
            f"applies to teacher.placement=remote or remote ensemble members only (got {k}; placement is "
            f"{cfg.teacher.placement})",
        )
        _check(
            cfg.teacher.wire == "logits",
            "teacher.wire",
            f"applies to teacher.placement=remote or remote ensemble members only (placement is "
            f"{cfg.teacher.placement})",
        )
        return
    _check(
        cfg.teacher.wire == "logits" or cfg.distill.top_k is not None,
        "teacher.wire",
        "compact sends the teacher's top distill.top_k logits with their tail: set distill.top_k",
    )
    _check(k >= 1, "parallel.teacher_ranks", f"teacher.placement=remote needs at least one teacher rank (got {k})")
    _check(
        k < world,
        "parallel.teacher_ranks",
        f"{k} teacher ranks leave no student rank in a world of {world} "
        f"(launch more processes, e.g. torchrun --nproc_per_node={k + 1})",
    )
    _check(
        not cfg.distill.features,
        "distill.features",
        "feature distillation is not supported with teacher.placement=remote (only logits are sent back)",
    )
    _check(
        family.task == "lm",
        "teacher.placement",
        f"remote sends token batches to the teacher ranks: it needs a language model student "
        f"(student.arch is {cfg.student['arch']})",
    )


def _validate_pipeline(cfg: RunConfig, dims: ParallelDims, family: ModelFamily, model_cfg: Any) -> None:
    """What pipeline parallelism (``dims.pp`` > 1) needs, and the combinations it does not support."""
    p, t = cfg.parallel, cfg.train
    if not dims.fsdp_enabled:
        for key, default in (("param_dtype", "fp32"), ("cpu_offload", False)):
            _check(
                getattr(p, key) == default,
                f"parallel.{key}",
                "applies to FSDP2 inside the stages only (set parallel.dp_shard > 1)",
            )
    _check(
        family.pipelines,
        "parallel.pp",
        f"pipeline parallelism splits a student into stages of decoder layers: {family.lacks('stages')}",
    )
    _check(p.stages_per_rank >= 1, "parallel.stages_per_rank", f"must be >= 1 (got {p.stages_per_rank})")
    stages, depth = dims.pp * p.stages_per_rank, family.depth(model_cfg)
    _check(
        stages <= depth,
        "parallel.pp",
        f"{stages} pipeline stages for {depth} blocks (the student's decoder layers): every stage needs at least "
        "one block",
    )
    _check(p.microbatches >= 1, "parallel.microbatches", f"must be >= 1 (got {p.microbatches})")
    if p.pp_schedule == "interleaved_1f1b":
        _check(
            p.stages_per_rank >= 2,
            "parallel.stages_per_rank",
            f"must be >= 2 with parallel.pp_schedule=interleaved_1f1b (got {p.stages_per_rank})",
        )
        _check(
            p.microbatches % dims.pp == 0,
            "parallel.microbatches",
            f"{p.microbatches} is not a multiple of parallel.pp={dims.pp} (interleaved_1f1b)",
        )
    else:
        _check(
            p.stages_per_rank == 1,
            "parallel.stages_per_rank",
            f"must be 1 with parallel.pp_schedule={p.pp_schedule} (got {p.stages_per_rank}; use interleaved_1f1b)",
        )
    if p.pp_schedule == "1f1b":
        _check(
            p.microbatches >= dims.pp,
            "parallel.microbatches",
            f"1f1b needs at least as many micro-batches as stages: {p.microbatches} < parallel.pp={dims.pp}",
        )
    _check(
        cfg.data.name != "chat",
        "data.name",
        "chat weights each micro-batch's loss by its trained tokens: not supported with pipeline parallelism",
    )
    _check(
        t.grad_accum == 1,
        "train.grad_accum",
        f"must be 1 with pipeline parallelism: set parallel.microbatches instead (got {t.grad_accum})",
    )
    _check(
        t.batch_size % (dims.dp_size * p.microbatches) == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by data-parallel size {dims.dp_size} x "
        f"parallel.microbatches={p.microbatches}",
    )
    _check(
        not cfg.distill.features,
        "distill.features",
        f"feature distillation is not supported with pipeline parallelism (parallel.pp={dims.pp}): "
        "the student's hidden states live on different stages",
    )
    _check(
        cfg.teacher.placement == "replicate",
        "teacher.placement",
        f"must be replicate with pipeline parallelism: the teacher runs whole on the last stage "
        f"(got {cfg.teacher.placement})",
    )
    for i, mod in enumerate(cfg.compress.modifiers):
        _check(
            not (mod.kind == "magnitude" and mod.scope == "global"),
            f"compress.modifiers.{i}.scope",
            "global magnitude pruning ranks weights across stages: not supported with pipeline "
            "parallelism (use scope=layer)",
        )
