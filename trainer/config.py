"""Typed run configuration (Hydra structured configs); each node checks its own values (``check``).

Checks that need files, the environment, the model or several nodes at once are in ``trainer/preflight/__init__.py``,
which runs these first (``check_nodes``). Nothing here imports the modules that read the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore

if TYPE_CHECKING:
    from parallel.mesh import ParallelDims


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key or path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value, allowed, key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(map(str, allowed))} (got {value!r})")


DATA_TASKS = {"shakespeare": "lm", "synthetic": "lm", "digits": "classify", "text": "lm", "chat": "lm"}
ALIGNMENTS = ("auto", "exact", "span", "uld")  # distill.align: how a teacher's tokens meet the student's
TOKENIZED_DATA = ("text", "chat")  # read through a subword tokenizer into token shards (trainer/data/shards.py)
STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "pipeline")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
TEACHER_PLACEMENTS = ("replicate", "shard", "cache", "remote")


# The student node is ``arch`` (a model family, see trainer/models/protocol.py) plus the fields of that family's
# config dataclass (GPTConfig, MLPConfig, ...), which checks them; the data fills in the vocabulary or input size.
TINY_GPT = {"arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0}


@dataclass
class MemberConfig:
    """One teacher of ``teacher=ensemble``: where it is, the weight of its KD term in the loss, and where it runs:
    replicated, sharded over the data-parallel ranks (``shard``) or on the teacher ranks (``remote``: they hold every
    remote member), or read from a cache kept by document in ``cache_dir`` (``cache``)."""

    checkpoint: str = ""
    weight: float = 1.0
    placement: str = "replicate"
    cache_dir: str | None = None


@dataclass
class TeacherConfig:
    checkpoint: str | None = None  # export, run dir, checkpoint, Hugging Face causal-LM folder, or GGUF file
    placement: str = "replicate"  # replicate | shard (FSDP2 over the data-parallel ranks) | cache | remote
    # shard: dtype the gathered teacher computes in; a GGUF teacher: dtype it is dequantized to (fp32 | bf16)
    param_dtype: str = "fp32"
    cache_dir: str | None = None  # cache: folder written by `python -m trainer.cache` (same overrides)
    # python -m trainer.cache: stored logit values (fp32 | bf16 | fp16 | compact: 6-bit codes, Elias-Fano ids)
    cache_dtype: str = "fp32"
    cache_build: bool = False  # cache: write cache_dir first (python -m trainer.cache) when it is missing or unfinished
    # cache: batches (the teacher's top-k of each training batch: a student of its tokenizer, batches and seed) |
    # documents (of each document in the teacher's own tokens, read through the alignment: any student; compact rows)
    cache_layout: str = "batches"
    cache_window: int = 1024  # documents: teacher tokens a forward reads at most (capped at the teacher's context)
    # remote (and remote members): what a teacher rank sends back for a training batch: logits (fp32, the whole
    # vocabulary) | compact (the top distill.top_k with the tail's mass, as teacher.cache_dtype=compact stores them)
    wire: str = "logits"
    # Overrides of a run that trains the teacher when `checkpoint` does not exist yet.
    recipe: list[str] = field(default_factory=list)
    # teacher=ensemble: several teachers, each aligned to the student on its own; the KD term is the weighted sum
    # of theirs (trainer/distill/placement.py, EnsembleTeacher). `checkpoint` is then unset.
    members: list[MemberConfig] = field(default_factory=list)

    def check(self) -> None:
        _one_of(self.placement, TEACHER_PLACEMENTS, "placement")
        for i, member in enumerate(self.members):
            _check(bool(member.checkpoint), f"members.{i}.checkpoint", "names the member's teacher: must be set")
            _check(member.weight >= 0, f"members.{i}.weight", f"must be >= 0 (got {member.weight})")
            _one_of(member.placement, ("replicate", "shard", "cache", "remote"), f"members.{i}.placement")
            _check(member.placement != "cache" or member.cache_dir is not None, f"members.{i}.cache_dir",
                   "a member with placement cache names its cache kept by document (python -m trainer.cache "
                   "teacher.cache_layout=documents ...)")  # fmt: skip
        if self.members:
            _check(self.checkpoint is None, "checkpoint", "an ensemble names its teachers in teacher.members")
            _check(sum(m.weight for m in self.members) > 0, "members", "the members' weights sum to 0")
            _check(self.placement == "replicate", "placement", "an ensemble places each member on its own "
                   "(teacher.members.N.placement)")  # fmt: skip
        _one_of(self.param_dtype, ("fp32", "bf16"), "param_dtype")
        _one_of(self.cache_dtype, ("fp32", "bf16", "fp16", "compact"), "cache_dtype")
        _one_of(self.cache_layout, ("batches", "documents"), "cache_layout")
        _check(self.cache_window >= 2, "cache_window", f"must be >= 2 (got {self.cache_window})")
        if self.cache_layout == "documents":
            _check(self.cache_dtype == "compact", "cache_dtype", "cache_layout=documents stores compact rows: set "
                   "teacher.cache_dtype=compact")  # fmt: skip
        _one_of(self.wire, ("logits", "compact"), "wire")

    @property
    def remote_members(self) -> list[int]:
        """The indices of the ensemble's members that run on the teacher ranks (in the order those hold them)."""
        return [i for i, member in enumerate(self.members) if member.placement == "remote"]

    @property
    def runs_remote(self) -> bool:
        """Whether the teacher, or a member of the ensemble, runs on teacher ranks of its own."""
        return self.placement == "remote" or bool(self.remote_members)


@dataclass
class DataConfig:
    name: str = "shakespeare"  # shakespeare | digits | synthetic | text | chat
    path: str | None = None  # text corpus (default: the packaged Tiny Shakespeare)
    val_fraction: float = 0.1
    eval_batches: int = 20
    synthetic_vocab: int = 32
    synthetic_tokens: int = 20000
    # data=text|chat: files or globs; a tokenizer folder, GGUF file or `teacher` (teacher.checkpoint's own).
    files: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # globs of paths to leave out of files' (``*`` crosses folders)
    tokenizer: str = "teacher"
    text_field: str = "text"  # data=text: the field of .json/.jsonl/.parquet rows that holds a document
    overflow: str = "truncate"  # data=chat: samples longer than the sequence: truncate | drop
    num_proc: int = 1  # processes that tokenize
    cache_dir: str = "data_cache"  # token shards, one folder per (files, tokenizer, settings)

    def check(self) -> None:
        _one_of(self.name, tuple(DATA_TASKS), "name")
        _check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        _check(self.eval_batches >= 1, "eval_batches", "must be >= 1")
        _check(self.synthetic_vocab >= 2, "synthetic_vocab", f"must be >= 2 (got {self.synthetic_vocab})")
        _one_of(self.overflow, ("truncate", "drop"), "overflow")
        _check(self.num_proc >= 1, "num_proc", f"must be >= 1 (got {self.num_proc})")
        if self.name in TOKENIZED_DATA:
            _check(bool(self.files), "files", f"data={self.name} needs data.files=[PATH or GLOB, ...]")


@dataclass
class FeatureConfig:
    student_layer: int = 1
    teacher_layer: int = 1
    loss: str = "mse"  # mse | cosine
    weight: float = 1.0

    def check(self) -> None:
        _one_of(self.loss, ("mse", "cosine"), "loss")
        _check(self.weight >= 0, "weight", "must be >= 0")


@dataclass
class DistillConfig:
    loss: str = "none"  # none | a registered divergence (trainer.distill.divergence.DIVERGENCES)
    alpha: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int | None = None
    top_k_tail: bool = False  # with top_k: one more bucket holding the rest of the probability mass, both sides
    chunk_size: int | None = None
    fused: bool = True  # head + divergence a chunk of tokens at a time (no [tokens, V] logits) where models allow
    # How the teacher's tokens meet the student's (trainer/distill/align.py): exact (one vocabulary, up to padding),
    # span (a teacher of another tokenizer: positions where both tokenizations end at one character, the shared
    # tokens and a tail bucket), uld (sorted probabilities), auto (exact with one tokenizer, else span).
    align: str = "auto"
    features: list[FeatureConfig] = field(default_factory=list)
    # On-policy distillation (distill=on_policy, trainer/distill/on_policy.py): the share of each step's samples
    # the student completes itself (0: off-policy KD only, 1: on-policy only), how many tokens it writes at most,
    # the prompt's length (data other than chat: the first tokens of the window), how it samples (temperature 0:
    # greedy; top_p < 1: nucleus sampling).
    lmbda: float = 0.0
    max_new_tokens: int = 16
    prompt_tokens: int = 16
    gen_temperature: float = 1.0
    top_p: float = 1.0

    def check(self) -> None:  # the loss kinds are registered divergences (checked in the preflight)
        _check(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        _check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1] (got {self.alpha})")
        _check(0 <= self.beta <= 1, "beta", f"must be in [0, 1] (got {self.beta})")
        if self.top_k is not None:
            _check(self.top_k >= 1, "top_k", "must be >= 1")
        if self.chunk_size is not None:
            _check(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        if self.top_k_tail:
            _check(self.top_k is not None, "top_k_tail", "needs distill.top_k=K (the tail is what the top-k leaves)")
        _check(self.align in ALIGNMENTS, "align", f"must be one of {', '.join(ALIGNMENTS)} (got {self.align!r})")
        _check(0 <= self.lmbda <= 1, "lmbda", f"must be in [0, 1] (got {self.lmbda})")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        _check(self.prompt_tokens >= 1, "prompt_tokens", f"must be >= 1 (got {self.prompt_tokens})")
        _check(self.gen_temperature >= 0, "gen_temperature", f"must be >= 0, 0 = greedy (got {self.gen_temperature})")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})")

    @property
    def needs_teacher(self) -> bool:
        """Whether a loss compares the student with a teacher (logits or features)."""
        return self.loss != "none" or bool(self.features)


@dataclass
class ModifierConfig:
    kind: str = "magnitude"  # qat | a pruning kind (trainer.compress.modifiers.PRUNERS: magnitude | channel | nm)
    # module name globs, or roles every family resolves: layers (its decoder layers' Linears), embedding, head
    targets: list[str] = field(default_factory=lambda: ["layers"])
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
    freeze_step: int | None = None


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
    teacher_ranks: int = 0  # teacher.placement=remote (or remote members): the last K ranks serve the teacher(s)

    def check(self) -> None:
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.backend, ("auto", "gloo", "nccl"), "backend")
        _one_of(self.param_dtype, ("fp32", "bf16"), "param_dtype")
        _one_of(self.pp_schedule, PP_SCHEDULES, "pp_schedule")
        if self.strategy == "ddp":
            _check(self.dp_shard == 1, "dp_shard", f"must be 1 with parallel.strategy=ddp (got {self.dp_shard})")
        if self.strategy == "fsdp":
            _check(
                self.dp_replicate == 1,
                "dp_replicate",
                f"must be 1 with parallel.strategy=fsdp (got {self.dp_replicate}; use parallel=hsdp)",
            )
        if self.strategy in ("single", "ddp"):
            for key, default in (("param_dtype", "fp32"), ("cpu_offload", False)):
                _check(
                    getattr(self, key) == default,
                    key,
                    f"applies to parallel.strategy=fsdp or hsdp only (strategy is {self.strategy})",
                )
        if self.strategy != "pipeline":
            for key in ("pp", "microbatches", "stages_per_rank"):
                _check(
                    getattr(self, key) == 1,
                    key,
                    f"applies to parallel.strategy=pipeline only (strategy is {self.strategy})",
                )


@dataclass
class WandbConfig:
    mode: str = "online"  # online | offline | disabled
    project: str = "stillroom"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        _one_of(self.mode, ("online", "offline", "disabled"), "mode")


@dataclass
class LoggerConfig:
    progress: bool = True
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        _check(self.log_every >= 1, "log_every", "must be >= 1")


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
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run (logged as step 0)
    ckpt_every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint path>
    # Resume a checkpoint written with other settings: true (any), or the keys that may differ, e.g. [teacher,
    # train.max_steps] (a key also covers the keys under it: [train]).
    allow_resume_changes: Any = False
    precision: str = "fp32"  # fp32 | bf16
    stop_at_step: int | None = None  # end this invocation early (checkpointed), resumable

    def check(self) -> None:
        _check(self.max_steps >= 1, "max_steps", f"must be >= 1 (got {self.max_steps})")
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, train.lr] (got {self.min_lr})")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0 (got {self.warmup_steps})")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        for key in ("beta1", "beta2"):
            _check(0 <= getattr(self, key) < 1, key, f"must be in [0, 1) (got {getattr(self, key)})")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, 0 = off (got {self.grad_clip})")
        _check(self.grad_accum >= 1, "grad_accum", f"must be >= 1 (got {self.grad_accum})")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        _check(
            self.batch_size % self.grad_accum == 0,
            "batch_size",
            f"{self.batch_size} is not divisible by train.grad_accum={self.grad_accum}",
        )
        _one_of(self.accum_order, ("sequential", "pairwise"), "accum_order")
        for key in ("eval_every", "ckpt_every", "keep_last"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        _one_of(self.precision, ("fp32", "bf16"), "precision")
        if self.stop_at_step is not None:
            _check(1 <= self.stop_at_step <= self.max_steps, "stop_at_step", "must be in [1, train.max_steps]")
        changes = self.allow_resume_changes
        _check(
            isinstance(changes, bool) or isinstance(changes, list) and all(isinstance(k, str) for k in changes),
            "allow_resume_changes",
            f"must be true, false or a list of keys (got {changes!r})",
        )

    def resume_must_keep(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The entries of a run's ``identity`` a resume must keep: those ``allow_resume_changes`` does not name."""
        changes = self.allow_resume_changes
        if isinstance(changes, bool):
            return {} if changes else identity
        return {
            key: value
            for key, value in identity.items()
            if not any(key == allowed or key.startswith(f"{allowed}.") for allowed in changes)
        }


@dataclass
class ReportConfig:
    # Also measure the teacher, the export and a dense copy as transformers loads them (trainer/side_by_side.py).
    side_by_side: bool = False
    prompts: list[str] = field(default_factory=list)  # side_by_side: greedy completions by each model
    new_tokens: int = 32
    latency_repeats: int = 20  # CPU forward passes whose median is a model's latency in report.md
    # side_by_side: a second held-out set unlike the training files (globs of text files): each model's loss on
    # windows of them, the data's tokenizer and sequence length
    heldout_files: list[str] = field(default_factory=list)

    def check(self) -> None:
        _check(self.new_tokens >= 1, "new_tokens", f"must be >= 1 (got {self.new_tokens})")
        _check(self.latency_repeats >= 1, "latency_repeats", f"must be >= 1 (got {self.latency_repeats})")


@dataclass
class SearchConfig:
    """``python -m trainer.search``: which cuts of the teacher it tries, and how long it trains the best of them."""

    budget: float = 0.5  # at most 1: a fraction of the teacher's parameters (of `count`); above 1: a number of them
    count: str = "non_embedding"  # what the budget counts: non_embedding | total
    slack: float = 0.15  # candidates hold between (1 - slack) x budget and the budget
    layers: list[int] = field(default_factory=list)  # depths tried (empty: from a quarter of the teacher's to all)
    widths: list[float] = field(default_factory=list)  # head-group fractions (empty: every whole number of groups)
    mlp_widths: list[float] = field(default_factory=lambda: [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    hidden_widths: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875, 1.0])
    top: int = 6  # candidates trained: the best as cut
    tokens: int = 51_200  # training tokens of each trained candidate
    evals: int = 4  # evaluations along each candidate's training (its curve)
    dir: str = "search"  # plan.json (scored as cut), a run folder per trained candidate, search.json, search.png
    launcher: str = "local"  # local (one after another) | slurm (a Hydra sweep job each, hydra/launcher=slurm)

    def check(self) -> None:
        _check(self.budget > 0, "budget", f"must be > 0 (got {self.budget})")
        _one_of(self.count, ("non_embedding", "total"), "count")
        _check(0 <= self.slack < 1, "slack", f"must be in [0, 1) (got {self.slack})")
        for key in ("top", "tokens", "evals"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        for key in ("widths", "mlp_widths", "hidden_widths"):
            _check(all(0 < w <= 1 for w in getattr(self, key)), key, "every fraction must be in (0, 1]")
        _check(all(n >= 1 for n in self.layers), "layers", "every depth must be >= 1")
        _one_of(self.launcher, ("local", "slurm"), "launcher")


@dataclass
class RunConfig:
    name: str = "run"
    student: dict[str, Any] = field(default_factory=lambda: dict(TINY_GPT))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    experiment: Any = None

    def __post_init__(self) -> None:
        if self.data.tokenizer == "teacher" and self.teacher.checkpoint is not None:
            self.data.tokenizer = self.teacher.checkpoint  # the teacher's own tokenizer (its folder or GGUF file)

    @property
    def sequence_length(self) -> int:
        """Tokens per training window: the student's ``block_size`` (1 for a model without one)."""
        return int(self.student.get("block_size", 1))

    @property
    def hf_student_folder(self) -> Path | None:
        """The folder of a Hugging Face student (``student=hf``), None for any other."""
        path = self.student.get("path") if self.student.get("arch") == "hf" else None
        return Path(path) if path else None


def register_configs() -> None:
    """The schema Hydra composes into (and the resolvers its files use); the ``student`` group fills the student
    node whole."""
    from trainer import resolvers

    resolvers.register()
    ConfigStore.instance().store(name="run_schema", node=RunConfig(student={}))


def check_nodes(node: Any, prefix: str = "") -> None:
    """Run every node's own ``check`` (depth first, in field order); a ConfigError names the full key."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_nodes(item, f"{prefix}{i}.")
        return
    if not dataclasses.is_dataclass(node):
        return
    if hasattr(node, "check"):
        try:
            node.check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e.key}", e.message) from None
    for f in dataclasses.fields(node):
        check_nodes(getattr(node, f.name), f"{prefix}{f.name}.")


def parallel_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """The student's ``ParallelDims`` over the ``world_size`` ranks less the teacher ranks (sizes inferred and
    checked). Raises ConfigError."""
    from parallel.mesh import ParallelDims, ParallelDimsError

    try:
        return ParallelDims(cfg.dp_replicate, cfg.dp_shard, world_size - cfg.teacher_ranks, pp=cfg.pp)
    except ParallelDimsError as e:
        raise ConfigError(f"parallel.{e.field}", e.message) from None
