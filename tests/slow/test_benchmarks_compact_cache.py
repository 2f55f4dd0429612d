"""``python -m benchmarks.compact_cache --quick`` on a small random Llama teacher: with no published fp32 rows for
its overrides it trains its own, then pruned + KD from a compact cache; the JSON holds both runs and the compact
cache's bytes per teacher token as measured on disk, and the results fragment is written under ``--out``
(docs/results.md and benchmarks/results stay as they are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.compact_cache import END, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import save_recipe_files
from trainer.cache import compact

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")


def test_quick_mode_trains_from_a_compact_cache_and_measures_it(tmp_path):
    save_recipe_files(tmp_path)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path), "--teacher", "llama", "--files", "corpus/*.py"]
    run_cli(tmp_path, *args, module="benchmarks.compact_cache", timeout=900)
    results = json.loads((tmp_path / "compact_cache.json").read_text())
    k, vocab = results["cache"]["k"], results["cache"]["vocab"]
    assert (k, results["cache"]["values_dtype"]) == (8, "compact")
    want = compact.value_bytes(k) + compact.index_bytes(k, vocab) + 4  # + the tail's fp32
    assert results["cache"]["bytes_per_token"] == results["cache"]["layout_bytes_per_token"] == want
    assert results["fp32_bytes_per_token"] == 8 * k + 4 + (0 if vocab > 32_768 else -2 * k)  # int16 ids here
    assert results["fp32"]["1337"]["val_loss"] > 0 and results["compact"][0]["val_loss"] > 0
    fragment = (tmp_path / "README_compact_cache.md").read_text()
    assert "| compact: 6-bit codes, Elias-Fano ids |" in fragment
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before
