"""The teacher logit cache on disk: a manifest, and shards of top-k logits as memory-mapped files.

A cache holds, for every training step ``0..steps-1`` and every sample of that step's global batch (a pure
function of the seed and the step), the teacher's top-k raw logits (values and vocabulary indices) and the
log-sum-exp of all its logits, per token. Values are raw (temperature 1), so any ``distill.temperature``
can use them. Shard ``i`` holds a contiguous range of steps in four files::

    shard_00000/values.bin    [steps_i, batch_size, positions, k]  fp32 | bf16 | fp16 (manifest "values_dtype")
    shard_00000/indices.bin   [steps_i, batch_size, positions, k]  int16 | int32
    shard_00000/lse.bin       [steps_i, batch_size, positions]     fp32
    shard_00000/progress.json {"done": steps written}              replaced atomically after each flushed step

``python -m trainer.cache`` writes it (trainer/cache.py); ``CacheReader`` reads it by (step, rows).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from trainer.config import sequence_length

if TYPE_CHECKING:
    from trainer.config import RunConfig

MANIFEST = "manifest.json"
FORMAT = "stillroom-teacher-cache/1"
VALUE_DTYPES: dict[str, tuple[type[Any], torch.dtype]] = {
    "fp32": (np.float32, torch.float32),
    "fp16": (np.float16, torch.float16),
    "bf16": (np.int16, torch.bfloat16),
}  # bf16 stored as its raw 16 bits


class CacheError(ValueError):
    """A cache that is missing, incomplete, or written for another teacher, data set or batch layout."""


@dataclass(frozen=True)
class CacheKey:
    """What a cache was written for; a run may read it only when its own key is equal (steps: at most)."""

    teacher: str  # teacher.fingerprint of the teacher's files
    data: str  # data.fingerprint
    val_fraction: float
    seed: int
    batch_size: int
    block_size: int
    k: int
    vocab: int
    precision: str


@dataclass(frozen=True)
class Manifest:
    key: CacheKey
    steps: int
    positions: int  # tokens per sample (block_size for text, 1 for digits)
    values_dtype: str
    indices_dtype: str
    shards: tuple[tuple[int, int], ...]  # [start, stop) steps of each shard

    def to_json(self) -> dict:
        return {"format": FORMAT, "values": "raw logits (temperature 1)", **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict) -> Manifest:
        if raw.get("format") != FORMAT:
            raise CacheError(f"unknown cache format {raw.get('format')!r} (expected {FORMAT})")
        return cls(
            key=CacheKey(**raw["key"]),
            steps=raw["steps"],
            positions=raw["positions"],
            values_dtype=raw["values_dtype"],
            indices_dtype=raw["indices_dtype"],
            shards=tuple(tuple(s) for s in raw["shards"]),
        )

    def shape(self, shard: int) -> tuple[int, int, int, int]:
        start, stop = self.shards[shard]
        return stop - start, self.key.batch_size, self.positions, self.key.k


def expected_key(cfg: RunConfig) -> CacheKey:
    """The key of the cache that ``cfg``'s run reads (and ``python -m trainer.cache`` with ``cfg`` writes)."""
    from trainer import data
    from trainer.distill import teacher

    vocab = data.vocab_size(cfg.data)
    assert cfg.teacher.checkpoint is not None  # a cache is of a teacher: preflight and trainer.cache check it
    return CacheKey(
        teacher=teacher.fingerprint(cfg.teacher.checkpoint),
        data=data.fingerprint(cfg.data),
        val_fraction=cfg.data.val_fraction,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        block_size=sequence_length(cfg),
        k=cfg.distill.top_k or vocab,
        vocab=vocab,
        precision=cfg.train.precision,
    )


def new_manifest(key: CacheKey, steps: int, positions: int, values_dtype: str, n_shards: int) -> Manifest:
    """Steps split into ``n_shards`` contiguous ranges (one per writing rank)."""
    bounds = [steps * i // n_shards for i in range(n_shards + 1)]
    return Manifest(
        key=key,
        steps=steps,
        positions=positions,
        values_dtype=values_dtype,
        indices_dtype="int16" if key.vocab <= np.iinfo(np.int16).max + 1 else "int32",
        shards=tuple(zip(bounds[:-1], bounds[1:])),
    )


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST}; write one with python -m trainer.cache)")
    return Manifest.from_json(json.loads(path.read_text()))


def shard_dir(root: Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:05d}"


def steps_done(root: Path, shard: int) -> int:
    """Steps of ``shard`` written and flushed (0 when it was never started)."""
    progress = shard_dir(root, shard) / "progress.json"
    return json.loads(progress.read_text())["done"] if progress.is_file() else 0


def _memmaps(
    root: Path, manifest: Manifest, shard: int, mode: Literal["r", "r+", "w+"]
) -> tuple[np.memmap, np.memmap, np.memmap]:
    folder = shard_dir(root, shard)
    shape = manifest.shape(shard)
    return (
        np.memmap(folder / "values.bin", dtype=VALUE_DTYPES[manifest.values_dtype][0], mode=mode, shape=shape),
        np.memmap(folder / "indices.bin", dtype=manifest.indices_dtype, mode=mode, shape=shape),
        np.memmap(folder / "lse.bin", dtype=np.float32, mode=mode, shape=shape[:-1]),
    )


class ShardWriter:
    """Writes one shard step by step; ``done`` says where an interrupted build resumes."""

    def __init__(self, root: Path, manifest: Manifest, shard: int):
        self.root, self.manifest, self.shard = Path(root), manifest, shard
        self.start, self.stop = manifest.shards[shard]
        self.done = steps_done(root, shard)
        shard_dir(root, shard).mkdir(parents=True, exist_ok=True)
        self.values, self.indices, self.lse = _memmaps(root, manifest, shard, "r+" if self.done else "w+")

    def write(self, step: int, logits: torch.Tensor) -> None:
        """Store step ``step``'s ``[batch_size, positions, V]`` teacher logits (steps in order), then record it."""
        assert step == self.start + self.done, f"shard {self.shard}: step {step} written out of order"
        logits = logits.detach().float().reshape(self.manifest.key.batch_size, self.manifest.positions, -1).cpu()
        values, indices = logits.topk(self.manifest.key.k, dim=-1)
        row = step - self.start
        stored = values.to(VALUE_DTYPES[self.manifest.values_dtype][1])
        self.values[row] = (stored.view(torch.int16) if self.manifest.values_dtype == "bf16" else stored).numpy()
        self.indices[row] = indices.numpy().astype(self.manifest.indices_dtype)
        self.lse[row] = torch.logsumexp(logits, dim=-1).numpy()
        for array in (self.values, self.indices, self.lse):
            array.flush()
        self.done += 1
        write_json_atomic(shard_dir(self.root, self.shard) / "progress.json", {"done": self.done})


class CacheReader:
    """Top-k teacher logits by (step, rows of the global batch), from a complete cache."""

    def __init__(self, root: Path, manifest: Manifest):
        self.manifest = manifest
        self.arrays = [_memmaps(root, manifest, shard, "r") for shard in range(len(manifest.shards))]

    def read(self, step: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values fp32, indices int64) ``[len(rows), positions, k]`` and log-sum-exp ``[len(rows), positions]``."""
        shard = next(i for i, (start, stop) in enumerate(self.manifest.shards) if start <= step < stop)
        values, indices, lse = self.arrays[shard]
        row, picked = step - self.manifest.shards[shard][0], rows.numpy()
        stored = torch.from_numpy(np.ascontiguousarray(values[row, picked]))
        if self.manifest.values_dtype == "bf16":
            stored = stored.view(torch.bfloat16)
        return (
            stored.float(),
            torch.from_numpy(indices[row, picked].astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(lse[row, picked])),
        )


def check(cfg: RunConfig) -> Manifest:
    """The manifest of ``cfg.teacher.cache_dir`` if ``cfg``'s run may read it; else CacheError (one line)."""
    assert cfg.teacher.cache_dir is not None  # preflight: placement=cache names it
    root = Path(cfg.teacher.cache_dir)
    manifest = read_manifest(root)
    want, got = asdict(expected_key(cfg)), asdict(manifest.key)
    differ = [f"{name} {got[name]!r} != {want[name]!r}" for name in want if got[name] != want[name]]
    if differ:
        raise CacheError(
            f"{root} was written for another run (cache vs this run: {'; '.join(differ)}); "
            "rebuild it with python -m trainer.cache and this run's overrides"
        )
    if cfg.train.max_steps > manifest.steps:
        raise CacheError(f"{root} holds {manifest.steps} steps but train.max_steps is {cfg.train.max_steps}")
    missing = [i for i in range(len(manifest.shards)) if not _shard_complete(root, manifest, i)]
    if missing:
        raise CacheError(
            f"{root} is incomplete: shards {missing} of {len(manifest.shards)} are missing or "
            "unfinished (run python -m trainer.cache again to finish them)"
        )
    return manifest


def _shard_complete(root: Path, manifest: Manifest, shard: int) -> bool:
    start, stop = manifest.shards[shard]
    folder = shard_dir(root, shard)
    count = stop - start
    for name, dtype in (
        ("values.bin", VALUE_DTYPES[manifest.values_dtype][0]),
        ("indices.bin", manifest.indices_dtype),
        ("lse.bin", np.float32),
    ):
        per_token = manifest.key.k if name != "lse.bin" else 1
        size = count * manifest.key.batch_size * manifest.positions * per_token * np.dtype(dtype).itemsize
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return False
    return steps_done(root, shard) == count
