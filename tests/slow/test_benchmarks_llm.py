"""``python -m benchmarks.llm --quick`` on a small random Llama teacher and a small corpus: every row trains or is
measured, the JSON holds them, and the results fragment is written under ``--out`` (docs/results.md and
benchmarks/results stay as they are). Also ``benchmarks.gpu`` on CPU: its smollm2 mode on a tiny teacher, its one
line without CUDA, and its run of the GPU tier (every test read as skipped with its reason)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from benchmarks.common import RESULTS
from benchmarks.gpu import run_smollm2, run_tier
from benchmarks.llm import END, QUICK, RESULTS_DOC, RESULTS_JSON, START
from tests.conftest import run_cli
from tests.data_files import save_recipe_files

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")


def test_quick_run_writes_every_row_and_measures_the_overhead_again(tmp_path):
    save_recipe_files(tmp_path)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path), "--teacher", "llama", "--files", "corpus/*.py", "--seeds", "2"]
    proc = run_cli(tmp_path, *args, module="benchmarks.llm", timeout=900)
    assert proc.stdout.startswith("plan: 6 runs of 4 steps")
    results = json.loads((tmp_path / "llm.json").read_text())
    keys = [row["key"] for row in results["rows"]]
    assert keys == ["teacher", "scratch_ce", "pruned", "pruned_ce", "pruned_kd", "pruned_kd_qat"]
    runs = {row["key"]: row["runs"] for row in results["rows"]}
    assert [len(runs[k]) for k in keys] == [1, 1, 1, 2, 2, 1]
    assert runs["teacher"][0]["agreement"] == 1
    assert runs["pruned_kd_qat"][0]["bytes"] < runs["pruned_kd"][0]["bytes"] < runs["teacher"][0]["bytes"]
    assert runs["pruned"][0]["non_embedding_params"] * 2 <= runs["teacher"][0]["non_embedding_params"]
    assert all(r["val_loss"] > 0 for k in keys for r in runs[k])
    assert results["overhead"]["ratio"] > 0
    fragment = (tmp_path / "README_llm.md").read_text()
    assert "| pruned + KD + int8 QAT | 1 |" in fragment and "bare PyTorch/transformers" in fragment
    again = run_cli(tmp_path, *args[:3], "--overhead-only", module="benchmarks.llm", timeout=900)
    assert again.stdout.strip().endswith(f"trainer/bare step: {_ratio(tmp_path):.3f}")
    assert "--overhead-only`, load average" in (tmp_path / "README_llm.md").read_text()
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (RESULTS_JSON.read_bytes() if RESULTS_JSON.exists() else None) == before


def _ratio(out) -> float:
    """The trainer/bare step ratio the quick run's JSON holds now."""
    return json.loads((out / "llm.json").read_text())["overhead"]["ratio"]


def test_gpu_benchmark_times_the_recipe_on_a_tiny_teacher(tmp_path):
    """``benchmarks.gpu``'s smollm2 mode (bf16 autocast; on CPU here) times the trainer's steps and counts FLOPs."""

    save_recipe_files(tmp_path)
    tiny = [
        "teacher=hf", f"teacher.checkpoint={tmp_path / 'llama'}", f"data.files=[{tmp_path / 'corpus'}/*.py]",
        f"data.cache_dir={tmp_path / 'data_cache'}", "train.batch_size=4", *QUICK,
    ]  # fmt: skip
    result = run_smollm2(tiny, steps=2, warmup=1, run_dir=tmp_path / "run")
    assert result["mode"] == "smollm2" and result["steps"] == 2 and result["tokens_per_s"] > 0
    assert result["step_flops"] > 0 and result["block"] == 16 and result["peak_memory_gib"] is None


def test_gpu_benchmark_without_cuda_prints_one_line_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    before = sorted(RESULTS.iterdir())
    proc = run_cli(tmp_path, module="benchmarks.gpu", timeout=300)
    assert proc.stdout.splitlines() == [
        "python -m benchmarks.gpu needs CUDA and found no CUDA device: nothing run, nothing written"
    ]
    assert sorted(RESULTS.iterdir()) == before and not any(tmp_path.iterdir())


def test_gpu_benchmark_reads_the_gpu_tiers_outcomes_and_stops_it_in_time():
    """``benchmarks.gpu``'s tier run (``pytest -m gpu tests/gpu`` in a subprocess): without CUDA every test is read
    as skipped with its reason; past its timeout the tier is stopped and says so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the tier would run its tests")
    tier = run_tier(timeout=600)
    assert tier["exit_code"] == 0 and not tier["timed_out"], tier.get("output_tail")
    assert tier["skipped"] == len(tier["tests"]) >= 6 and tier["passed"] == tier["failed"] == tier["errors"] == 0
    assert all(re.fullmatch(r"needs (1 CUDA device|2 CUDA devices), found 0", t["message"]) for t in tier["tests"])
    assert {t["test"].partition("::")[0] for t in tier["tests"]} >= {"tests.gpu.test_gpu_quickstart_curve"}
    stopped = run_tier(timeout=1)
    assert stopped["timed_out"] and stopped["exit_code"] != 0 and stopped["tests"] == []
