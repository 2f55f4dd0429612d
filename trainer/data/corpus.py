"""The rows of ``data.files``, read through Hugging Face ``datasets`` from local files, streaming (one row at a time,
whatever the corpus size): ``.json``/``.jsonl`` and ``.parquet`` rows as they are, any other file (``.txt``, ``.py``,
``.md``, ...) as one plain-text document ``{"text": ...}``."""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from trainer.data.errors import DataError

PLAIN_FIELD = "text"  # the field a plain-text file's document is in


def builder(path: Path) -> str:
    """The ``datasets`` builder that reads ``path``."""
    return {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def expand(patterns: list[str], exclude: Sequence[str] = ()) -> list[Path]:
    """The files ``data.files`` names, in its order (each glob's matches sorted, none twice), less those whose path
    matches a glob of ``exclude`` (``fnmatch``: ``*`` crosses folders); DataError naming a missing file or a glob
    that matches nothing."""
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
            if not matches:
                raise DataError("data.files", f"{pattern} matches no file")
        else:
            if not Path(pattern).is_file():
                raise DataError("data.files", f"{pattern} does not exist")
            matches = [Path(pattern)]
        found += matches
    kept = (p for p in found if not any(fnmatch.fnmatch(str(p), pattern) for pattern in exclude))
    return list(dict.fromkeys(kept))


def rows(files: list[Path]) -> Iterator[tuple[Path, dict]]:
    """(file, row) of every row of ``files`` in order. Consecutive plain-text files are read in one pass (one row
    each); DataError naming a file that is not UTF-8 or JSON that is not JSON (with its line)."""
    import datasets

    datasets.disable_progress_bars()
    for kind, group in itertools.groupby(files, builder):
        paths = list(group)
        for part in [paths] if kind == "text" else [[p] for p in paths]:
            if kind != "text" and part[0].stat().st_size == 0:
                continue  # no rows (datasets cannot read an empty JSON or Parquet file)
            options = {"sample_by": "document"} if kind == "text" else {}
            try:
                stream = datasets.load_dataset(
                    kind, data_files=[str(p) for p in part], split="train", streaming=True, **options
                )
                if kind == "text":  # one row per file
                    yield from zip(part, stream, strict=True)
                else:
                    yield from ((part[0], row) for row in stream)
            except DataError:
                raise
            except Exception as e:  # pyarrow's and datasets' errors: find the file and say why
                raise DataError("data.files", _unreadable(part, e)) from None


def _unreadable(paths: list[Path], error: Exception) -> str:
    for path in paths:
        if builder(path) == "json":
            if problem := json_problem(path):
                return problem
        elif builder(path) == "text":
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path} is not UTF-8 text ({e.reason} at byte {e.start})"
    where = paths[0] if len(paths) == 1 else f"one of {paths[0]} ... {paths[-1]}"
    return f"{where} cannot be read ({str(error).splitlines()[0] if str(error) else type(error).__name__})"


def json_problem(path: Path) -> str | None:
    """Where ``path`` is not JSON (a JSON document, or JSON Lines: its first bad line), None when it is."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{number} is not JSON ({e.msg})"
    return None
