"""``python -m benchmarks.cross_tokenizer --quick`` on a small random Llama teacher of a 420-token BPE: it trains the
student's own BPE on the files, runs CE alone and KD aligned by span and by ULD on one seed, and writes its JSON and
results fragment under ``--out`` (docs/results.md and benchmarks/results stay as they are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.cross_tokenizer import END, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import documents, save_llama, save_tokenizer

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the benchmark needs the `hf` extra")


def test_quick_mode_runs_every_row_and_leaves_the_published_results_alone(tmp_path):
    save_llama(tmp_path / "teacher", 420, seed=1, tokenizer=save_tokenizer(tmp_path / "tok", 420))
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(documents(40)):
        (tmp_path / "corpus" / f"m{i:02d}.py").write_text(text)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = [
        "--quick",
        "--out",
        str(tmp_path / "out"),
        "--teacher",
        "teacher",
        "--files",
        "corpus/*.py",
        "--vocab",
        "300",
    ]
    run_cli(tmp_path, *args, module="benchmarks.cross_tokenizer", timeout=900)
    results = json.loads((tmp_path / "out" / "cross_tokenizer.json").read_text())
    assert [row["key"] for row in results["rows"]] == ["ce", "span", "uld"] and results["student_vocab"] == 300
    for row in results["rows"]:
        (run,) = row["runs"]
        assert 0 < run["bits_per_byte"] < 10
        assert ("aligned_fraction" in run) == (row["key"] != "ce")
    fragment = (tmp_path / "out" / "README_cross_tokenizer.md").read_text()
    assert "| KD, span alignment |" in fragment and "| cross-entropy alone |" in fragment
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before
