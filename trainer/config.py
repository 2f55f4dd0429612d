"""Typed run configuration (Hydra structured configs) and the checks that run before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hydra.core.config_store import ConfigStore

if TYPE_CHECKING:
    from parallel.mesh import ParallelDims


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key or path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class ModelConfig:
    arch: str = "gpt"  # gpt | mlp
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp only


@dataclass
class TeacherConfig:
    checkpoint: Optional[str] = None  # export folder, run dir, checkpoint folder, or Hugging Face causal-LM folder
    vocab: str = "strict"  # strict: same vocabulary as the student | slice: cut a larger one to the student's
    placement: str = "replicate"  # replicate | shard (FSDP2 over the data-parallel ranks) | cache
    param_dtype: str = "fp32"  # shard: dtype the gathered teacher computes in (fp32 | bf16)
    cache_dir: Optional[str] = None  # cache: folder written by `python -m trainer.cache` (same overrides)
    cache_dtype: str = "fp32"  # python -m trainer.cache: stored logit values (fp32 | bf16 | fp16)
    # Overrides of a run that trains the teacher when `checkpoint` does not exist yet.
    recipe: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    name: str = "shakespeare"  # shakespeare | digits | synthetic
    path: Optional[str] = None  # text corpus (default: the packaged Tiny Shakespeare)
    val_fraction: float = 0.1
    eval_batches: int = 20
    synthetic_vocab: int = 32
    synthetic_tokens: int = 20000


@dataclass
class FeatureConfig:
    student_layer: int = 1
    teacher_layer: int = 1
    loss: str = "mse"  # mse | cosine
    weight: float = 1.0


@dataclass
class DistillConfig:
    loss: str = "none"  # none | forward_kl | reverse_kl | jsd
    alpha: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    top_k: Optional[int] = None
    chunk_size: Optional[int] = None
    features: list[FeatureConfig] = field(default_factory=list)


@dataclass
class ModifierConfig:
    kind: str = "magnitude"  # magnitude | channel | nm | qat
    targets: list[str] = field(default_factory=lambda: ["blocks.*"])
    start_step: int = 0
    end_step: int = 0
    every: int = 1
    schedule: str = "agp"  # agp | linear | constant
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    scope: str = "layer"  # layer | global
    norm: int = 1  # channel ranking: L1 or L2
    n: int = 2
    m: int = 4
    weight_bits: int = 8  # 8 | 4
    group_size: int = 32
    act_bits: int = 0  # 8 (dynamic per token) | 0 (none)
    freeze_step: Optional[int] = None


@dataclass
class CompressConfig:
    modifiers: list[ModifierConfig] = field(default_factory=list)


@dataclass
class ParallelConfig:
    strategy: str = "single"  # single | ddp | fsdp | hsdp | pipeline
    backend: str = "auto"  # auto | gloo | nccl
    dp_replicate: int = 1  # ranks holding whole replicas (DDP, HSDP's outer axis); -1 = the rest
    dp_shard: int = 1  # ranks one replica is sharded over (FSDP2, HSDP's inner axis); -1 = the rest
    reshard_after_forward: bool = True  # FSDP: free gathered parameters after forward (re-gather in backward)
    cpu_offload: bool = False  # FSDP: keep sharded parameters, gradients and optimizer state on the CPU
    param_dtype: str = "fp32"  # FSDP compute dtype: fp32 | bf16 (gradients are reduced in fp32)
    pp: int = 1  # pipeline stages the student is split into (parallel.strategy=pipeline); -1 = the rest
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    microbatches: int = 1  # pipeline micro-batches per rank and step (in place of train.grad_accum)
    stages_per_rank: int = 1  # interleaved_1f1b: stages each rank holds (stage s runs on pipeline rank s % pp)
    teacher_ranks: int = 0  # teacher.placement=remote: the last K ranks of the world serve the teacher


@dataclass
class WandbConfig:
    mode: str = "online"  # online | offline | disabled
    project: str = "stillroom"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    progress: bool = True
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 12  # global samples per optimizer step, split over ranks and accumulation
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    grad_accum: int = 1
    # How one process sums its micro-batches' gradients: sequential ((g0+g1)+g2)+g3, or pairwise
    # (g0+g1)+(g2+g3), the order of the collectives of an N-rank run, which it then reproduces bit for bit.
    accum_order: str = "sequential"
    seed: int = 1337
    eval_every: int = 250
    ckpt_every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint path>
    precision: str = "fp32"  # fp32 | bf16
    stop_at_step: Optional[int] = None  # end this invocation early (checkpointed), resumable


@dataclass
class RunConfig:
    name: str = "run"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: Any = None


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


KD_LOSSES = ("none", "forward_kl", "reverse_kl", "jsd")
TASK_ARCH = {"shakespeare": "gpt", "synthetic": "gpt", "digits": "mlp"}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value, allowed, key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(map(str, allowed))} (got {value!r})")


def validate(cfg: RunConfig) -> None:
    """Semantic checks that need no model and no process group. Raises ConfigError."""
    t, d, s = cfg.train, cfg.distill, cfg.student
    _check(t.max_steps >= 1, "train.max_steps", f"must be >= 1 (got {t.max_steps})")
    _check(t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be in [0, train.lr] (got {t.min_lr})")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0 (got {t.warmup_steps})")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, 0 = off (got {t.grad_clip})")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1 (got {t.grad_accum})")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1 (got {t.batch_size})")
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _one_of(t.accum_order, ("sequential", "pairwise"), "train.accum_order")
    for key in ("eval_every", "ckpt_every", "keep_last"):
        _check(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1 (got {getattr(t, key)})")
    _one_of(t.precision, ("fp32", "bf16"), "train.precision")
    if t.resume not in ("auto", "never"):
        from trainer import checkpoint

        path = Path(t.resume)
        _check(checkpoint.is_complete(path), "train.resume",
               f"must be auto, never or a complete checkpoint folder ({t.resume} is not one)")
    if t.stop_at_step is not None:
        _check(1 <= t.stop_at_step <= t.max_steps, "train.stop_at_step", "must be in [1, train.max_steps]")

    _one_of(cfg.data.name, tuple(TASK_ARCH), "data.name")
    _check(0 < cfg.data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _check(cfg.data.eval_batches >= 1, "data.eval_batches", "must be >= 1")
    if cfg.data.path is not None:
        _check(Path(cfg.data.path).is_file(), "data.path", f"{cfg.data.path} does not exist")
    _one_of(s.arch, ("gpt", "mlp"), "student.arch")
    _check(s.arch == TASK_ARCH[cfg.data.name], "student.arch",
           f"data={cfg.data.name} needs a {TASK_ARCH[cfg.data.name]} student (got {s.arch})")
    if s.arch == "gpt":
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(s, key) >= 1, f"student.{key}", "must be >= 1")
        _check(s.n_embd % s.n_head == 0, "student.n_embd", f"{s.n_embd} is not divisible by student.n_head={s.n_head}")
    _check(0 <= s.dropout < 1, "student.dropout", "must be in [0, 1)")

    _one_of(d.loss, KD_LOSSES, "distill.loss")
    _check(d.temperature > 0, "distill.temperature", f"must be > 0 (got {d.temperature})")
    _check(0 <= d.alpha <= 1, "distill.alpha", f"must be in [0, 1] (got {d.alpha})")
    _check(0 <= d.beta <= 1, "distill.beta", f"must be in [0, 1] (got {d.beta})")
    if d.top_k is not None:
        _check(d.top_k >= 1, "distill.top_k", "must be >= 1")
    if d.chunk_size is not None:
        _check(d.chunk_size >= 1, "distill.chunk_size", "must be >= 1")
    for i, f in enumerate(d.features):
        _one_of(f.loss, ("mse", "cosine"), f"distill.features.{i}.loss")
        _check(f.weight >= 0, f"distill.features.{i}.weight", "must be >= 0")
    _one_of(cfg.logger.wandb.mode, ("online", "offline", "disabled"), "logger.wandb.mode")
    _check(cfg.logger.log_every >= 1, "logger.log_every", "must be >= 1")
    _validate_parallel(cfg)
    _validate_teacher(cfg)
    _validate_compress(cfg)


STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "pipeline")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def world_size_from_env() -> int:
    """The number of ranks the launcher started (torchrun's WORLD_SIZE), 1 without a launcher."""
    from parallel.env import detect

    return detect().world_size


def parallel_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """The student's ``ParallelDims`` over the ``world_size`` ranks less the teacher ranks (sizes inferred and
    checked). Raises ConfigError."""
    from parallel.mesh import ParallelDims, ParallelDimsError

    try:
        return ParallelDims(cfg.dp_replicate, cfg.dp_shard, world_size - cfg.teacher_ranks, pp=cfg.pp)
    except ParallelDimsError as e:
        raise ConfigError(f"parallel.{e.field}", e.message) from None


def _validate_parallel(cfg: RunConfig) -> None:
    p, t = cfg.parallel, cfg.train
    _one_of(p.strategy, STRATEGIES, "parallel.strategy")
    _one_of(p.backend, ("auto", "gloo", "nccl"), "parallel.backend")
    _one_of(p.param_dtype, ("fp32", "bf16"), "parallel.param_dtype")
    _one_of(p.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    world = world_size_from_env()
    _validate_teacher_ranks(cfg, world)
    student_ranks = world - p.teacher_ranks
    if p.backend == "nccl":
        import torch

        _check(torch.cuda.is_available(), "parallel.backend", "nccl needs a CUDA GPU and none is available "
               "(use parallel.backend=gloo or auto)")
    if p.strategy == "single":
        _check(student_ranks == 1, "parallel.strategy", f"single runs one process but the student has {student_ranks} ranks "
               "(use parallel=ddp, fsdp or hsdp)")
    if p.strategy == "ddp":
        _check(p.dp_shard == 1, "parallel.dp_shard", f"must be 1 with parallel.strategy=ddp (got {p.dp_shard})")
    if p.strategy == "fsdp":
        _check(p.dp_replicate == 1, "parallel.dp_replicate",
               f"must be 1 with parallel.strategy=fsdp (got {p.dp_replicate}; use parallel=hsdp)")
    if p.strategy in ("single", "ddp"):
        for key, default in (("param_dtype", "fp32"), ("cpu_offload", False)):
            _check(getattr(p, key) == default, f"parallel.{key}",
                   f"applies to parallel.strategy=fsdp or hsdp only (strategy is {p.strategy})")
    if p.strategy != "pipeline":
        for key in ("pp", "microbatches", "stages_per_rank"):
            _check(getattr(p, key) == 1, f"parallel.{key}",
                   f"applies to parallel.strategy=pipeline only (strategy is {p.strategy})")
    dims = parallel_dims(p, world)
    for i, mod in enumerate(cfg.compress.modifiers):
        _check(not (dims.fsdp_enabled and mod.kind == "channel"), f"compress.modifiers.{i}.kind",
               "channel pruning needs full weights: use parallel=ddp (FSDP/HSDP shard them)")
    if dims.pp_enabled:
        _validate_pipeline(cfg, dims)
        return
    _check(t.accum_order == "sequential" or student_ranks == 1, "train.accum_order",
           f"pairwise applies to one process (on {student_ranks} ranks gradients are synced inside the last backward)")
    _check(t.batch_size % (dims.dp_size * t.grad_accum) == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by data-parallel size {dims.dp_size} x train.grad_accum={t.grad_accum}")


def _validate_teacher_ranks(cfg: RunConfig, world: int) -> None:
    """``parallel.teacher_ranks`` goes with ``teacher.placement=remote``, and leaves the student a rank."""
    k = cfg.parallel.teacher_ranks
    if cfg.teacher.placement != "remote" or not needs_teacher(cfg):
        _check(k == 0, "parallel.teacher_ranks", f"applies to teacher.placement=remote only (got {k}; placement is "
               f"{cfg.teacher.placement})")
        return
    _check(k >= 1, "parallel.teacher_ranks", f"teacher.placement=remote needs at least one teacher rank (got {k})")
    _check(k < world, "parallel.teacher_ranks", f"{k} teacher ranks leave no student rank in a world of {world} "
           f"(launch more processes, e.g. torchrun --nproc_per_node={k + 1})")
    _check(not cfg.distill.features, "distill.features",
           "feature distillation is not supported with teacher.placement=remote (only logits are sent back)")
    _check(cfg.student.arch == "gpt", "teacher.placement",
           f"remote sends token batches to the teacher ranks: it needs a gpt student (student.arch is {cfg.student.arch})")


def _validate_pipeline(cfg: RunConfig, dims: ParallelDims) -> None:
    """What pipeline parallelism (``dims.pp`` > 1) needs, and the combinations it does not support."""
    p, t, s = cfg.parallel, cfg.train, cfg.student
    if not dims.fsdp_enabled:
        for key, default in (("param_dtype", "fp32"), ("cpu_offload", False)):
            _check(getattr(p, key) == default, f"parallel.{key}",
                   "applies to FSDP2 inside the stages only (set parallel.dp_shard > 1)")
    _check(s.arch == "gpt", "parallel.pp", f"pipeline parallelism splits a gpt student at block boundaries "
           f"(student.arch is {s.arch})")
    _check(p.stages_per_rank >= 1, "parallel.stages_per_rank", f"must be >= 1 (got {p.stages_per_rank})")
    stages = dims.pp * p.stages_per_rank
    _check(stages <= s.n_layer, "parallel.pp", f"{stages} pipeline stages for {s.n_layer} blocks "
           "(student.n_layer): every stage needs at least one block")
    _check(p.microbatches >= 1, "parallel.microbatches", f"must be >= 1 (got {p.microbatches})")
    if p.pp_schedule == "interleaved_1f1b":
        _check(p.stages_per_rank >= 2, "parallel.stages_per_rank",
               f"must be >= 2 with parallel.pp_schedule=interleaved_1f1b (got {p.stages_per_rank})")
        _check(p.microbatches % dims.pp == 0, "parallel.microbatches",
               f"{p.microbatches} is not a multiple of parallel.pp={dims.pp} (interleaved_1f1b)")
    else:
        _check(p.stages_per_rank == 1, "parallel.stages_per_rank",
               f"must be 1 with parallel.pp_schedule={p.pp_schedule} (got {p.stages_per_rank}; use interleaved_1f1b)")
    if p.pp_schedule == "1f1b":
        _check(p.microbatches >= dims.pp, "parallel.microbatches",
               f"1f1b needs at least as many micro-batches as stages: {p.microbatches} < parallel.pp={dims.pp}")
    _check(t.grad_accum == 1, "train.grad_accum",
           f"must be 1 with pipeline parallelism: set parallel.microbatches instead (got {t.grad_accum})")
    _check(t.batch_size % (dims.dp_size * p.microbatches) == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by data-parallel size {dims.dp_size} x "
           f"parallel.microbatches={p.microbatches}")
    _check(not cfg.distill.features, "distill.features",
           f"feature distillation is not supported with pipeline parallelism (parallel.pp={dims.pp}): "
           "the student's hidden states live on different stages")
    _check(cfg.teacher.placement == "replicate", "teacher.placement",
           f"must be replicate with pipeline parallelism: the teacher runs whole on the last stage "
           f"(got {cfg.teacher.placement})")
    for i, mod in enumerate(cfg.compress.modifiers):
        _check(not (mod.kind == "magnitude" and mod.scope == "global"), f"compress.modifiers.{i}.scope",
               "global magnitude pruning ranks weights across stages: not supported with pipeline "
               "parallelism (use scope=layer)")


def needs_teacher(cfg: RunConfig) -> bool:
    return cfg.distill.loss != "none" or bool(cfg.distill.features)


TEACHER_PLACEMENTS = ("replicate", "shard", "cache", "remote")
TEACHER_VOCAB = ("strict", "slice")


def _validate_teacher(cfg: RunConfig) -> None:
    from trainer import data
    from trainer.distill import teacher

    tc = cfg.teacher
    _one_of(tc.placement, TEACHER_PLACEMENTS, "teacher.placement")
    _one_of(tc.param_dtype, ("fp32", "bf16"), "teacher.param_dtype")
    _one_of(tc.cache_dtype, ("fp32", "bf16", "fp16"), "teacher.cache_dtype")
    _one_of(tc.vocab, TEACHER_VOCAB, "teacher.vocab")
    _check(tc.vocab == "strict" or cfg.student.arch == "gpt", "teacher.vocab",
           f"slice cuts a language model's vocabulary: not for a {cfg.student.arch} student")
    _check(tc.param_dtype == "fp32" or tc.placement == "shard", "teacher.param_dtype",
           f"applies to teacher.placement=shard only (placement is {tc.placement})")
    if not needs_teacher(cfg):
        _check(cfg.distill.alpha == 0, "distill.alpha", "must be 0 when distill.loss=none")
        return
    _check(cfg.teacher.checkpoint is not None, "teacher.checkpoint",
           f"distill.loss={cfg.distill.loss} needs a teacher (set teacher.checkpoint=PATH)")
    path = Path(cfg.teacher.checkpoint)
    if not path.exists() and cfg.teacher.recipe:
        return  # trained by the recipe before the run starts, then checked again
    try:
        spec = teacher.spec(path)
    except teacher.TeacherPathError as e:
        raise ConfigError("teacher.checkpoint", str(e)) from None
    t_cfg = spec["config"]
    t_vocab = t_cfg.get("vocab_size", t_cfg.get("n_classes"))
    s_vocab = data.vocab_size(cfg.data)
    _check(spec["arch"] == cfg.student.arch, "teacher.checkpoint",
           f"{path} holds a {spec['arch']} model but the student is a {cfg.student.arch}")
    if tc.vocab == "slice":
        _check(t_vocab >= s_vocab, "teacher.vocab",
               f"slice cuts a larger teacher vocabulary, but the teacher's {t_vocab} is smaller than the student's "
               f"{s_vocab} (data={cfg.data.name})")
    else:
        hint = f"; teacher.vocab=slice uses its first {s_vocab} logits" if t_vocab > s_vocab else ""
        _check(t_vocab == s_vocab, "teacher.checkpoint",
               f"teacher vocabulary {t_vocab} differs from the student's {s_vocab} (data={cfg.data.name}){hint}")
    t_context = t_cfg.get("block_size")
    if cfg.student.arch == "gpt" and t_context is not None:
        _check(cfg.student.block_size <= t_context, "student.block_size",
               f"{cfg.student.block_size} is longer than the teacher's context of {t_context} tokens")
    t_layers = t_cfg.get("n_layer", len(t_cfg.get("hidden", [])))
    s_layers = cfg.student.n_layer if cfg.student.arch == "gpt" else len(cfg.student.hidden)
    for i, f in enumerate(cfg.distill.features):
        _check(0 <= f.student_layer <= s_layers, f"distill.features.{i}.student_layer", f"must be in [0, {s_layers}]")
        _check(0 <= f.teacher_layer <= t_layers, f"distill.features.{i}.teacher_layer", f"must be in [0, {t_layers}]")
    if tc.placement == "shard":
        dp = parallel_dims(cfg.parallel, world_size_from_env()).dp_size
        _check(dp > 1, "teacher.placement", "shard needs more than one data-parallel rank "
               "(launch with torchrun and parallel=ddp, fsdp or hsdp; or use teacher.placement=replicate)")
    if tc.placement == "cache":
        _validate_cache(cfg)


def _validate_cache(cfg: RunConfig) -> None:
    """A cached teacher: logits only, and a complete cache written for this teacher, data and batch layout."""
    from trainer.distill import cache

    _check(not cfg.distill.features, "distill.features",
           "feature distillation needs the teacher's hidden states: not available with teacher.placement=cache")
    _check(cfg.teacher.cache_dir is not None, "teacher.cache_dir",
           "teacher.placement=cache needs teacher.cache_dir=PATH (written by python -m trainer.cache)")
    try:
        cache.check(cfg)
    except cache.CacheError as e:
        raise ConfigError("teacher.cache_dir", str(e)) from None


def _validate_compress(cfg: RunConfig) -> None:
    if not cfg.compress.modifiers:
        return
    from trainer.compress import validate_modifiers

    try:
        validate_modifiers(cfg.compress.modifiers, cfg.student.arch)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None
