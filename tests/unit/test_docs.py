"""The README and docs/: the README stays short, every relative link (and ``#anchor``) resolves, every docs page is
linked from the README, the generated sections are what their generators render from the committed JSON, and no
committed markdown or results JSON names a path of the machine it was made on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 250
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
# /work/..., /tmp/..., and the same reached from the repository (../../tmp/...)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home)(?:/|\b)|(?<![\w~-])(?:\.\./)+(?:work|tmp|root|home)/")


def prose(text: str) -> str:
    """``text`` without fenced code blocks (a ``# comment`` there is no heading, a ``[x](y)`` no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (code and link text kept, markup dropped), lower-case, punctuation
    dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated one gets GitHub's -1, -2 ... suffixes."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The relative link targets of ``path`` (images included), outside code."""
    targets = LINK.findall(INLINE_CODE.sub("", prose(path.read_text())))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def committed(*patterns: str) -> list[Path]:
    """Files matching ``patterns`` that git tracks or would add (not ignored); without git, the same globs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sorted({REPO / line for line in out.splitlines() if (REPO / line).is_file()})
    except (OSError, subprocess.CalledProcessError):
        return sorted({p for pattern in patterns for p in REPO.glob(pattern.replace("*.md", "**/*.md"))})


def test_the_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move a topic into docs/"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_slugs_follow_githubs_rules():
    headings = {
        "Where the teacher lives (`teacher.placement`)": "where-the-teacher-lives-teacherplacement",
        "What moves KD against CE (`benchmarks.llm_kd_study`)": "what-moves-kd-against-ce-benchmarksllm_kd_study",
        "Measured (2 CPU cores; rerun the scripts to check)": "measured-2-cpu-cores-rerun-the-scripts-to-check",
        "See [the index](docs/README.md)": "see-the-index",
    }
    assert {heading: slug(heading) for heading in headings} == headings


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ has no pages"
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(README)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_nothing_committed_names_a_path_of_the_machine():
    files = committed("*.md", "benchmarks/results/*.json")
    assert README in files and (REPO / "benchmarks" / "results" / "quality.json") in files
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, "absolute paths (write them relative to the repository):\n" + "\n".join(found)


def test_generated_sections_are_what_their_generators_render_from_the_json():
    from benchmarks import (
        compact_cache,
        cross_tokenizer,
        kd_memory,
        kd_tail,
        llm,
        llm_kd_study,
        on_policy,
        readme_results,
        search,
    )
    from benchmarks.readme_section import RESULTS_DOC

    def section(path: Path, start: str, end: str) -> str:
        text = path.read_text()
        assert start in text and end in text, f"{path.relative_to(REPO)} has no {start} ... {end}"
        return start + text.partition(start)[2].partition(end)[0] + end

    def load(module) -> dict:
        path = getattr(module, "STUDY_JSON", None) or module.RESULTS_JSON  # the study imports llm's RESULTS_JSON
        return json.loads(path.read_text())

    quality = load(readme_results)
    expected = {
        (README, readme_results.HEADLINE_START, readme_results.HEADLINE_END): readme_results.headline(
            quality, load(llm)
        ),
        (RESULTS_DOC, readme_results.START, readme_results.END): readme_results.render(
            quality, readme_results.RESULTS_JSON.parent, RESULTS_DOC
        ),
    }
    for module in (llm, llm_kd_study, on_policy, kd_memory, kd_tail, compact_cache, cross_tokenizer, search):
        expected[(RESULTS_DOC, module.START, module.END)] = module.render(load(module))
    stale = [
        f"{path.relative_to(REPO)} {start}" for (path, start, end), text in expected.items()
        if section(path, start, end) != text
    ]  # fmt: skip
    assert not stale, f"regenerate (docs/results.md names each section's command): {stale}"


def test_a_recorded_command_names_paths_relative_to_the_repository():
    from benchmarks.readme_section import command_line

    argv = ["--out", str(REPO / "outputs" / "x"), f"teacher.checkpoint={REPO}/t/final", "--steps", "3", "rel/dir"]
    assert command_line("benchmarks.llm", argv) == (
        "python -m benchmarks.llm --out outputs/x teacher.checkpoint=t/final --steps 3 rel/dir"
    )
