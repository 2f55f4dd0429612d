"""``python -m benchmarks.on_policy --quick`` on a small random Llama teacher and a small corpus: both runs train,
each student's greedy completions are scored by the teacher, the JSON holds them, and the results fragment is
written under ``--out`` (docs/results.md and benchmarks/results stay as they are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.on_policy import END, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import save_recipe_files

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")


def test_quick_run_compares_on_and_off_policy(tmp_path):
    save_recipe_files(tmp_path)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path), "--teacher", "llama", "--files", "corpus/*.py"]
    proc = run_cli(tmp_path, *args, module="benchmarks.on_policy", timeout=900)
    assert proc.stdout.startswith("plan: 2 runs of 4 steps")
    results = json.loads((tmp_path / "on_policy.json").read_text())
    off, on = results["arms"]
    assert (off["lmbda"], on["lmbda"]) == (0.0, 0.5)
    assert off["on_policy_kl"] is None and on["on_policy_kl"] > 0  # only the on-policy run wrote samples
    for arm in (off, on):
        assert arm["teacher_logprob"] < 0 and arm["val_loss"] > 0 and arm["completion_tokens"] > 0
        assert len(arm["completions"]) == 4 and all(1 <= len(c) <= 6 for c in arm["completions"])
    fragment = (tmp_path / "README_on_policy.md").read_text()
    assert "| on-policy (lmbda 0.5) |" in fragment and "teacher log-prob" in fragment
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before
