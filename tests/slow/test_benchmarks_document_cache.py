"""``python -m benchmarks.document_cache --quick`` on a small random Llama teacher of a 420-token BPE: it builds the
cache kept by document over the files, trains the student of its own BPE from it, from the live teacher and with
cross-entropy alone, and writes its JSON and results fragment under ``--out`` (docs/results.md and
benchmarks/results stay as they are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.document_cache import END, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import documents, save_llama, save_tokenizer

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the benchmark needs the `hf` extra")


def test_quick_mode_builds_the_cache_and_trains_every_row_leaving_the_published_results_alone(tmp_path):
    save_llama(tmp_path / "teacher", 420, seed=1, tokenizer=save_tokenizer(tmp_path / "tok", 420))
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(documents(30)):
        (tmp_path / "corpus" / f"m{i:02d}.py").write_text(text)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path / "out"), "--teacher", "teacher", "--files", "corpus/*.py"]
    run_cli(tmp_path, *args, "--vocab", "300", module="benchmarks.document_cache", timeout=900)
    results = json.loads((tmp_path / "out" / "document_cache.json").read_text())
    cache = results["cache"]
    assert cache["documents"] == 30 and cache["teacher_tokens"] > 30 * 20 and results["student_vocab"] == 300
    # every file the cache wrote is counted
    written = set(cache["bytes_per_teacher_token"])
    assert {"keys.bin", "values.bin", "indices.bin", "tail.bin", "checksums.bin"} <= written
    assert cache["total_bytes_per_teacher_token"] == pytest.approx(sum(cache["bytes_per_teacher_token"].values()))
    assert list(results["runs"]) == ["cache", "live", "ce"]
    for key, run in results["runs"].items():
        assert run["step_ms"] > 0 and 0 < run["bits_per_byte"] < 10
        assert ("aligned_fraction" in run) == (key != "ce")
        if key != "ce":
            assert 0.3 < run["aligned_fraction"] <= 1 and 0 < run["shared_mass"] <= 1 and run["teacher_ms"] > 0
    fragment = (tmp_path / "out" / "README_document_cache.md").read_text()
    assert "| KD from the cache |" in fragment and "bytes per teacher token on disk" in fragment
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before
