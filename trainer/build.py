"""Building a run, one part at a time in a fixed order: data, mesh, student, teacher, feature projections,
compression, the student's runtime (its parallel layout), optimizer. Every rank builds the same way, so every
rank draws the same initial weights from the seed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.env import DistEnv
from parallel.mesh import ParallelDims
from trainer import cache, data, models
from trainer.cache import documents
from trainer.config import TOKENIZED_DATA, ConfigError, MemberConfig, ModifierConfig, RunConfig, parallel_dims
from trainer.cut import from_teacher
from trainer.distill import teacher as teacher_io
from trainer.distill.align import Aligner, SharedVocab, token_keys, token_strings
from trainer.distill.cached import DocumentCachedTeacher
from trainer.distill.features import FeatureDistiller
from trainer.distill.interface import Teacher
from trainer.distill.placement import (
    AlignedTeacher,
    EnsembleTeacher,
    RemoteAlignedTeacher,
    build_teacher,
    load_sharded_teacher,
)
from trainer.models.hf import HFConfig, decoder_for
from trainer.models.protocol import ModelFamily, family_of
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


def student_spec(cfg: RunConfig) -> tuple[ModelFamily, Any]:
    """The student's model family and its checked config dataclass (vocabulary or input size from the data; a
    student cut from the teacher: the cut model's). Raises ConfigError naming the key."""
    try:
        if from_teacher.is_cut(cfg.student):
            return from_teacher.spec(cfg.student, cfg.teacher.checkpoint, cfg.data)
        family, config = models.student_config(cfg.student, data.model_fields(cfg.data))
        if isinstance(config, HFConfig):  # the family of its model type answers for it (its spec, or the generic path)
            family = decoder_for(config.resolve().model_type)
        return family, config
    except models.ConfigFieldError as e:
        raise ConfigError(f"student.{e.key}", e.message) from None


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint besides the model, by config key (a checkpoint records
    it; ``train.allow_resume_changes`` waives the check of the keys it names): the teacher (its resolved path), the
    data, and the batches and learning rates of the steps."""
    t, teacher = cfg.train, cfg.teacher.checkpoint
    who: Any = str(Path(teacher).resolve()) if teacher is not None and cfg.distill.needs_teacher else None
    if cfg.teacher.members and cfg.distill.needs_teacher:  # an ensemble: its teachers and their weights
        who = [[str(Path(m.checkpoint).resolve()), m.weight] for m in cfg.teacher.members]
    return {
        "teacher": who,
        "data": data.fingerprint(cfg.data),
        "data.val_fraction": cfg.data.val_fraction,
        "train.seed": t.seed,
        "train.batch_size": t.batch_size,
        "train.lr": t.lr,
        "train.min_lr": t.min_lr,
        "train.warmup_steps": t.warmup_steps,
        "train.max_steps": t.max_steps,
    }


def teacher_vocab(cfg: RunConfig) -> int | None:
    """The vocabulary ``cfg``'s teacher logits are cut to (None: its own; ``teacher_io.run_vocab_size``)."""
    assert cfg.teacher.checkpoint is not None  # only asked of a run with a teacher
    return teacher_io.run_vocab_size(cfg.teacher.checkpoint, cfg.data, cfg.hf_student_folder)


def load_teacher(cfg: RunConfig, device: torch.device) -> nn.Module:
    """``cfg``'s teacher, whole and frozen on ``device``, its logits cut to the student's real vocabulary (a teacher
    of another tokenizer keeps its own; a GGUF one in ``teacher.param_dtype``)."""
    assert cfg.teacher.checkpoint is not None  # preflight: a run that loads a teacher names it
    vocab = None if cross_tokenizer(cfg) is not None else teacher_vocab(cfg)
    return teacher_io.load(cfg.teacher.checkpoint, device, vocab_size=vocab, dtype=cfg.teacher.param_dtype)


def cache_key(cfg: RunConfig) -> cache.CacheKey:
    """The key of the teacher cache ``cfg``'s run reads (and ``python -m trainer.cache`` with ``cfg`` writes)."""
    assert cfg.teacher.checkpoint is not None  # a cache is of a teacher: preflight and trainer.cache check it
    alignment = teacher_io.vocab_alignment(cfg.teacher.checkpoint, cfg.data, cfg.hf_student_folder)
    vocab = alignment.real if alignment is not None else data.vocab_size(cfg.data)  # cut as in a live run
    return cache.expected_key(cfg.teacher, cfg.data, cfg.train, cfg.distill.top_k, cfg.sequence_length, vocab)


def document_key(cfg: RunConfig) -> documents.DocumentKey:
    """The key of the cache kept by document that ``cfg``'s run reads (and ``python -m trainer.cache`` writes); its
    k is None where ``distill.top_k`` is (a reader takes the cache's)."""
    assert cfg.teacher.checkpoint is not None  # preflight: a run with a teacher names it
    return documents.DocumentKey(
        teacher=teacher_io.fingerprint(cfg.teacher.checkpoint),
        corpus=data.shards.corpus_fingerprint(cfg.data),
        k=cfg.distill.top_k,
        temperature=cfg.distill.temperature,
    )


def checked_cache(cfg: RunConfig, complete: bool = True) -> cache.Manifest | documents.DocumentManifest:
    """The manifest of ``teacher.cache_dir`` (of its ``teacher.cache_layout``) if ``cfg``'s run may read it (once
    finished, if not ``complete``); else CacheError (one line)."""
    assert cfg.teacher.cache_dir is not None  # preflight: placement=cache names it
    if cfg.teacher.cache_layout == "documents":
        return documents.check(Path(cfg.teacher.cache_dir), document_key(cfg), complete)
    return cache.check(cfg.teacher.cache_dir, cache_key(cfg), cfg.train.max_steps, cfg.distill, complete)


def document_teacher(cfg: RunConfig, batches: data.Batches) -> DocumentCachedTeacher:
    """The teacher of a cache kept by document, read at the positions where the student's tokens end where the
    teacher's do; what the two vocabularies share said in one line on rank 0."""
    from trainer.data import spans, tokenizer

    assert cfg.teacher.cache_dir is not None  # preflight: placement=cache names it
    root = Path(cfg.teacher.cache_dir)
    reader = documents.DocumentCache(root, documents.check(root, document_key(cfg)))
    ours = tokenizer.load(cfg.data.tokenizer)
    shared = SharedVocab.of(token_keys(ours, token_strings(ours)), reader.teacher_keys)
    to_student = torch.full((reader.manifest.vocab,), -1, dtype=torch.long)
    to_student[shared.teacher] = shared.student
    dataset = batches.dataset
    assert isinstance(dataset, data.TextData)  # preflight: a cache kept by document holds data=text
    token_spans, t = spans.load(cfg.data, dataset.root), cfg.train

    def row_spans(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = dataset.train_starts(t.seed, step, t.batch_size, batches.shard, micro)
        return token_spans.of(starts, dataset.block_size + 1)

    if os.environ.get("RANK", "0") == "0":
        print(
            f"teacher cache {root}: kept by document, read through span alignment (the teacher's tokenizer has "
            f"{reader.manifest.vocab} tokens, the student's {len(ours)}; {len(shared.student)} shared)",
            file=sys.stderr,
        )
    return DocumentCachedTeacher(reader, row_spans, to_student, len(ours))


def build_student(cfg: RunConfig, dataset: Any) -> nn.Module:
    """A freshly initialised student of ``cfg.student``'s family (its vocabulary or input size from the data), or one
    cut out of the teacher (calibrated on ``dataset``'s training batches)."""
    if from_teacher.is_cut(cfg.student):
        return from_teacher.build(cfg.student, cfg.teacher.checkpoint, cfg.data, dataset, cfg.train.batch_size)
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
    from trainer.distill.sampling import on_policy_rows

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


def cross_tokenizer(cfg: RunConfig) -> str | None:
    """How ``cfg``'s run meets a teacher of another tokenizer: ``span`` or ``uld`` (``distill.align``; ``auto`` is
    ``span`` where the tokenizers differ); None where the teacher reads the student's token ids."""
    from trainer.data import tokenizer
    from trainer.data.errors import DataError

    how, checkpoint = cfg.distill.align, cfg.teacher.checkpoint
    if how == "exact" or checkpoint is None or cfg.data.name not in TOKENIZED_DATA or not cfg.distill.needs_teacher:
        return None
    try:
        theirs = tokenizer.load(checkpoint)
    except DataError:
        if how == "auto":
            return None  # a teacher without a tokenizer of its own reads the student's ids
        raise ConfigError("distill.align", f"{how} needs the teacher's own tokenizer; {checkpoint} has none") from None
    if how == "auto":
        return None if tokenizer.load(cfg.data.tokenizer).get_vocab() == theirs.get_vocab() else "span"
    return how


def aligned_teacher(
    cfg: RunConfig,
    how: str,
    dims: ParallelDims,
    device: torch.device,
    batches: data.Batches,
    remote_slot: tuple[int, int] = (0, 1),
) -> AlignedTeacher:
    """``cfg``'s teacher of another tokenizer in its placement: replicated on ``device``, sharded over ``dims``'
    data-parallel ranks, or on a teacher rank (of whose teachers it is ``remote_slot``; the next micro-batch of
    ``batches``, aligned, is requested ahead); its choice and what the two vocabularies share said in one line on
    rank 0."""
    from parallel.remote import RemoteClient, Roles
    from trainer.data import tokenizer

    checkpoint = cfg.teacher.checkpoint
    assert checkpoint is not None  # cross_tokenizer: a run with a teacher
    ours, theirs = tokenizer.load(cfg.data.tokenizer), tokenizer.load(checkpoint)
    aligner = Aligner(ours, theirs)
    config = teacher_io.spec(checkpoint)["config"]
    context = config.get("block_size")
    aligned: AlignedTeacher
    if cfg.teacher.placement == "remote":
        server = Roles(dist.get_world_size(), cfg.parallel.teacher_ranks).server_of(dist.get_rank())
        after = micro_batch_after(cfg, batches)

        def next_input(key: tuple) -> tuple[tuple, torch.Tensor] | None:
            following = after(key)
            return None if following is None else (following[0], aligner(following[1]).teacher_ids)

        client = RemoteClient(server, config["vocab_size"], next_input, teacher=remote_slot)
        aligned = RemoteAlignedTeacher(client, aligner, how, context)
    elif cfg.teacher.placement == "shard":
        module = load_sharded_teacher(cfg.teacher, dims, device, None)
        aligned = AlignedTeacher(module, aligner, how, context, placement="shard")
    else:
        aligned = AlignedTeacher(teacher_io.load(checkpoint, device, dtype=cfg.teacher.param_dtype), aligner, how,
                                 context)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        print(
            f"distill.align={cfg.distill.align}: {how} (the teacher's tokenizer has {len(theirs)} tokens, the "
            f"student's {len(ours)}; {len(aligner.shared.student)} shared)",
            file=sys.stderr,
        )
    return aligned


def member_config(cfg: RunConfig, member: MemberConfig) -> RunConfig:
    """``cfg`` with ensemble ``member`` as its one teacher (a cached one read from its cache kept by document)."""
    teacher = dataclasses.replace(cfg.teacher, checkpoint=member.checkpoint, members=[], placement=member.placement)
    if member.placement == "cache":
        teacher = dataclasses.replace(teacher, cache_dir=member.cache_dir, cache_layout="documents",
                                      cache_dtype="compact", cache_build=False)  # fmt: skip
    return dataclasses.replace(cfg, teacher=teacher, data=dataclasses.replace(cfg.data))


def remote_teachers(cfg: RunConfig) -> list[RunConfig]:
    """The runs of the teachers that ``cfg``'s teacher ranks hold, in the order they hold them: its one remote teacher,
    or its ensemble's remote members."""
    if cfg.teacher.placement == "remote":
        return [cfg]
    return [member_config(cfg, cfg.teacher.members[i]) for i in cfg.teacher.remote_members]


def build_run_teacher(
    cfg: RunConfig,
    dims: ParallelDims,
    device: torch.device,
    batches: data.Batches,
    vocab: int,
    remote_slot: tuple[int, int] = (0, 1),
) -> Teacher | None:
    """The run's teacher in its placement (None for a run without one); ``vocab``: the data's classes;
    ``remote_slot``: a remote teacher's index among the teachers its teacher rank holds, and their number."""
    if not cfg.distill.needs_teacher:
        return None
    if cfg.teacher.members:
        members, remote = [], cfg.teacher.remote_members
        for i, member in enumerate(cfg.teacher.members):
            slot = (remote.index(i), len(remote)) if i in remote else (0, 1)
            built = build_run_teacher(member_config(cfg, member), dims, device, batches, vocab, slot)
            assert built is not None  # a member of a run that needs a teacher
            members.append((member.weight, built))
        return EnsembleTeacher(members)
    placement = cfg.teacher.placement
    if placement == "cache" and cfg.teacher.cache_layout == "documents":
        return document_teacher(cfg, batches)
    how = cross_tokenizer(cfg)
    if how is not None:
        return aligned_teacher(cfg, how, dims, device, batches, remote_slot)
    manifest = checked_cache(cfg) if placement == "cache" else None
    assert manifest is None or isinstance(manifest, cache.Manifest)  # a cache kept by document: returned above
    return build_teacher(
        cfg.teacher,
        cfg.distill,
        dims,
        device,
        batches.shard,
        vocab,
        real_vocab=teacher_vocab(cfg) if placement in ("remote", "replicate", "shard") else None,
        next_input=micro_batch_after(cfg, batches),
        cache_manifest=manifest,
        teacher_ranks=cfg.parallel.teacher_ranks,
        remote_slot=remote_slot,
    )


def build_run(cfg: RunConfig, env: DistEnv) -> RunParts:
    t = cfg.train
    torch.manual_seed(t.seed)
    dataset = data.build(cfg.data, cfg.sequence_length)
    dims = parallel_dims(cfg.parallel, env.world_size)
    mesh = dims.build_mesh(env.device.type)
    batches = data.Batches(
        dataset, data.Shard(dims.dp_rank(mesh), dims.dp_size, t.grad_accum), t.seed, t.batch_size, env.device
    )
    student = build_student(cfg, dataset).to(env.device)
    teacher = build_run_teacher(cfg, dims, env.device, batches, getattr(dataset, "vocab_size", 0))
    features = build_features(cfg, student, teacher)
    compressor = build_compressor(student, cfg.compress.modifiers)
    spec = models.model_spec(student)
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
    )
    layout = Layout(dims=dims, mesh=mesh, device=env.device, batches=batches, autocast=autocast)
    runtime = build_runtime(
        cfg.distill, cfg.parallel, cfg.train, student, family_of(student), features, layout, teacher, compressor
    )
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
