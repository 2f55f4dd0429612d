"""Where each training token of ``data=text`` ends in its document's text: what a teacher cache kept by document
(``trainer/cache/documents.py``) is looked up by, whatever tokenizer the student has.

``train.ends.bin`` (uint32, one per token of ``train.tokens.bin``: the character offset in its document where the
token ends, ``NO_END`` for the end-of-text token after each document) is built beside the token shards the first
time a run needs it, from the tokenizer's own offsets, and ``train.ends.json`` records its SHA-256: a garbled file
is named and built again. The shards themselves do not carry it: most runs never read it.
"""

from __future__ import annotations

import fcntl
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import files as file_hashes
from trainer.config import DataConfig
from trainer.data import shards, tokenizer

NO_END = np.iinfo(np.uint32).max  # the end-of-text token: it ends no character of the document
ENDS, RECORD = "train.ends.bin", "train.ends.json"
BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class TokenSpans:
    """The training stream's tokens as (document, character end) pairs."""

    document_starts: np.ndarray  # int64 [D]: each training document's first token in the stream
    documents: np.ndarray  # int64 [D]: its index in the corpus
    ends: np.ndarray  # uint32 [tokens]

    def of(self, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(document, character end) of the ``length`` tokens from each of ``starts``: int64 ``[rows, length]``
        each; the end is -1 where the token ends no character (the end-of-text token)."""
        positions = starts.numpy()[:, None] + np.arange(length)
        which = np.searchsorted(self.document_starts, positions, side="right") - 1
        ends = self.ends[positions].astype(np.int64)
        ends[ends == NO_END] = -1
        return torch.from_numpy(self.documents[which]), torch.from_numpy(ends)


def load(cfg: DataConfig, root: Path) -> TokenSpans:
    """The spans of the training tokens in ``root`` (``cfg``'s shards), built first when missing or garbled."""
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = _problem(root)
        if problem is not None:
            if problem:
                print(f"warning: {problem}: building it again", file=sys.stderr)
            _build(cfg, root)
    lengths = shards.mapped(root / "train.lengths.bin", np.dtype(np.int64))
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    documents = np.asarray(shards.mapped(root / "train.ids.bin", np.dtype(np.int64)))
    return TokenSpans(starts, documents, shards.mapped(root / ENDS, np.dtype(np.uint32)))


def _problem(root: Path) -> str | None:
    """None when the ends file is whole; ``""`` when it was never built; else what is wrong with it."""
    if not (root / RECORD).is_file() or not (root / ENDS).is_file():
        return ""
    tokens = int(shards.mapped(root / "train.lengths.bin", np.dtype(np.int64)).sum())
    try:
        record = json.loads((root / RECORD).read_text())
    except ValueError:
        return f"{root / RECORD} is garbled"
    if (root / ENDS).stat().st_size != 4 * tokens or record.get("sha256") != file_hashes.sha256(root / ENDS):
        return file_hashes.garbled(root / ENDS)
    return None


def _build(cfg: DataConfig, root: Path) -> None:
    """Tokenize the training documents again, with offsets, and write their tokens' ends (then the record)."""
    tok = tokenizer.load(cfg.tokenizer)
    lengths = shards.mapped(root / "train.lengths.bin", np.dtype(np.int64))
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for encoding in tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
            ends = [end for _, end in encoding.offsets]
            if len(ends) + 1 != lengths[len(parts)]:
                raise ValueError(f"{root}: document {len(parts)} has {lengths[len(parts)]} tokens in the shards but "
                                 f"{len(ends) + 1} now: the tokenizer changed")  # fmt: skip
            parts.append(np.array([*ends, NO_END], dtype=np.uint32))
        batch.clear()

    for number, text in enumerate(shards.documents(cfg)):
        if not shards.is_val(number, cfg.val_fraction):
            batch.append(text)
        if len(batch) >= BATCH_DOCUMENTS:
            flush()
    flush()
    ends = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    shards.write_atomic(root / ENDS, ends.tofile)
    record = {"sha256": file_hashes.sha256(root / ENDS), "tokens": len(ends)}
    shards.write_atomic(root / RECORD, lambda path: path.write_text(json.dumps(record)))
