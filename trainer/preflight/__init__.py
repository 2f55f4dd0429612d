"""The checks that run before anything starts and need more than one config node: files (data, teacher,
checkpoints, caches), the launcher's environment (world size, GPUs), the student's model family, and the
combinations of nodes. ``validate`` runs every node's own checks first (``trainer.config.check_nodes``); the parallel
layout's checks are in ``trainer/preflight/layout.py``.

Every check raises ``ConfigError`` naming one key; ``python -m trainer`` prints it as one line and exits 2. The
modules these checks need (torch, the data, the models, compression) are imported only once every node's own checks
have passed, so that a bad value stops the command in well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from trainer.config import (
    DATA_TASKS,
    TOKENIZED_DATA,
    ConfigError,
    DistillConfig,
    RunConfig,
    _check,
    check_nodes,
    parallel_dims,
)
from trainer.preflight.layout import validate_parallel, world_size_from_env


def validate(cfg: RunConfig) -> None:
    """Every check that can run before anything starts: each node's own, then those that need files, the
    environment, the student's family or several nodes. Raises ConfigError."""
    from trainer.build import student_spec  # torch and the models: only once a check needs them

    check_nodes(cfg)
    from trainer import checkpoint, data, hub

    # Hugging Face Hub ids become their snapshot folders: every check below reads folders
    hub.localize(cfg.teacher, cfg.student, cfg.data)
    check_distill_loss(cfg.distill)
    t = cfg.train
    if t.resume not in ("auto", "never"):
        _check(
            checkpoint.is_complete(Path(t.resume)),
            "train.resume",
            f"must be auto, never or a complete checkpoint folder ({t.resume} is not one)",
        )
        check_resume(cfg, Path(t.resume))
    if cfg.data.path is not None:
        _check(Path(cfg.data.path).exists(), "data.path", f"{cfg.data.path} does not exist")
    try:
        data.check(cfg.data, cfg.sequence_length)
    except data.DataError as e:
        raise ConfigError(e.key, e.message) from None
    family, model_cfg = student_spec(cfg)
    task = DATA_TASKS[cfg.data.name]
    _check(
        family.task == task,
        "student.arch",
        f"data={cfg.data.name} needs a {task} student (got {cfg.student['arch']}, a {family.task} model)",
    )
    _validate_on_policy(cfg)
    validate_parallel(cfg, family, model_cfg)
    _validate_teacher(cfg)
    _validate_compress(cfg)
    if cfg.report.side_by_side:
        from trainer.distill import teacher as teacher_io

        _check(
            cfg.teacher.checkpoint is not None
            and (family.pretrained_format or family.name == "hf")  # student=hf names its decoder family later
            and teacher_io.resolve(cfg.teacher.checkpoint)[0] in ("hf", "gguf"),
            "report.side_by_side",
            "measures a Hugging Face or GGUF teacher (teacher.checkpoint) beside a Hugging Face student",
        )


def check_distill_loss(d: DistillConfig) -> None:
    """``distill.loss`` is none or a divergence registered now (``trainer.distill.divergence.DIVERGENCES``)."""
    from trainer.distill.divergence import DIVERGENCES

    _check(
        d.loss == "none" or d.loss in DIVERGENCES,
        "distill.loss",
        f"must be one of none, {', '.join(DIVERGENCES)} (got {d.loss!r})",
    )


def _validate_on_policy(cfg: RunConfig) -> None:
    """On-policy distillation (``distill.lmbda`` > 0): a teacher that can score samples the student writes during
    the run, on a language-model data set, in a sequence that holds prompt and completion."""
    d = cfg.distill
    if d.lmbda == 0:
        return
    _check(
        d.loss != "none",
        "distill.lmbda",
        "on-policy samples are graded by a teacher: set distill.loss (e.g. distill=on_policy) or distill.lmbda=0",
    )
    _check(
        DATA_TASKS[cfg.data.name] == "lm",
        "distill.lmbda",
        f"on-policy distillation samples text from the student: data={cfg.data.name} is not a language-model data set",
    )
    _check(
        cfg.teacher.placement != "cache",
        "teacher.placement",
        "cache holds the teacher's logits of the data set's samples; on-policy samples (distill.lmbda > 0) do not "
        "exist before the run: use replicate, shard or remote",
    )
    _check(
        not d.features,
        "distill.features",
        "feature distillation is not supported with on-policy distillation (distill.lmbda > 0)",
    )
    _check(
        not parallel_dims(cfg.parallel, world_size_from_env()).pp_enabled,
        "parallel.strategy",
        "on-policy distillation (distill.lmbda > 0) is not supported with pipeline parallelism: generation would "
        "pass every token through all the stages",
    )
    length = cfg.sequence_length
    if cfg.data.name == "chat":
        _check(
            d.max_new_tokens < length,
            "distill.max_new_tokens",
            f"{d.max_new_tokens} new tokens after a prompt do not fit the sequence of {length} (student.block_size)",
        )
        return
    _check(
        d.prompt_tokens + d.max_new_tokens <= length,
        "distill.prompt_tokens",
        f"a prompt of {d.prompt_tokens} tokens and distill.max_new_tokens={d.max_new_tokens} are longer than the "
        f"sequence of {length} tokens (student.block_size)",
    )


def unknown_keys(node: DictConfig, schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have (``+key=...`` and ``++key=...`` add keys Hydra
    would otherwise let through unused). The student node is its family's to check."""
    hints = typing.get_type_hints(schema)
    unknown: list[str] = []
    for key, value in node.items():
        name = str(key)
        if name not in hints:
            unknown.append(f"{prefix}{name}")
            continue
        kind = hints[name]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list and typing.get_args(kind) else None
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, DictConfig):
            unknown += unknown_keys(value, kind, f"{prefix}{name}.")
        elif isinstance(item, type) and dataclasses.is_dataclass(item) and isinstance(value, ListConfig):
            for i, element in enumerate(value):
                unknown += unknown_keys(element, item, f"{prefix}{name}.{i}.")
    return unknown


def check_resume(cfg: RunConfig, path: Path) -> None:
    """The checkpoint a resume starts from holds this run's model and settings: ConfigError naming the difference.
    A damaged one is left to the resume, which names it and falls back to the one before."""
    import torch

    from trainer import checkpoint, models
    from trainer.build import run_identity, student_spec  # torch and the models: only once a check needs them

    family, config = student_spec(cfg)
    with torch.device("meta"):  # the spec the run's checkpoints record, without reading any weights
        spec = models.model_spec(family.build(config))
    try:
        checkpoint.check_model(path, spec)
        checkpoint.check_run(path, cfg.train.resume_must_keep(run_identity(cfg)))
    except checkpoint.CorruptCheckpoint:
        return
    except checkpoint.CheckpointError as e:
        raise ConfigError(e.config_key or "train.resume", str(e)) from None


@functools.cache
def _verified_teacher(path: Path) -> None:
    """``teacher.verify``, once per teacher and process: every job of a sweep, and the run's own check after the
    preflight, would hash the same files again (loading the teacher checks them once more)."""
    from trainer.distill import teacher

    teacher.verify(path)


def _validate_teacher(cfg: RunConfig) -> None:
    from trainer import data, models
    from trainer.build import cross_tokenizer, student_spec  # torch and the models: only once a check needs them
    from trainer.distill import teacher, vocab

    tc = cfg.teacher
    student_family, student_cfg = student_spec(cfg)
    if not cfg.distill.needs_teacher:
        _check(cfg.distill.alpha == 0, "distill.alpha", "must be 0 when distill.loss=none")
        _check_param_dtype(cfg, gguf=False)
        return
    if tc.members:  # an ensemble: each member checked as the run's one teacher
        from trainer.build import member_config

        _check(not cfg.distill.features, "distill.features", "an ensemble's members are compared by their logits")
        _check(cfg.distill.lmbda == 0, "distill.lmbda", "on-policy distillation takes one teacher")
        _check(cfg.parallel.strategy != "pipeline", "parallel.strategy", "an ensemble does not run through a pipeline")
        for i, member in enumerate(tc.members):
            try:
                _validate_teacher(member_config(cfg, member))
            except ConfigError as e:
                raise ConfigError(f"teacher.members.{i}", f"{e.key}: {e.message}") from None
        return
    _check(
        cfg.teacher.checkpoint is not None,
        "teacher.checkpoint",
        f"distill.loss={cfg.distill.loss} needs a teacher (set teacher.checkpoint=PATH, or teacher=ensemble)",
    )
    assert cfg.teacher.checkpoint is not None  # checked just above
    path = Path(cfg.teacher.checkpoint)
    if not path.exists() and cfg.teacher.recipe:
        return  # trained by the recipe before the run starts, then checked again
    try:
        spec = teacher.spec(path)
        _verified_teacher(path.resolve())
    except teacher.TeacherPathError as e:
        raise ConfigError("teacher.checkpoint", str(e)) from None
    _check_param_dtype(cfg, gguf=spec.get("source") == "gguf")
    t_cfg = spec["config"]
    t_vocab = t_cfg.get("vocab_size", t_cfg.get("n_classes"))
    s_vocab = data.vocab_size(cfg.data)
    teacher_task = models.family(spec["arch"]).task
    _check(
        teacher_task == student_family.task,
        "teacher.checkpoint",
        f"{path} holds a {spec['arch']} model ({teacher_task}) but the student is a {cfg.student['arch']} "
        f"({student_family.task})",
    )
    if tc.placement == "cache" and tc.cache_layout == "documents":  # any student tokenizer: read through span
        _validate_document_cache(cfg, t_vocab)
        return
    how = cross_tokenizer(cfg)
    if how is not None:  # the teacher reads the text in its own tokens: its vocabulary is its own
        _validate_cross_tokenizer(cfg, how)
        return
    try:
        alignment = teacher.vocab_alignment(cfg.teacher.checkpoint, cfg.data, cfg.hf_student_folder)
    except vocab.VocabError as e:
        raise ConfigError("teacher.checkpoint", f"{e} (data={cfg.data.name})") from None
    if alignment is None:
        _check(
            t_vocab == s_vocab,
            "teacher.checkpoint",
            f"teacher vocabulary {t_vocab} differs from the student's {s_vocab} (data={cfg.data.name})",
        )
    vocabulary = alignment.real if alignment is not None else s_vocab
    if cfg.data.name in TOKENIZED_DATA:
        _validate_shared_tokenizer(cfg)
    if cfg.distill.top_k is not None:
        _check(
            cfg.distill.top_k <= vocabulary,
            "distill.top_k",
            f"{cfg.distill.top_k} is more than the vocabulary ({vocabulary} tokens, data={cfg.data.name})",
        )
        _check(
            not cfg.distill.top_k_tail or cfg.distill.top_k < vocabulary,
            "distill.top_k_tail",
            f"top_k={cfg.distill.top_k} leaves no tail in a vocabulary of {vocabulary} tokens",
        )
    t_context = t_cfg.get("block_size")
    if student_family.task == "lm" and t_context is not None:
        _check(
            cfg.sequence_length <= t_context,
            "student.block_size",
            f"{cfg.sequence_length} is longer than the teacher's context of {t_context} tokens",
        )
    t_layers = t_cfg.get("n_layer", len(t_cfg.get("hidden", [])))
    s_layers = student_family.depth(student_cfg)
    for i, f in enumerate(cfg.distill.features):
        _check(0 <= f.student_layer <= s_layers, f"distill.features.{i}.student_layer", f"must be in [0, {s_layers}]")
        _check(0 <= f.teacher_layer <= t_layers, f"distill.features.{i}.teacher_layer", f"must be in [0, {t_layers}]")
    if tc.placement == "shard":
        dp = parallel_dims(cfg.parallel, world_size_from_env()).dp_size
        _check(
            dp > 1,
            "teacher.placement",
            "shard needs more than one data-parallel rank "
            "(launch with torchrun and parallel=ddp, fsdp or hsdp; or use teacher.placement=replicate)",
        )
    if tc.placement == "cache":
        _validate_cache(cfg)


def _validate_cross_tokenizer(cfg: RunConfig, how: str) -> None:
    """What a teacher of another tokenizer runs with today: replicated, sharded or remote (its cached form is the
    cache kept by document), logit KD (on-policy with a replicated one), no pipeline."""
    key = f"distill.align={how}"
    placement = cfg.teacher.placement
    _check(placement != "cache", "teacher.placement", f"{key}: a teacher of another tokenizer is cached by document "
           "(teacher.cache_layout=documents; a cache of training batches is of the student's tokens)")  # fmt: skip
    _check(placement == "replicate" or cfg.distill.lmbda == 0, "distill.lmbda", f"{key}: on-policy distillation "
           f"from a teacher of another tokenizer runs it replicated (placement is {placement})")  # fmt: skip
    if placement == "shard":
        _check(
            parallel_dims(cfg.parallel, world_size_from_env()).dp_size > 1,
            "teacher.placement",
            "shard needs more than one data-parallel rank (launch with torchrun and parallel=ddp, fsdp or hsdp)",
        )
    _check(not cfg.distill.features, "distill.features", f"{key}: feature distillation needs one tokenization")
    _check(cfg.distill.top_k is None, "distill.top_k", f"{key}: compares the shared tokens whole (no top-k)")
    _check(cfg.parallel.strategy != "pipeline", "parallel.strategy", f"{key}: not through a pipeline")


def _validate_document_cache(cfg: RunConfig, teacher_vocab: int) -> None:
    """A cache kept by document: text documents, the teacher's top-k read through span alignment, off-policy logit
    KD; then the cache itself (``_validate_cache``)."""
    key = "teacher.cache_layout=documents"
    _check(cfg.data.name == "text", "data.name", f"{key} holds documents of data=text (got {cfg.data.name})")
    top_k = cfg.distill.top_k
    building = cfg.teacher.cache_build  # python -m trainer.cache, or a run that writes its cache first
    _check(top_k is not None or not building, "distill.top_k", f"{key}: a cache stores the teacher's top "
           "distill.top_k: set it to build one (e.g. 64; a run that reads one may leave it unset)")  # fmt: skip
    _check(top_k is None or top_k < teacher_vocab, "distill.top_k", f"{key}: {top_k} is not less than the "
           f"teacher's {teacher_vocab} tokens")  # fmt: skip
    _check(cfg.distill.align in ("auto", "span"), "distill.align", f"{key} is read through span alignment (auto or "
           f"span, not {cfg.distill.align})")  # fmt: skip
    _check(cfg.distill.lmbda == 0, "distill.lmbda", f"{key}: on-policy samples are not in the cache's documents")
    _check(cfg.parallel.strategy != "pipeline", "parallel.strategy", f"{key}: not through a pipeline")
    _validate_cache(cfg)


def _validate_shared_tokenizer(cfg: RunConfig) -> None:
    """``data.tokenizer``, when it is not the teacher's own, gives the same tokens the same ids as the teacher's."""
    from trainer.data import tokenizer
    from trainer.data.errors import DataError

    assert cfg.teacher.checkpoint is not None  # a run with a teacher
    if cfg.data.tokenizer == cfg.teacher.checkpoint:
        return
    try:
        ours, theirs = tokenizer.load(cfg.data.tokenizer), tokenizer.load(cfg.teacher.checkpoint)
    except DataError:
        return  # a teacher without a tokenizer of its own: the vocabulary check above is all there is
    _check(
        ours.get_vocab() == theirs.get_vocab(),
        "data.tokenizer",
        f"{cfg.data.tokenizer} ({len(ours)} tokens) is not the teacher's tokenizer ({cfg.teacher.checkpoint}, "
        f"{len(theirs)} tokens): distill.align=exact needs one (auto, span or uld align them)",
    )


def _check_param_dtype(cfg: RunConfig, gguf: bool) -> None:
    """``teacher.param_dtype`` other than fp32 is the compute dtype of a sharded teacher, or the dtype a GGUF
    teacher (``gguf``) is dequantized to; it means nothing elsewhere."""
    tc = cfg.teacher
    _check(
        tc.param_dtype == "fp32" or tc.placement == "shard" or gguf,
        "teacher.param_dtype",
        f"applies to teacher.placement=shard or a GGUF teacher only (placement is {tc.placement})",
    )


def _validate_cache(cfg: RunConfig) -> None:
    """A cached teacher: logits only, and a complete cache written for this teacher, data and batch layout."""
    from trainer import cache
    from trainer.build import checked_cache  # torch and the models: only once a check needs them

    _check(
        not cfg.distill.features,
        "distill.features",
        "feature distillation needs the teacher's hidden states: not available with teacher.placement=cache",
    )
    _check(
        cfg.teacher.cache_dir is not None,
        "teacher.cache_dir",
        "teacher.placement=cache needs teacher.cache_dir=PATH (written by python -m trainer.cache)",
    )
    assert cfg.teacher.cache_dir is not None  # checked above
    if cfg.teacher.cache_build:
        if not (Path(cfg.teacher.cache_dir) / cache.MANIFEST).exists():
            return  # written before training starts (trainer.cli.train.build_cache_if_missing)
    try:
        checked_cache(cfg, complete=not cfg.teacher.cache_build)
    except cache.CacheError as e:
        raise ConfigError("teacher.cache_dir", str(e)) from None


def _validate_compress(cfg: RunConfig) -> None:
    """The modifiers' own checks, then those against the student itself (target patterns, widths that group
    sizes and N:M groups must divide), on a copy built on the meta device: no memory, no weights."""
    from trainer.build import student_spec  # torch and the models: only once a check needs them

    if not cfg.compress.modifiers:
        return
    import torch

    from trainer.compress import build_compressor, validate_modifiers

    family, config = student_spec(cfg)
    validate_modifiers(cfg.compress.modifiers, family)
    with torch.device("meta"):
        build_compressor(family.build(config), cfg.compress.modifiers)
