"""The sections of docs/results.md (and README.md's headline) that benchmarks generate from their JSON: a markdown
table, and a marked section replaced; and the command line a JSON records, naming no path of the machine it ran on."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DOC = REPO / "docs" / "results.md"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table whose first column is left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def replace_section(readme: Path, start: str, end: str, section: str) -> None:
    """Replace what lies from marker ``start`` to marker ``end`` (both included) in ``readme`` by ``section``."""
    text = readme.read_text()
    head, found_start, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found_start and found_end):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(head + section + tail)


def portable(arg: str) -> str:
    """``arg`` with an absolute path (alone, or after ``=`` as in ``--out=DIR`` or ``teacher.checkpoint=DIR``)
    written relative to the repository: the JSON and docs are committed, and name no path of the machine."""
    key, eq, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    return key + eq + Path(os.path.relpath(value, REPO)).as_posix()


def command_line(module: str, argv: list[str]) -> str:
    """``python -m MODULE ARGS`` as a results JSON records it (see ``portable``)."""
    return " ".join([f"python -m {module}", *map(portable, argv)])


def publish(section: str, start: str, end: str, heading: str, fragment: Path | None = None) -> Path:
    """Write a benchmark's rendered ``section``: to ``fragment`` (a quick run's file, docs untouched), or between its
    markers in docs/results.md, which the first full run appends at the end under ``heading``; the file written."""
    doc = fragment or RESULTS_DOC
    if fragment is not None:
        fragment.write_text(f"{start}\n{end}\n")
    elif start not in doc.read_text():
        doc.write_text(doc.read_text() + f"\n## {heading}\n\n{start}\n{end}\n")
    replace_section(doc, start, end, section)
    return doc
