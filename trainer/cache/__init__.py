"""The teacher logit cache on disk: a manifest, and shards of top-k logits as memory-mapped files.

A cache holds, for every training step ``0..steps-1`` and every sample of that step's global batch (a pure
function of the seed and the step), the teacher's top-k raw logits (values and vocabulary indices) and the
log-sum-exp of all its logits at the manifest's ``lse_temperature`` (the writing run's ``distill.temperature``;
``distill.top_k_tail`` needs it to equal the reading run's), per token. Values are raw (temperature 1), so any
``distill.temperature`` can use them. Shard ``i`` holds a contiguous range of steps in five files::

    shard_00000/values.bin     [steps_i, batch_size, positions, k]  fp32 | bf16 | fp16 (manifest "values_dtype")
    shard_00000/indices.bin    [steps_i, batch_size, positions, k]  int16 | int32
    shard_00000/lse.bin        [steps_i, batch_size, positions]     fp32: logsumexp(logits / lse_temperature)
    shard_00000/checksums.bin  [steps_i, batch_size, 3]             uint32: CRC32 of each (step, sample)'s bytes in
                                                                    values.bin, indices.bin and lse.bin
    shard_00000/progress.json  {"done": steps written}              replaced atomically after each flushed step

With ``values_dtype`` ``compact`` (``indices_dtype`` ``elias_fano``) values.bin and indices.bin hold each
position's top-k as uint8 rows of a fixed length (``trainer/cache/compact.py``: 6-bit codes and Elias-Fano ids;
150 bytes a position with lse.bin at k = 64 of 49,152 tokens, where fp32 values and int32 ids take 516), and
lse.bin the log-mass of the logits off the top-k instead (the reader adds the decoded top-k's to it).

``python -m trainer.cache`` writes it (trainer/cli/cache.py), and on a rerun verifies the steps already written;
``CacheReader`` reads it by (step, rows) and verifies every row it returns against its CRC32s.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch

from trainer.cache import compact

if TYPE_CHECKING:
    from trainer.config import DataConfig, DistillConfig, TeacherConfig, TrainConfig

MANIFEST = "manifest.json"
FORMAT = "stillroom-teacher-cache/3"  # /1 had no checksums.bin; /2 no lse_temperature (its log-sum-exp is at T=1)
DOCUMENTS_FORMAT = "stillroom-document-cache/1"  # trainer/cache/documents.py
READABLE_FORMATS = {FORMAT: None, "stillroom-teacher-cache/2": 1.0}  # format: lse_temperature its manifest implies
ROW_FILES = ("values.bin", "indices.bin", "lse.bin")  # checksummed per (step, sample), in this order
CHECKSUMS = "checksums.bin"
REBUILD = "rebuild it with python -m trainer.cache and this run's overrides (it rewrites the garbled steps)"
JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {  # a field's Python type: what JSON holds, and its name
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "dict": ((dict,), "an object"),
    "list": ((list,), "an array"),
}
VALUE_DTYPES: dict[str, tuple[type[Any], torch.dtype]] = {
    "fp32": (np.float32, torch.float32),
    "fp16": (np.float16, torch.float16),
    "bf16": (np.int16, torch.bfloat16),
    "compact": (np.uint8, torch.uint8),
}  # bf16 stored as its raw 16 bits; compact as trainer/cache/compact.py's rows
INDEX_DTYPES = ("int16", "int32", "elias_fano")


Parsed = TypeVar("Parsed")


class CacheError(ValueError):
    """A cache that is missing, incomplete, garbled, or written for another teacher, data set or batch layout."""


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
    data_files: dict[str, str] = field(default_factory=dict)  # {path: SHA-256} of the token shards read
    lse_temperature: float = 1.0  # lse.bin holds logsumexp(logits / lse_temperature)

    def to_json(self) -> dict:
        return {"format": FORMAT, "values": "raw logits (temperature 1)", **asdict(self)}

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        """The manifest in parsed JSON ``raw``: CacheError for another format, ValueError saying what is garbled."""
        if not isinstance(raw, dict):
            raise ValueError(f"{_excerpt(raw)} is not a JSON object")
        if _field(raw, "format", "str") not in READABLE_FORMATS:
            why = "kept by document: set teacher.cache_layout=documents" if raw["format"] == DOCUMENTS_FORMAT else (
                "format 1 had no checksums")  # fmt: skip
            raise CacheError(
                f"holds a cache of format {raw['format']!r}, not {FORMAT!r} ({why}): remove it and rebuild it with "
                "python -m trainer.cache"
            )
        key = _field(raw, "key", "dict")
        steps = _field(raw, "steps", "int")
        implied = READABLE_FORMATS[raw["format"]]
        return cls(
            lse_temperature=_field(raw, "lse_temperature", "float") if implied is None else implied,
            key=CacheKey(**{f.name: _field(key, f.name, str(f.type), "key.") for f in fields(CacheKey)}),
            steps=steps,
            positions=_field(raw, "positions", "int"),
            values_dtype=_choice(raw, "values_dtype", tuple(VALUE_DTYPES)),
            indices_dtype=_choice(raw, "indices_dtype", INDEX_DTYPES),
            shards=_shards(_field(raw, "shards", "list"), steps),
            data_files=raw.get("data_files") or {},
        )

    def shape(self, shard: int) -> tuple[int, int, int, int]:
        start, stop = self.shards[shard]
        return stop - start, self.key.batch_size, self.positions, self.key.k


def _field(raw: dict, name: str, kind: str, prefix: str = "") -> Any:
    """``raw[name]`` when it is of JSON type ``kind`` (a key of JSON_TYPES); else ValueError naming it."""
    if name not in raw:
        raise ValueError(f"{prefix}{name} is missing")
    value = raw[name]
    types, described = JSON_TYPES[kind]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{prefix}{name} is {_excerpt(value)}, not {described}")
    return value


def _excerpt(value: Any) -> str:
    """``value`` as JSON, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _choice(raw: dict, name: str, choices: tuple[str, ...]) -> str:
    value = _field(raw, name, "str")
    if value not in choices:
        raise ValueError(f"{name} is {value!r}, not one of {', '.join(choices)}")
    return value


def _shards(raw: list, steps: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) step pairs that cover ``0..steps`` in order; else ValueError."""
    shards = tuple((s[0], s[1]) for s in raw if isinstance(s, list) and len(s) == 2 and all(type(b) is int for b in s))
    starts = [0] + [stop for _, stop in shards[:-1]]
    if not shards or len(shards) != len(raw) or [a for a, _ in shards] != starts or shards[-1][1] != steps:
        raise ValueError(f"shards {_excerpt(raw)} are not [start, stop) pairs covering steps 0..{steps}")
    if any(start > stop for start, stop in shards):
        raise ValueError(f"shards {_excerpt(raw)} hold a range that ends before it starts")
    return shards


def expected_key(
    teacher: TeacherConfig, data_cfg: DataConfig, train: TrainConfig, top_k: int | None, block_size: int, vocab: int
) -> CacheKey:
    """The key of the cache a run reads (and ``python -m trainer.cache`` with the same overrides writes): of
    ``teacher``, the data, the batches ``train`` draws and the ``vocab`` entries the teacher's logits are cut to."""
    from trainer import data
    from trainer.distill import teacher as teacher_io

    assert teacher.checkpoint is not None  # a cache is of a teacher: preflight and trainer.cache check it
    return CacheKey(
        teacher=teacher_io.fingerprint(teacher.checkpoint),
        data=data.fingerprint(data_cfg),
        val_fraction=data_cfg.val_fraction,
        seed=train.seed,
        batch_size=train.batch_size,
        block_size=block_size,
        k=top_k or vocab,
        vocab=vocab,
        precision=train.precision,
    )


def new_manifest(
    key: CacheKey,
    steps: int,
    positions: int,
    values_dtype: str,
    n_shards: int,
    data_files: dict[str, str] | None = None,
    lse_temperature: float = 1.0,
) -> Manifest:
    """Steps split into ``n_shards`` contiguous ranges (one per writing rank); ``data_files``: the token shards."""
    bounds = [steps * i // n_shards for i in range(n_shards + 1)]
    return Manifest(
        key=key,
        steps=steps,
        positions=positions,
        values_dtype=values_dtype,
        indices_dtype=_index_dtype(key.vocab, values_dtype),
        shards=tuple(zip(bounds[:-1], bounds[1:])),
        data_files=data_files or {},
        lse_temperature=lse_temperature,
    )


def _index_dtype(vocab: int, values_dtype: str) -> str:
    if values_dtype == "compact":
        return "elias_fano"
    return "int16" if vocab <= np.iinfo(np.int16).max + 1 else "int32"


def bytes_per_position(manifest: Manifest) -> int:
    """Bytes one position takes in values.bin, indices.bin and lse.bin together."""
    return sum(dtype.itemsize * int(np.prod(shape[3:])) for dtype, shape in list(_layout(manifest, 0).values())[:3])


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def read_manifest(root: Path) -> Manifest:
    """The manifest of the cache of batches in ``root``; CacheError (one line, naming the file) when it cannot be
    used."""
    return parse_manifest(root, Manifest.from_json)


def parse_manifest(root: Path, parse: Callable[[Any], Parsed]) -> Parsed:
    """The manifest of the cache in ``root`` (``parse``: of its layout; ValueError where it is garbled, CacheError
    where it is another format); CacheError (one line, naming the file) when it cannot be used."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST}; write one with python -m trainer.cache)")
    try:
        return parse(json.loads(path.read_bytes()))
    except CacheError as e:
        raise CacheError(f"{root} {e}") from None
    except ValueError as e:  # not JSON (or not UTF-8), or not a manifest
        raise CacheError(
            f"{path} is garbled ({e}); remove the cache and rebuild it with python -m trainer.cache"
        ) from None


def shard_dir(root: Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:05d}"


def steps_done(root: Path, manifest: Manifest, shard: int) -> int:
    """Steps of ``shard`` written and flushed (0 when it was never started); CacheError when progress.json is
    garbled."""
    progress = shard_dir(root, shard) / "progress.json"
    if not progress.is_file():
        return 0
    start, stop = manifest.shards[shard]
    try:
        raw = json.loads(progress.read_bytes())
        done = _field(raw if isinstance(raw, dict) else {}, "done", "int")
        if not 0 <= done <= stop - start:
            raise ValueError(f"done is {done}, not in 0..{stop - start}")
    except ValueError as e:
        raise CacheError(
            f"{progress} is garbled ({e}); remove {progress.parent} and run python -m trainer.cache again"
        ) from None
    return done


def _layout(manifest: Manifest, shard: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each array file of ``shard``: its dtype and shape (ROW_FILES, then CHECKSUMS)."""
    shape = manifest.shape(shard)
    values_shape = indices_shape = shape
    if manifest.values_dtype == "compact":
        values_shape = (*shape[:-1], compact.value_bytes(manifest.key.k))
        indices_shape = (*shape[:-1], compact.index_bytes(manifest.key.k, manifest.key.vocab))
    return {
        "values.bin": (np.dtype(VALUE_DTYPES[manifest.values_dtype][0]), values_shape),
        "indices.bin": (
            np.dtype(np.uint8 if manifest.indices_dtype == "elias_fano" else manifest.indices_dtype),
            indices_shape,
        ),
        "lse.bin": (np.dtype(np.float32), shape[:-1]),
        CHECKSUMS: (np.dtype(np.uint32), (*shape[:2], len(ROW_FILES))),
    }


def _sized(root: Path, manifest: Manifest, shard: int) -> bool:
    """Whether every array file of ``shard`` exists with the size of its shape."""
    folder = shard_dir(root, shard)
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == dtype.itemsize * int(np.prod(shape))
        for name, (dtype, shape) in _layout(manifest, shard).items()
    )


def _memmaps(root: Path, manifest: Manifest, shard: int, mode: Literal["r", "r+", "w+"]) -> list[np.memmap]:
    """values, indices, lse and checksums of ``shard``."""
    folder = shard_dir(root, shard)
    return [
        np.memmap(folder / name, dtype=dtype, mode=mode, shape=shape)
        for name, (dtype, shape) in _layout(manifest, shard).items()
    ]


def row_checksums(parts: list[np.ndarray]) -> np.ndarray:
    """uint32 ``[rows, len(parts)]``: CRC32 of each row (first axis) of each array in ``parts``."""
    parts = [np.ascontiguousarray(part) for part in parts]
    return np.array([[zlib.crc32(part[i]) for part in parts] for i in range(len(parts[0]))], dtype=np.uint32)


def _garbled(root: Path, shard: int, step: int, rows: np.ndarray, got: np.ndarray, written: np.ndarray) -> str | None:
    """The first file and row whose checksum ``got`` differs from the one ``written``, as one line; else None."""
    bad = np.argwhere(got != written)
    if not len(bad):
        return None
    row, file = bad[0]
    return (
        f"{shard_dir(root, shard).absolute() / ROW_FILES[file]} is garbled at step {step}, row {rows[row]} (its CRC32 "
        "differs from the one written)"
    )


class ShardWriter:
    """Writes one shard step by step; ``done`` says where a rerun resumes: after the steps already written whose
    checksums hold (verified when the writer opens the shard; a garbled step is written again, and those after it)."""

    def __init__(self, root: Path, manifest: Manifest, shard: int):
        self.root, self.manifest, self.shard = Path(root), manifest, shard
        self.start, self.stop = manifest.shards[shard]
        shard_dir(root, shard).mkdir(parents=True, exist_ok=True)
        recorded = steps_done(root, manifest, shard)
        self.done = self.verified_steps(recorded) if _sized(root, manifest, shard) else 0
        if self.done != recorded:
            self.record()  # before a "w+" open empties the files
        *self.rows, self.checksums = _memmaps(root, manifest, shard, "r+" if self.done else "w+")

    def verified_steps(self, done: int) -> int:
        """How many of the ``done`` steps written, from the first, match their checksums."""
        *rows, checksums = _memmaps(self.root, self.manifest, self.shard, "r")
        everyone = np.arange(self.manifest.key.batch_size)
        for at in range(done):
            problem = _garbled(
                self.root, self.shard, self.start + at, everyone, row_checksums([r[at] for r in rows]), checksums[at]
            )
            if problem:
                print(f"warning: {problem}; writing shard {self.shard} again from there", file=sys.stderr)
                return at
        return done

    def write(self, step: int, logits: torch.Tensor) -> None:
        """Store step ``step``'s ``[batch_size, positions, V]`` teacher logits (steps in order) and their checksums,
        then record it."""
        assert step == self.start + self.done, f"shard {self.shard}: step {step} written out of order"
        logits = logits.detach().float().reshape(self.manifest.key.batch_size, self.manifest.positions, -1).cpu()
        values, indices = logits.topk(self.manifest.key.k, dim=-1)
        at = step - self.start
        temperature = self.manifest.lse_temperature
        whole = compact.tail_of if self.manifest.values_dtype == "compact" else _logsumexp
        parts = (*_stored(self.manifest, values, indices), whole(logits, indices, temperature).numpy())
        for array, part in zip(self.rows, parts):
            array[at] = part
        self.checksums[at] = row_checksums([array[at] for array in self.rows])
        for array in (*self.rows, self.checksums):
            array.flush()
        self.done += 1
        self.record()

    def record(self) -> None:
        write_json_atomic(shard_dir(self.root, self.shard) / "progress.json", {"done": self.done})


def _stored(manifest: Manifest, values: torch.Tensor, indices: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``values`` (fp32) and ``indices`` as values.bin and indices.bin store them."""
    if manifest.values_dtype == "compact":
        return compact.encode(values.numpy(), indices.numpy(), manifest.key.vocab)
    stored = values.to(VALUE_DTYPES[manifest.values_dtype][1])
    if manifest.values_dtype == "bf16":
        stored = stored.view(torch.int16)
    return stored.numpy(), indices.numpy().astype(manifest.indices_dtype)


def _logsumexp(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp(logits / temperature, dim=-1)


def _loaded(
    manifest: Manifest, values: np.ndarray, indices: np.ndarray, lse: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`_stored`: values fp32 (descending), indices int64 and the log-sum-exp."""
    if manifest.values_dtype == "compact":
        k, vocab = manifest.key.k, manifest.key.vocab
        return compact.unpack(values, indices, torch.from_numpy(lse), k, vocab, manifest.lse_temperature)
    stored = torch.from_numpy(values)
    if manifest.values_dtype == "bf16":
        stored = stored.view(torch.bfloat16)
    return stored.float(), torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(lse)


class CacheReader:
    """Top-k teacher logits by (step, rows of the global batch), from a complete cache; every row it returns is
    checked against the CRC32s written with it."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root, self.manifest = Path(root), manifest
        self.arrays = [_memmaps(root, manifest, shard, "r") for shard in range(len(manifest.shards))]

    def read(self, step: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values fp32, indices int64) ``[len(rows), positions, k]`` and log-sum-exp ``[len(rows), positions]``;
        CacheError naming the file, step and row when a row's bytes are not those written."""
        shard = next(i for i, (start, stop) in enumerate(self.manifest.shards) if start <= step < stop)
        *files, checksums = self.arrays[shard]
        at, picked = step - self.manifest.shards[shard][0], rows.numpy()
        values, indices, lse = (np.ascontiguousarray(array[at, picked]) for array in files)
        problem = _garbled(self.root, shard, step, picked, row_checksums([values, indices, lse]), checksums[at, picked])
        if problem:
            raise CacheError(f"{problem}; {REBUILD}")
        return _loaded(self.manifest, values, indices, lse)


def check(cache_dir: str, key: CacheKey, max_steps: int, distill: DistillConfig, complete: bool = True) -> Manifest:
    """The manifest of ``cache_dir`` if a run of ``key`` may read it for ``max_steps`` steps with ``distill``'s
    temperature (once finished, if not ``complete``); else CacheError (one line)."""
    root = Path(cache_dir)
    manifest = read_manifest(root)
    check_key(root, manifest.key, key, "another run")
    if max_steps > manifest.steps:
        raise CacheError(f"{root} holds {manifest.steps} steps but train.max_steps is {max_steps}")
    if distill.top_k_tail and manifest.lse_temperature != distill.temperature:
        raise CacheError(
            f"{root} holds the log-sum-exp at temperature {manifest.lse_temperature}, but distill.top_k_tail needs it "
            f"at distill.temperature={distill.temperature}: rebuild it with python -m trainer.cache and this "
            "run's overrides"
        )
    missing = [i for i in range(len(manifest.shards)) if not _shard_complete(root, manifest, i)]
    if missing and complete:
        raise CacheError(
            f"{root} is incomplete: shards {missing} of {len(manifest.shards)} are missing or "
            "unfinished (run python -m trainer.cache again to finish them)"
        )
    return manifest


def check_key(root: Path, written: Any, wanted: Any, other: str) -> None:
    """CacheError naming each field where the dataclass keys ``written`` (the cache's) and ``wanted`` (the run's)
    differ: the cache in ``root`` was written for ``other``."""
    want, got = asdict(wanted), asdict(written)
    differ = [f"{name} {got[name]!r} != {want[name]!r}" for name in want if got[name] != want[name]]
    if differ:
        raise CacheError(
            f"{root} was written for {other} (cache vs this run: {'; '.join(differ)}); "
            "rebuild it with python -m trainer.cache and this run's overrides"
        )


def _shard_complete(root: Path, manifest: Manifest, shard: int) -> bool:
    start, stop = manifest.shards[shard]
    return _sized(root, manifest, shard) and steps_done(root, manifest, shard) == stop - start
