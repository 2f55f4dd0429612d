"""The README sections that benchmarks generate from their JSON: a markdown table, and a marked section replaced."""

from __future__ import annotations

from pathlib import Path


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
