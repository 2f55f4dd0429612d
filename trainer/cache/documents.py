"""The teacher cache kept by document (``teacher.cache_layout=documents``): any student reads it, whatever its
tokenizer, block size, batch or seed.

``python -m trainer.cache`` tokenizes every document of ``data.files`` with the teacher's own tokenizer, runs the
teacher over each document in windows of at most ``teacher.cache_window`` tokens (a document's last window ends
with the teacher's end-of-text token, so that its last text token predicts the end), and stores for every teacher
token where it ends in its document's text and the teacher's next-token distribution after it: the compact top-k
and the log-mass of its tail (``trainer/cache/compact.py``). A student's position is looked up by its document
and the character its token ends at (``trainer/data/spans.py``): where a teacher token ends at the same character,
both predict the text that follows, each in its own tokens (``span`` alignment, ``trainer/distill/align.py``).
The key is the teacher's files, the documents' content, k and the temperature of the tails: not the student's
tokenizer or batches.

Files (P teacher tokens, W windows)::

    manifest.json   the key and the counts; written once the plan below is, so a folder with one is planned
    vocab.json      the teacher's token keys (``align.token_keys``): a reader needs no teacher tokenizer
    keys.bin        int64 [P]          document << 32 | character end, ascending
    tokens.bin      int32 [P]          the teacher's tokens
    windows.bin     int64 [W, 2]       each window's first position and its length
    values.bin      uint8 [P, value_bytes(k)]
    indices.bin     uint8 [P, index_bytes(k, V)]
    tail.bin        fp32  [P]          log-mass of the logits off the top-k at the manifest's temperature
    checksums.bin   uint32 [P, 3]      CRC32 of each position's bytes in values.bin, indices.bin and tail.bin
    progress.json   {"windows": windows written}, replaced after each batch of windows
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from trainer import cache
from trainer.cache import CacheError, compact, row_checksums, write_json_atomic

FORMAT = cache.DOCUMENTS_FORMAT
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
ROW_FILES = ("values.bin", "indices.bin", "tail.bin")
ENCODE_DOCUMENTS = 256  # documents tokenized at once while planning
REBUILD = "remove it and build it again with python -m trainer.cache and this run's overrides"


@dataclass(frozen=True)
class DocumentKey:
    """What a document cache was written from; a run reads it only when its own key is equal."""

    teacher: str  # teacher.fingerprint of the teacher's files
    corpus: str  # shards.corpus_fingerprint: the documents' content, whatever the tokenizer
    k: int | None  # a reader's None: the cache's k, whatever it is
    temperature: float  # of the tails (distill.temperature)


@dataclass(frozen=True)
class DocumentManifest:
    key: DocumentKey
    vocab: int  # the teacher's tokens (its tokenizer's length): the ids the rows hold
    window: int  # teacher positions a forward reads at most
    documents: int
    positions: int
    windows: int

    @property
    def k(self) -> int:
        """The top-k each position holds (a written cache's key always has it)."""
        assert self.key.k is not None  # written by python -m trainer.cache, whose preflight needs distill.top_k
        return self.key.k

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: Any) -> DocumentManifest:
        """The manifest in parsed JSON ``raw``: CacheError for another format, ValueError saying what is garbled."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != FORMAT:
            batches = str(raw.get("format")).startswith("stillroom-teacher-cache/")
            hint = "a cache of batches: set teacher.cache_layout=batches, or " if batches else ""
            raise CacheError(
                f"holds a cache of format {raw.get('format')!r}, not {FORMAT!r} ({hint}build one kept by document "
                "with python -m trainer.cache)"
            )
        try:
            key = raw["key"]
            return cls(
                key=DocumentKey(**{f.name: key[f.name] for f in fields(DocumentKey)}),
                **{f.name: int(raw[f.name]) for f in fields(cls) if f.name != "key"},
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{e} is missing or of another type") from None


def read_manifest(root: Path) -> DocumentManifest:
    """The manifest of the document cache in ``root``; CacheError (one line) when there is none or it is garbled."""
    return cache.parse_manifest(root, DocumentManifest.from_json)


def windows_done(root: Path) -> int:
    """Windows written and flushed (0 before the first)."""
    try:
        return int(json.loads((Path(root) / "progress.json").read_bytes())["windows"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def check(root: Path, key: DocumentKey, complete: bool = True) -> DocumentManifest:
    """The manifest of the document cache in ``root`` if a run of ``key`` may read it (finished, if ``complete``);
    else CacheError (one line, naming what differs)."""
    manifest = read_manifest(root)
    wanted = key if key.k is not None else dataclasses.replace(key, k=manifest.key.k)
    cache.check_key(root, manifest.key, wanted, "another teacher, corpus, k or temperature")
    done = windows_done(root)
    if complete and done < manifest.windows:
        raise CacheError(
            f"{root} is incomplete: {done} of {manifest.windows} windows written (run python -m trainer.cache again "
            "to finish it)"
        )
    return manifest


def _layout(manifest: DocumentManifest) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    p, k = manifest.positions, manifest.k
    return {
        "keys.bin": (np.dtype(np.int64), (p,)),
        "tokens.bin": (np.dtype(np.int32), (p,)),
        "windows.bin": (np.dtype(np.int64), (manifest.windows, 2)),
        "values.bin": (np.dtype(np.uint8), (p, compact.value_bytes(k))),
        "indices.bin": (np.dtype(np.uint8), (p, compact.index_bytes(k, manifest.vocab))),
        "tail.bin": (np.dtype(np.float32), (p,)),
        "checksums.bin": (np.dtype(np.uint32), (p, len(ROW_FILES))),
    }


def _memmaps(root: Path, manifest: DocumentManifest, mode: Literal["r", "r+", "w+"]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in _layout(manifest).items():
        if int(np.prod(shape)) == 0:  # numpy cannot map an empty file
            arrays[name] = np.zeros(shape, dtype)
            continue
        arrays[name] = np.memmap(Path(root) / name, dtype=dtype, mode=mode, shape=shape)
    return arrays


def _sized(root: Path, manifest: DocumentManifest) -> bool:
    return all(
        (Path(root) / name).is_file() and (Path(root) / name).stat().st_size == dtype.itemsize * int(np.prod(shape))
        for name, (dtype, shape) in _layout(manifest).items()
        if int(np.prod(shape))
    )


@dataclass
class Plan:
    """Every document's teacher tokens, their keys and the windows the teacher reads them in."""

    documents: int
    keys: np.ndarray  # int64 [P]
    tokens: np.ndarray  # int32 [P]
    windows: np.ndarray  # int64 [W, 2]


def plan(texts: Iterator[str], tokenizer: Any, window: int) -> Plan:
    """Tokenize ``texts`` (the corpus's documents, in order) with the teacher's ``tokenizer``; cut each document
    into windows of at most ``window - 1`` tokens (a window's last slot is the end-of-text token of a document's
    last window)."""
    keys: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    windows: list[tuple[int, int]] = []
    state = {"documents": 0, "position": 0}
    batch: list[str] = []

    def flush() -> None:
        for encoding in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
            number, first = state["documents"], state["position"]
            ends = np.array([end for _, end in encoding.offsets], dtype=np.int64)
            keys.append((np.int64(number) << 32) | ends)
            tokens.append(np.array(encoding.ids, dtype=np.int32))
            windows.extend((first + at, min(window - 1, len(ends) - at)) for at in range(0, len(ends), window - 1))
            state["documents"], state["position"] = number + 1, first + len(ends)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= ENCODE_DOCUMENTS:
            flush()
    flush()
    return Plan(
        documents=state["documents"],
        keys=np.concatenate(keys) if keys else np.zeros(0, np.int64),
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        windows=np.array(windows, dtype=np.int64).reshape(-1, 2),
    )


def write_plan(root: Path, key: DocumentKey, planned: Plan, vocab: list[str], window: int) -> DocumentManifest:
    """The plan's arrays and the teacher's token keys in ``root``, then the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = DocumentManifest(key, len(vocab), window, planned.documents, len(planned.keys), len(planned.windows))
    write_json_atomic(root / VOCAB, {"keys": vocab})
    arrays = _memmaps(root, manifest, "w+")
    for name, array in (("keys.bin", planned.keys), ("tokens.bin", planned.tokens), ("windows.bin", planned.windows)):
        arrays[name][:] = array
    _flush(arrays)
    write_json_atomic(root / "progress.json", {"windows": 0})
    write_json_atomic(root / MANIFEST, manifest.to_json())
    return manifest


Encoded = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # first position, values, ids, tail, checksums


class Writer:
    """Writes the teacher's rows window by window; ``done``: the windows already written whose checksums hold
    (verified when a writing writer opens; a garbled window is written again, and those after it). One that does not
    ``writes`` only reads the plan and encodes rows (another rank of a build writes them)."""

    def __init__(self, root: Path, manifest: DocumentManifest, writes: bool = True):
        self.root, self.manifest = Path(root), manifest
        if not _sized(self.root, manifest):
            raise CacheError(f"{root}: a file of the cache is missing or has another size; {REBUILD}")
        self.arrays = _memmaps(self.root, manifest, "r+" if writes else "r")
        self.done = self.verified(windows_done(self.root)) if writes else 0

    def verified(self, done: int) -> int:
        """How many of the first ``done`` windows match their checksums."""
        for at in range(done):
            first, length = (int(v) for v in self.arrays["windows.bin"][at])
            positions = np.arange(first, first + length)
            problem = garbled(self.root, self.arrays, positions)
            if problem:
                print(f"warning: {problem}; writing the cache again from window {at}", file=sys.stderr)
                return at
        return done

    def inputs(self, window: int, eos: int | None) -> list[int]:
        """The teacher's input of ``window``: its tokens, and the end-of-text token after a document's last."""
        first, length = (int(v) for v in self.arrays["windows.bin"][window])
        ids = self.arrays["tokens.bin"][first : first + length].tolist()
        last = first + length
        ends_document = last == self.manifest.positions or self.arrays["keys.bin"][last] >> 32 != (
            self.arrays["keys.bin"][first] >> 32
        )
        return ids + [eos] if ends_document and eos is not None else ids

    def encode(self, window: int, logits: torch.Tensor) -> Encoded:
        """The rows of ``window`` (``[length, V]``: its tokens' next-token logits) as stored, with their checksums."""
        first, length = (int(v) for v in self.arrays["windows.bin"][window])
        k, temperature = self.manifest.k, self.manifest.key.temperature
        logits = logits[:length].float().cpu()
        values, indices = logits.topk(k, dim=-1)
        value_rows, index_rows = compact.encode(values.numpy(), indices.numpy(), self.manifest.vocab)
        tail = compact.tail_of(logits, indices, temperature).numpy()
        return first, value_rows, index_rows, tail, row_checksums([value_rows, index_rows, tail[:, None]])

    def store(self, encoded: Encoded) -> None:
        """Put a window's encoded rows in place."""
        first, value_rows, index_rows, tail, checksums = encoded
        rows = slice(first, first + len(tail))
        self.arrays["values.bin"][rows], self.arrays["indices.bin"][rows] = value_rows, index_rows
        self.arrays["tail.bin"][rows], self.arrays["checksums.bin"][rows] = tail, checksums

    def record(self, windows: int) -> None:
        """Flush every array, then say ``windows`` are written."""
        _flush(self.arrays)
        self.done = windows
        write_json_atomic(self.root / "progress.json", {"windows": windows})


def _flush(arrays: dict[str, np.ndarray]) -> None:
    for array in arrays.values():
        if isinstance(array, np.memmap):
            array.flush()


def garbled(root: Path, arrays: dict[str, np.ndarray], positions: np.ndarray) -> str | None:
    """The first file and position among ``positions`` whose bytes differ from their checksums, as one line."""
    parts = [np.ascontiguousarray(arrays[name][positions]).reshape(len(positions), -1) for name in ROW_FILES]
    bad = np.argwhere(row_checksums(parts) != arrays["checksums.bin"][positions])
    if not len(bad):
        return None
    row, file = bad[0]
    document = int(arrays["keys.bin"][positions[row]]) >> 32
    return (
        f"{(Path(root) / ROW_FILES[file]).absolute()} is garbled at teacher position {positions[row]} (document "
        f"{document}; its CRC32 differs from the one written)"
    )


def build(
    root: Path,
    manifest: DocumentManifest,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    eos: int | None,
    batch: int,
    device: torch.device,
) -> int:
    """Run ``teacher`` (token ids ``[b, L]`` -> logits ``[b, L, V]``) over the windows not written yet, ``batch`` at a
    time (right-padded: causal attention keeps the padding out of the real positions); returns the windows written.

    Under torchrun each round of ``batch`` windows per rank is split over the ranks; each encodes its windows' rows
    and rank 0, the only writer, stores them all and records the round (a gather of a few hundred bytes a token), so
    no two processes write one file and any world size writes the same bytes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    writer = Writer(root, manifest, writes=rank == 0)
    started = [writer.done]
    if world > 1:
        dist.broadcast_object_list(started, src=0)
    for start in range(started[0], manifest.windows, batch * world):
        group = range(min(start + rank * batch, manifest.windows), min(start + (rank + 1) * batch, manifest.windows))
        logits = _logits(writer, group, teacher, eos, device)
        encoded = [writer.encode(window, rows) for window, rows in zip(group, logits, strict=True)]
        gathered: list[list[Encoded]] | None = [[] for _ in range(world)] if rank == 0 else None
        if world > 1:
            dist.gather_object(encoded, gathered, dst=0)
        elif gathered is not None:
            gathered[0] = encoded
        if gathered is not None:
            for window in (window for part in gathered for window in part):
                writer.store(window)
            writer.record(min(start + batch * world, manifest.windows))
    return manifest.windows - started[0]


def _logits(
    writer: Writer, group: range, teacher: Callable[[torch.Tensor], torch.Tensor], eos: int | None, device: torch.device
) -> list[torch.Tensor]:
    """The teacher's logits of each window of ``group`` (none for an empty one)."""
    if not group:
        return []
    inputs = [writer.inputs(window, eos) for window in group]
    width = max(len(ids) for ids in inputs)
    ids = torch.full((len(inputs), width), eos if eos is not None else 0, dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits = teacher(ids.to(device))
    return list(logits.unbind(0))


class DocumentCache:
    """Rows of a complete document cache by (document, character end)."""

    def __init__(self, root: Path, manifest: DocumentManifest):
        self.root, self.manifest = Path(root), manifest
        self.arrays = _memmaps(self.root, manifest, "r")
        self.teacher_keys: list[str] = json.loads((self.root / VOCAB).read_bytes())["keys"]

    def find(self, documents: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The position of the teacher token of document ``documents[i]`` that ends at ``ends[i]`` (the last where
        several do), -1 where none does."""
        wanted = (documents.numpy().astype(np.int64) << 32) | ends.numpy().astype(np.int64)
        keys = self.arrays["keys.bin"]
        at = np.searchsorted(keys, wanted, side="right") - 1
        found = (at >= 0) & (keys[np.clip(at, 0, None)] == wanted) if len(keys) else np.zeros(len(at), bool)
        return torch.from_numpy(np.where(found, at, -1))

    def read(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values fp32 (descending), their teacher ids int64 ``[N, k]`` and the rows' log-sum-exp ``[N]`` at the
        manifest's temperature; CacheError naming the file and position where a row's bytes are not those written."""
        picked = positions.numpy()
        problem = garbled(self.root, self.arrays, picked)
        if problem:
            raise CacheError(f"{problem}; {REBUILD}")
        value_rows, index_rows = (np.ascontiguousarray(self.arrays[name][picked]) for name in ROW_FILES[:2])
        tail = torch.from_numpy(np.ascontiguousarray(self.arrays["tail.bin"][picked]))
        key = self.manifest.key
        return compact.unpack(value_rows, index_rows, tail, self.manifest.k, self.manifest.vocab, key.temperature)


def size_on_disk(root: Path) -> int:
    """Bytes of every file in ``root``."""
    return sum(os.path.getsize(path) for path in Path(root).iterdir() if path.is_file())
