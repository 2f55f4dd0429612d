"""The subword tokenizer of ``data=text|chat``: a Hugging Face tokenizer folder or a GGUF file's embedded one
(``data.tokenizer``; ``teacher``, the default, is resolved to ``teacher.checkpoint`` by ``RunConfig``)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from trainer.data.errors import DataError
from trainer.models.hf import first_line, import_transformers

# The files of a tokenizer folder that decide its ids and its chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def source(name: str) -> Path:
    """The folder or GGUF file ``data.tokenizer`` names; DataError when there is none."""
    if name == "teacher" and not Path(name).exists():
        raise DataError("data.tokenizer", "is `teacher` but the run has no teacher.checkpoint: set data.tokenizer=PATH")
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    if path.is_dir():
        from trainer.models.hf import gguf

        found = gguf.find(path)
        if found is not None:
            return found
    raise DataError("data.tokenizer", f"{name} is neither a tokenizer folder nor a GGUF file")


def fingerprint(name: str) -> str:
    """SHA-256 of the tokenizer's files (a folder's tokenizer files, or the GGUF file): what the ids depend on."""
    path = source(name)
    stat = path.stat()
    return _fingerprint(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _fingerprint(path: Path, _size: int, _mtime: int) -> str:
    from trainer.files import sha256

    parts = [path.name + sha256(path)] if path.is_file() else []
    if path.is_dir():
        parts = [f + sha256(path / f) for f in TOKENIZER_FILES if (path / f).is_file()]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


@functools.cache
def load(name: str) -> Any:
    """The tokenizer (a transformers fast tokenizer) ``data.tokenizer`` names; DataError (one line)."""
    path = source(name)
    if path.is_file():
        from trainer.models.hf import gguf

        try:
            tokenizer = gguf.tokenizer(path)
        except ValueError as e:
            raise DataError("data.tokenizer", str(e)) from None
    else:
        transformers = import_transformers()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            message = f"{path}: transformers cannot read its tokenizer ({first_line(e)})"
            raise DataError("data.tokenizer", message) from None
    if not tokenizer.is_fast:
        raise DataError("data.tokenizer", f"{path}: not a fast (Rust) tokenizer")
    if tokenizer.eos_token_id is None:
        raise DataError("data.tokenizer", f"{path}: the tokenizer has no end-of-text token to separate documents")
    return tokenizer


def vocab_size(name: str) -> int:
    """The ids the tokenizer produces (added tokens included): the student's vocabulary."""
    return len(load(name))


def save_into(folder: Path, name: str) -> None:
    """Write the tokenizer into the Hugging Face model ``folder`` when it holds none (a student cut from a GGUF
    teacher, or built from a config alone), so that the export tokenizes text as the run did."""
    if (folder / "config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        load(name).save_pretrained(folder)
