"""``python -m benchmarks.search --quick`` on a small random Llama teacher: the search runs with the recipe's
overrides, trains its best two candidates and the recipe's own cut, and writes its JSON and results fragment under
``--out`` (docs/results.md and benchmarks/results stay as they are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.search import END, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import save_recipe_files

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")


def test_quick_search_trains_its_best_candidates_and_the_hand_made_cut(tmp_path):
    save_recipe_files(tmp_path)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path / "out"), "--teacher", str(tmp_path / "llama"), "--files",
            str(tmp_path / "corpus" / "*.py")]  # fmt: skip
    run_cli(tmp_path, *args, module="benchmarks.search", timeout=900)
    results = json.loads((tmp_path / "out" / "search.json").read_text())
    trained = [c for c in results["search"]["candidates"] if c["loss_after"] is not None]
    assert len(trained) == 2 and results["hand_cut"]["loss_after"] > 0
    assert results["hand_cut"]["config"]["num_hidden_layers"] == 2  # a quick run's hand cut: its own 2 layers
    fragment = (tmp_path / "out" / "README_search.md").read_text()
    assert "| the hand-made cut | 2 | 0.5 | 0.25 | 1 |" in fragment and results["search"]["winner"]["name"] in fragment
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before
