"""``python -m benchmarks.data --quick``: every measurement runs in its own process, the token counts agree with
the tokenizer called directly, and the JSON holds the throughput and memory figures."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_quick_run_writes_its_figures(tmp_path):
    proc = run_cli(tmp_path, "--quick", "--out", str(tmp_path), module="benchmarks.data", timeout=600)
    results = json.loads((tmp_path / "data.json").read_text())
    assert results["quick"] and "peak RSS ratio" in proc.stdout
    rows = results["throughput"]
    assert set(rows) == {"direct loop", "stillroom num_proc=1", "stillroom num_proc=2"}
    assert len({row["tokens"] for row in rows.values()}) == 1 and all(row["mb_per_s"] > 0 for row in rows.values())
    assert results["peak_rss_ratio"] > 0 and len(results["memory"]) == 2
