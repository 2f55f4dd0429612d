"""``python -m benchmarks.kd_memory --quick``: every method runs in its own process, the fused loss's value equals the
naive one, and the table and docs/results.md section come out of the JSON (the real docs and results stay as they
are)."""

from __future__ import annotations

import json

import pytest

from benchmarks.kd_memory import END, METHODS, RESULTS_DOC, START, render, table
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_quick_run_measures_every_method_and_renders_its_table(tmp_path):
    before = RESULTS_DOC.read_text()
    out = tmp_path / "kd_memory.json"
    proc = run_cli(tmp_path, "--quick", "--out", str(out), module="benchmarks.kd_memory", timeout=600)
    results = json.loads(out.read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert sorted(rows) == sorted(METHODS)
    for row in rows.values():
        assert row["peak_bytes"] > 0 and row["seconds"] > 0, row
    (comparison,) = results["comparisons"]
    assert comparison["against"] == "naive" and comparison["value_rel_diff"] <= 1e-6
    columns, lines = table(results)
    assert len(lines) == 1 and len(lines[0]) == len(columns)
    assert "| cpu | 4,096 | 256 | 64 |" in proc.stdout
    section = render(results)
    assert section.startswith(START) and section.endswith(END) and "| cpu | 4,096 | 256 | 64 |" in section
    assert RESULTS_DOC.read_text() == before  # a quick run leaves docs/results.md alone


def test_a_case_over_the_memory_limit_is_recorded_without_running():
    from benchmarks.kd_memory import launch

    case = dict(device="cpu", vocab=128256, tokens=8192, hidden=2048, method="naive", limit_bytes=2**30)
    assert launch(case) == {"oom": "needs at least 19.6 GiB (5 full fp32 [tokens, V])"}


def test_a_case_that_outgrows_its_limit_is_recorded_as_out_of_memory():
    from benchmarks.kd_memory import launch

    case = dict(device="cpu", vocab=4096, tokens=2048, hidden=64, method="fused", limit_bytes=2**20)
    assert launch(case)["oom"].startswith("allocation failed (")  # a 256-token chunk's logits alone are 4 MiB
