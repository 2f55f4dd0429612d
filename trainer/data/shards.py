"""Token shards of ``data=text|chat`` under ``data.cache_dir``: built once, memory-mapped by every run.

A build reads the rows streaming (``trainer.data.corpus``), in chunks of about ``CHUNK_CHARS`` characters that
``data.num_proc`` processes tokenize, and writes each chunk's arrays to ``parts/`` (each file written to a temporary
name and renamed; a chunk's JSON record last). An interrupted build keeps its finished chunks. The chunks are then
joined into one file per split and array, and ``manifest.json`` (the key, the files' sizes and SHA-256, the counts)
is written last: a folder with a manifest is complete. The folder's name is a hash of the key: the files' contents,
the tokenizer's files and the settings; a change makes another folder.

Arrays per split (``train``, ``val``): ``tokens`` (uint16 where the vocabulary fits, else uint32), ``ids`` (the
document's index in the corpus, int64), ``lengths`` (tokens per document or sample, int64) and, for chat,
``mask`` (uint8: 1 on the assistant tokens). Text documents end with the tokenizer's end-of-text token. The split
is by document: document ``i`` is a validation one when frac(i * 0.618...) < ``data.val_fraction`` (a
low-discrepancy sequence: about that fraction of any prefix of the corpus, the first document included).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trainer import files as file_hashes
from trainer.config import DataConfig
from trainer.data import chat, corpus, tokenizer
from trainer.data.errors import DataError

FORMAT = 1
CHUNK_CHARS = 1 << 20
CHUNK_ROWS = 4096
SPLITS = ("train", "val")
GOLDEN = (math.sqrt(5) - 1) / 2
MANIFEST = file_hashes.MANIFEST_FILE


def is_val(document: int, val_fraction: float) -> bool:
    return (document * GOLDEN) % 1.0 < val_fraction


def arrays(name: str) -> tuple[str, ...]:
    """The arrays each split of a ``data.name`` data set has."""
    return ("tokens", "ids", "lengths", "mask") if name == "chat" else ("tokens", "ids", "lengths")


def key(cfg: DataConfig, block_size: int) -> dict[str, Any]:
    """What the shards depend on: the files' contents in order, the tokenizer's files and the settings."""
    paths = corpus.expand(cfg.files, cfg.exclude)
    settings: dict[str, Any] = {"format": FORMAT, "name": cfg.name, "val_fraction": cfg.val_fraction}
    if cfg.name == "text":
        settings["text_field"] = cfg.text_field
    else:  # a chat sample is cut to the sequence
        settings.update(block_size=block_size, overflow=cfg.overflow)
    return {
        **settings,
        "tokenizer": tokenizer.fingerprint(cfg.tokenizer),
        "files": [_content_hash(p.resolve(), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
    }


def corpus_fingerprint(cfg: DataConfig) -> str:
    """The documents of ``data=text``, whatever the tokenizer: the files' SHA-256s in order and the text field."""
    paths = corpus.expand(cfg.files, cfg.exclude)
    files = [_content_hash(p.resolve(), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps({"text_field": cfg.text_field, "files": files}).encode()).hexdigest()[:16]


@functools.cache
def _content_hash(path: Path, _size: int, _mtime: int) -> str:
    return file_hashes.sha256(path)


def folder(cfg: DataConfig, block_size: int) -> Path:
    digest = hashlib.sha256(json.dumps(key(cfg, block_size), sort_keys=True).encode()).hexdigest()
    return Path(cfg.cache_dir) / f"{cfg.name}-{digest[:16]}"


def read_manifest(root: Path) -> dict | None:
    """The manifest of a complete build in ``root`` whose files have their recorded sizes and SHA-256s; None
    otherwise (a garbled file is named on stderr: the caller builds the shards again)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if any(file_hashes.size_problem(root / n, e) for n, e in manifest.get("files", {}).items()):
        return None
    problem = content_problem(root, manifest)
    if problem is not None:
        print(f"warning: {problem}: tokenizing the data again", file=sys.stderr)
        return None
    return manifest


def content_problem(root: Path, manifest: dict) -> str | None:
    """The first file of ``root`` whose SHA-256 differs from its manifest's, or None. A file is hashed once per
    change: after it matched, its size and modification time are recorded beside the folder
    (``<folder>.verified.json``), and a later run hashes it again only if either differs."""
    try:
        record = json.loads(_verified_path(root).read_text())
    except (OSError, ValueError):
        record = {}
    checked = []
    for name, entry in manifest["files"].items():
        if record.get(name) == _size_and_time(root / name) or "sha256" not in entry:
            continue
        if file_hashes.sha256(root / name) != entry["sha256"]:
            return file_hashes.garbled(root / name)
        checked.append(name)
    if checked:
        _record_verified(root, checked, record)
    return None


def _verified_path(root: Path) -> Path:
    return root.with_name(root.name + ".verified.json")


def _size_and_time(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _record_verified(root: Path, names: list[str], record: dict) -> None:
    """Record ``names`` as matching their SHA-256 at their current size and time (beside ``root``)."""
    updated = {**record, **{name: _size_and_time(root / name) for name in names}}
    write_atomic(_verified_path(root), lambda path: path.write_text(json.dumps(updated)))


def prepare(cfg: DataConfig, block_size: int, progress: bool = True) -> tuple[Path, dict]:
    """The folder of ``cfg``'s shards and its manifest, built (or finished) first when needed. Processes that
    prepare the same folder at once (the ranks of a run) take turns: one builds, the others reuse."""
    root = folder(cfg, block_size)
    root.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(root)
        if manifest is None:
            manifest = _build(cfg, block_size, root, progress)
    return root, manifest


def mapped(path: Path, dtype: np.dtype) -> np.ndarray:
    """The array in ``path``, memory-mapped (an empty one read as such: numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)


def dtype_for(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)


def documents(cfg: DataConfig) -> Iterator[Any]:
    """The corpus's documents (text) or conversations (chat), in order."""
    numbers: dict[Path, int] = {}
    for path, row in corpus.rows(corpus.expand(cfg.files, cfg.exclude)):
        numbers[path] = numbers.get(path, 0) + 1
        if cfg.name == "chat":
            yield chat.conversation(path, numbers[path], row)
            continue
        field = corpus.PLAIN_FIELD if corpus.builder(path) == "text" else cfg.text_field
        if field not in row:
            raise DataError("data.text_field", f"{path} row {numbers[path]} has no field {field!r}: {sorted(row)}")
        text = row[field]
        if not isinstance(text, str):
            raise DataError("data.text_field", f"{path} row {numbers[path]}: {field!r} is not a string")
        yield text


def _chunks(cfg: DataConfig) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    chars = 0
    for item in documents(cfg):
        chunk.append(item)
        chars += len(item) if isinstance(item, str) else sum(len(m["content"]) for m in item)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_ROWS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def tokenize_chunk(cfg: DataConfig, block_size: int, first: int, items: list[Any]) -> dict[str, np.ndarray]:
    """The arrays of one chunk whose first document is number ``first`` ({"train.tokens": ..., ...})."""
    tok = tokenizer.load(cfg.tokenizer)
    if cfg.name == "text":  # encode_batch_fast: no character offsets, which text does not need
        encoded = tok.backend_tokenizer.encode_batch_fast(items, add_special_tokens=False)
        samples: list[tuple[list | None, list | None]] = [(e.ids + [tok.eos_token_id], None) for e in encoded]
    else:
        samples = [_chat_sample(tok, messages, block_size, cfg.overflow) for messages in items]
    dtypes: dict[str, Any] = {"tokens": dtype_for(len(tok)), "ids": np.int64, "lengths": np.int64, "mask": np.uint8}
    out: dict[str, list[np.ndarray]] = {f"{s}.{a}": [np.zeros(0, dtypes[a])] for s in SPLITS for a in arrays(cfg.name)}
    for i, (ids, mask) in enumerate(samples):
        if ids is None:  # dropped
            continue
        split = "val" if is_val(first + i, cfg.val_fraction) else "train"
        out[f"{split}.tokens"].append(np.array(ids, dtype=dtypes["tokens"]))
        out[f"{split}.ids"].append(np.array([first + i], dtype=np.int64))
        out[f"{split}.lengths"].append(np.array([len(ids)], dtype=np.int64))
        if mask is not None:
            out[f"{split}.mask"].append(np.array(mask, dtype=np.uint8))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _chat_sample(tok: Any, messages: list, block_size: int, overflow: str) -> tuple[list | None, list | None]:
    """A conversation's ids and assistant mask, cut to ``block_size + 1`` tokens (or dropped: (None, None));
    dropped too when no assistant token is left to train on (the first token is never a target)."""
    ids, trained = chat.render(tok, messages)
    if len(ids) > block_size + 1:
        if overflow == "drop":
            return None, None
        ids, trained = ids[: block_size + 1], trained[: block_size + 1]
    if not any(trained[1:]):
        return None, None
    return ids, [int(t) for t in trained]


def _one_thread() -> None:
    """A tokenizing worker's tokenizer runs on one thread: ``data.num_proc`` workers share the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_tokenize(args: tuple) -> dict[str, np.ndarray]:
    return tokenize_chunk(*args)


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename it to ``path``; a failed write (a disk full, Ctrl-C) leaves no ``tmp`` behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _save_chunk(parts: Path, index: int, result: dict[str, np.ndarray]) -> None:
    for name, array in result.items():
        write_atomic(parts / f"{name}.{index:06d}.bin", array.tofile)
    record = {name: len(array) for name, array in result.items()}
    write_atomic(parts / f"{index:06d}.json", lambda p: p.write_text(json.dumps(record)))


def _build(cfg: DataConfig, block_size: int, root: Path, progress: bool) -> dict:
    """Tokenize the corpus into ``root`` (finishing the chunks of an interrupted build), join, write the manifest."""
    tok = tokenizer.load(cfg.tokenizer)
    if cfg.name == "chat":
        chat.check_template(tok, cfg.tokenizer)
    parts = root / "parts"
    parts.mkdir(exist_ok=True)
    start = time.perf_counter()
    n_chunks, documents = 0, 0
    bar = _progress_bar(progress)
    pool = multiprocessing.get_context("fork").Pool(cfg.num_proc, _one_thread) if cfg.num_proc > 1 else None
    pending: deque = deque()

    def finish_oldest() -> None:
        index, result = pending.popleft()
        result = result.get() if pool is not None else result
        _save_chunk(parts, index, result)
        bar.update(int(sum(len(result[f"{s}.tokens"]) for s in SPLITS)))

    try:
        for index, items in enumerate(_chunks(cfg)):
            n_chunks, first = index + 1, documents
            documents += len(items)
            if (parts / f"{index:06d}.json").is_file():
                continue  # done by an interrupted build
            args = (cfg, block_size, first, items)
            pending.append((index, pool.apply_async(_worker_tokenize, (args,)) if pool else tokenize_chunk(*args)))
            while len(pending) > (2 * cfg.num_proc if pool else 0):
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if documents == 0:
        raise DataError("data.files", f"the corpus is empty: {', '.join(cfg.files)} hold no document")
    seconds = time.perf_counter() - start
    _join(parts, root, cfg.name, n_chunks)
    manifest = _manifest(cfg, block_size, root, documents, seconds)
    write_atomic(root / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    _record_verified(root, list(manifest["files"]), {})  # hashed just now, as written
    shutil.rmtree(parts)
    return manifest


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(
        desc="tokenizing", unit=" tokens", unit_scale=True, file=sys.stderr, disable=None if enabled else True
    )  # None: off when stderr is no terminal


def _join(parts: Path, root: Path, name: str, n_chunks: int) -> None:
    """One file per split and array: the chunks' files in order, copied in blocks (bounded memory)."""
    for split in SPLITS:
        for array in arrays(name):
            target = f"{split}.{array}"

            def write(tmp: Path, target: str = target) -> None:
                with open(tmp, "wb") as out:
                    for index in range(n_chunks):
                        with open(parts / f"{target}.{index:06d}.bin", "rb") as part:
                            shutil.copyfileobj(part, out, 1 << 22)

            write_atomic(root / f"{target}.bin", write)


def _manifest(cfg: DataConfig, block_size: int, root: Path, documents: int, seconds: float) -> dict:
    vocab = tokenizer.vocab_size(cfg.tokenizer)
    stats: dict[str, Any] = {"documents": documents, "dropped": 0}
    for split in SPLITS:
        lengths = np.fromfile(root / f"{split}.lengths.bin", dtype=np.int64)
        stats[f"{split}_documents"] = len(lengths)
        stats[f"{split}_tokens"] = int(lengths.sum())
        if cfg.name == "chat":
            mask = mapped(root / f"{split}.mask.bin", np.dtype(np.uint8))
            first = np.cumsum(lengths, dtype=np.int64) - lengths
            stats[f"{split}_trained_tokens"] = int(mask.sum(dtype=np.int64) - mask[first].sum(dtype=np.int64))
        else:
            stats[f"{split}_trained_tokens"] = stats[f"{split}_tokens"]
    stats["dropped"] = documents - stats["train_documents"] - stats["val_documents"]
    total = stats["train_tokens"] + stats["val_tokens"]
    stats.update(seconds=seconds, tokens_per_s=total / seconds if seconds > 0 else 0.0)
    return {
        "key": key(cfg, block_size),
        "vocab": vocab,
        "dtype": str(dtype_for(vocab)),
        "eos": int(tokenizer.load(cfg.tokenizer).eos_token_id),
        "stats": stats,
        "files": file_hashes.describe(root),
    }
