"""``python -m benchmarks.quality --quick``: every row trains, and the JSON, plots and results fragment come out of it.

The quick run writes everything under its ``--out`` folder; docs/results.md, the README and benchmarks/results must
not change.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.readme_results import END, HEADLINE_END, HEADLINE_START, README, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_run_outputs() -> tuple[str, str, bytes | None]:
    """What only the full run writes: the quality section of docs/results.md, the README's headline (the rest of
    both is edited by others) and benchmarks/results/quality.json."""
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    headline = README.read_text().partition(HEADLINE_START)[2].partition(HEADLINE_END)[0]
    return section, headline, RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    before = full_run_outputs()
    proc = run_cli(out, "--quick", "--out", str(out), module="benchmarks.quality", timeout=900)
    return out, proc.stdout, before, full_run_outputs()


def test_json_holds_every_row_with_its_figures(quick_run):
    out, _, _, _ = quick_run
    results = json.loads((out / "quality.json").read_text())
    assert results["quick"] and results["command"].startswith("python -m benchmarks.quality --quick")
    assert results["machine"]["cpu_count"] >= 1 and results["wall_seconds"] > 0
    sh = results["shakespeare"]
    assert [v["key"] for v in sh["variants"]] == [
        "scratch",
        "forward_kl",
        "reverse_kl",
        "jsd",
        "features",
        "prune",
        "prune_qat",
    ]
    for v in sh["variants"]:
        assert len(v["runs"]) == 1 and v["runs"][0]["steps"] == sh["steps"]
        for key in ("val_loss", "params", "bytes", "latency_ms", "train_seconds"):
            assert v["student"][key]["n"] == 1, (v["key"], key)
        assert v["runs"][0]["val_curve"][-1][0] == sh["steps"]
    by_key = {v["key"]: v for v in sh["variants"]}
    assert "compress_curve" in by_key["prune"]["runs"][0] and "compress_curve" not in by_key["scratch"]["runs"][0]
    assert by_key["prune_qat"]["student"]["bytes"]["mean"] / by_key["prune_qat"]["export"]["bytes"]["mean"] > 4
    assert sh["teacher"]["params"]["mean"] > by_key["scratch"]["student"]["params"]["mean"]
    digits = results["digits"]
    assert [r["key"] for r in digits["rows"]] == ["teacher", "scratch", "distilled"]
    # Hinton, Vinyals & Dean (2015)'s published MNIST test errors, copied into the table: not measured here.
    assert [r["hinton_mnist_errors"] for r in digits["rows"]] == [67, 146, 74]
    assert all(0 <= r["errors"]["mean"] <= digits["test_examples"] for r in digits["rows"])


def test_plots_are_pngs(quick_run):
    out, _, _, _ = quick_run
    for name in ("quality_val_loss.png", "quality_compression.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_readme_fragment_is_generated_into_the_out_folder_only(quick_run):
    out, stdout, before, after = quick_run
    fragment = (out / "README_results.md").read_text()
    assert fragment.startswith("<!-- results:quality:start -->")
    assert fragment.rstrip().endswith("<!-- results:quality:end -->")
    assert "`python -m benchmarks.quality --quick" in fragment
    assert "](quality_val_loss.png)" in fragment and "](quality_compression.png)" in fragment
    assert "| distilled, reverse KL |" in fragment and "| small net distilled |" in fragment
    assert "better than the student from scratch" in fragment or "lower validation loss than" in fragment
    assert "Tiny Shakespeare" in stdout and "digits" in stdout
    assert after == before, "a --quick run must not touch docs/results.md, README.md or the results JSON"
