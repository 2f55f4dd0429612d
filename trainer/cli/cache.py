"""``python -m trainer.cache [hydra overrides]``: run the teacher once over every batch training will read and
write its top-k logits to ``teacher.cache_dir`` (see trainer/cache/__init__.py for the format).

Give it the training run's overrides; train with them plus ``teacher.placement=cache``. Under torchrun each
rank writes its own shards (a contiguous range of steps each); a cache kept by document is planned by rank 0, and
its windows are shared out each round and written by rank 0 (``trainer/cache/documents.py``). Run it again to
finish an interrupted build, or to rewrite garbled steps: it verifies the steps already written against their
checksums first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import cast

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from parallel import env as dist_env
from trainer import cache, data
from trainer.build import cache_key, document_key, load_teacher
from trainer.cache import documents
from trainer.cli.train import CONF_DIR, fail, preflight
from trainer.config import ConfigError, RunConfig, register_configs
from trainer.data import shards, tokenizer
from trainer.distill import teacher as teacher_io
from trainer.distill.align import token_keys, token_strings
from trainer.failure import INTERRUPTED_EXIT, os_error_line, stop
from trainer.preflight import validate


def validate_build(cfg: RunConfig) -> None:
    """The run's own checks, then what writing its cache needs: a teacher, and a ``teacher.cache_dir`` to write
    in whose manifest, if it has one, is readable (ConfigError; nothing is written). A cache kept by document is
    checked as the run that reads it checks it (a cache it may finish)."""
    if cfg.teacher.cache_layout == "documents":
        validate(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, placement="cache",
                                                                      cache_build=True)))  # fmt: skip
    else:
        validate(cfg)
    if cfg.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint", "python -m trainer.cache needs a teacher (set teacher.checkpoint=PATH)")
    if cfg.teacher.cache_dir is None:
        raise ConfigError("teacher.cache_dir", "python -m trainer.cache needs teacher.cache_dir=PATH to write to")
    root = Path(cfg.teacher.cache_dir)
    check_writable(root)
    if (root / cache.MANIFEST).exists():
        try:
            cache.read_manifest(root)
        except cache.CacheError as e:
            raise ConfigError("teacher.cache_dir", str(e)) from None


def check_writable(root: Path) -> None:
    """ConfigError unless ``root`` is a folder this process may write in, or one it may create."""
    if root.exists() and not root.is_dir():
        raise ConfigError("teacher.cache_dir", f"{root} is a file, not a folder")
    nearest = next(folder for folder in (root, *root.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        raise ConfigError("teacher.cache_dir", f"cannot create {root}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        where = "" if nearest == root else f"cannot create {root}: "
        raise ConfigError("teacher.cache_dir", f"{where}{nearest} is read-only for this user")


def prepare(root: Path, manifest: cache.Manifest, is_main: bool) -> None:
    """Refuse an existing cache that is another one (every rank checks); else write ``manifest`` to a new cache
    (rank 0), or keep the existing cache's (and its shard layout)."""
    if (root / cache.MANIFEST).is_file():
        existing = cache.read_manifest(root)
        same = (existing.key, existing.steps, existing.positions, existing.values_dtype) == (
            manifest.key,
            manifest.steps,
            manifest.positions,
            manifest.values_dtype,
        )
        if not same:
            raise cache.CacheError(
                f"{root} holds a different cache (another teacher, data, k, seed, batch layout, "
                "steps or teacher.cache_dtype): remove it or choose another teacher.cache_dir"
            )
    elif is_main:
        root.mkdir(parents=True, exist_ok=True)
        cache.write_json_atomic(root / cache.MANIFEST, manifest.to_json())


def build(cfg: RunConfig, env: dist_env.DistEnv) -> cache.Manifest:
    """Write (or finish) the cache of ``cfg``'s run: this rank's shards; returns the manifest."""
    assert cfg.teacher.cache_dir is not None  # hydra_entry refuses a run without it
    root, t = Path(cfg.teacher.cache_dir), cfg.train
    dataset = data.build(cfg.data, cfg.sequence_length)
    prepare(
        root,
        cache.new_manifest(
            cache_key(cfg),
            t.max_steps,
            dataset.tokens_per_sample(),
            cfg.teacher.cache_dtype,
            env.world_size,
            dataset.shard_files() if isinstance(dataset, data.ShardData) else {},
            lse_temperature=cfg.distill.temperature,
        ),
        env.is_main,
    )
    if dist.is_initialized():
        dist.barrier()
    manifest = cache.read_manifest(root)
    teacher = load_teacher(cfg, env.device)
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
    )
    rows = t.batch_size // t.grad_accum  # the teacher runs on the micro-batches of a one-process run
    for shard in range(env.rank, len(manifest.shards), env.world_size):
        writer = cache.ShardWriter(root, manifest, shard)
        for step in range(writer.start + writer.done, writer.stop):
            x, _ = dataset.train_batch(t.seed, step, t.batch_size, data.Shard())
            with torch.no_grad(), autocast:
                logits = torch.cat([teacher(part.to(env.device)) for part in x.split(rows)])
            writer.write(step, logits)
    if dist.is_initialized():
        dist.barrier()
    return manifest


def build_by_document(cfg: RunConfig, env: dist_env.DistEnv) -> str:
    """Write (or finish) the cache kept by document of ``cfg``'s teacher and corpus; returns its summary line."""
    assert cfg.teacher.cache_dir is not None and cfg.teacher.checkpoint is not None  # validate_build checked both
    root, checkpoint = Path(cfg.teacher.cache_dir), cfg.teacher.checkpoint
    theirs = tokenizer.load(checkpoint)
    context = teacher_io.spec(checkpoint)["config"].get("block_size")
    window = min(cfg.teacher.cache_window, context or cfg.teacher.cache_window)
    key = document_key(cfg)
    if env.is_main and not (root / documents.MANIFEST).is_file():  # rank 0 plans; under torchrun the others wait
        planned = documents.plan(shards.documents(cfg.data), theirs, window)
        documents.write_plan(root, key, planned, token_keys(theirs, token_strings(theirs)), window)
    if dist.is_initialized():
        dist.barrier()
    manifest = documents.read_manifest(root)
    if (manifest.key, manifest.window) != (key, window):
        raise cache.CacheError(
            f"{root} holds a different cache (another teacher, corpus, k, temperature or teacher.cache_window): "
            "remove it or choose another teacher.cache_dir"
        )
    model = teacher_io.load(checkpoint, env.device, vocab_size=len(theirs), dtype=cfg.teacher.param_dtype)
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16)
        if cfg.train.precision == "bf16"
        else contextlib.nullcontext()
    )

    def logits(ids: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(ids)

    documents.build(root, manifest, logits, theirs.eos_token_id, cfg.train.batch_size, env.device)
    on_disk = documents.size_on_disk(root) / max(manifest.positions, 1)
    return (
        f"teacher cache {root}: kept by document, {manifest.documents} documents, {manifest.positions} teacher tokens "
        f"in {manifest.windows} windows of at most {manifest.window}, top-{key.k} of {manifest.vocab} (compact), "
        f"{on_disk:.1f} bytes per teacher token on disk"
    )


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(dict_cfg: DictConfig) -> None:
    try:
        cfg = cast(RunConfig, OmegaConf.to_object(dict_cfg))  # a structured config: its dataclass
        validate_build(cfg)
    except ConfigError as e:
        fail(str(e))
    env = dist_env.init(cfg.parallel.backend)
    try:
        line = build_by_document(cfg, env) if cfg.teacher.cache_layout == "documents" else summary(cfg, build(cfg, env))
    except cache.CacheError as e:
        fail(f"teacher.cache_dir: {e}")
    except OSError as e:  # a disk full while writing: the steps written so far are kept
        line = f"error: teacher.cache_dir: {os_error_line(e)}; the steps written so far are kept"
        stop(line, 1)
    except KeyboardInterrupt:
        stop(INTERRUPTED, INTERRUPTED_EXIT)
    finally:
        dist_env.shutdown()
    if env.is_main:
        print(line, file=sys.stderr)


def summary(cfg: RunConfig, manifest: cache.Manifest) -> str:
    """The line a finished cache of batches is described by."""
    k = manifest.key
    return (
        f"teacher cache {cfg.teacher.cache_dir}: {manifest.steps} steps x {k.batch_size} samples x "
        f"{manifest.positions} positions, top-{k.k} of {k.vocab} ({manifest.values_dtype} values), "
        f"{len(manifest.shards)} shards, {cache.bytes_per_position(manifest)} bytes per teacher token"
    )


INTERRUPTED = "interrupted by Ctrl-C; the steps written so far are kept: the same command finishes the cache"


def main() -> None:
    """Preflight and run with the live teacher: whatever ``teacher.placement`` the training run uses."""
    args = [arg for arg in sys.argv[1:] if not arg.lstrip("+").startswith("teacher.placement=")]
    sys.argv[1:] = [*args, "teacher.placement=replicate"]
    register_configs()
    preflight(sys.argv[1:], validate_build)
    hydra_entry()
