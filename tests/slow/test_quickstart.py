"""The README's main job, end to end on Tiny Shakespeare: the quickstart, then the same with compress=prune_qat.

The teacher (nanoGPT's CPU config, 2,000 steps) is trained once by the quickstart's recipe and
reused by the compressed run, exactly as a user would see it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, read_metrics, run_cli
from trainer import export
from trainer.report import folder_bytes

pytestmark = pytest.mark.e2e
TEACHER_RUN = Path("outputs/teachers/shakespeare_cpu")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart")


@pytest.fixture(scope="module")
def quickstart(workdir) -> tuple[Path, str]:
    proc = run_cli(workdir, "experiment=quickstart", "logger.progress=false", "hydra.run.dir=qs", timeout=1800)
    return workdir / "qs", proc.stdout


@pytest.fixture(scope="module")
def prune_qat(workdir, quickstart) -> Path:
    run_cli(
        workdir,
        "experiment=quickstart",
        "compress=prune_qat",
        "logger.progress=false",
        "hydra.run.dir=pq",
        timeout=1800,
    )
    return workdir / "pq"


def final_eval(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir) if "eval/val_loss" in r][-1]


def test_teacher_reaches_nanogpt_quality(workdir, quickstart):
    teacher = final_eval(workdir / TEACHER_RUN)
    assert teacher["step"] == 2000
    assert teacher["eval/val_loss"] <= 1.95


def test_quickstart_prints_teacher_and_student(quickstart):
    run_dir, stdout = quickstart
    rows = {line.split("  ")[0].strip(): line for line in stdout.splitlines()}
    assert "teacher" in rows and "student (export)" in rows, stdout
    assert final_eval(run_dir)["step"] == 2000
    assert export.load(run_dir / "final") is not None


def test_prune_qat_hits_target_sparsity_at_end_step(prune_qat):
    rows = {r["step"]: r for r in read_metrics(prune_qat)}
    assert rows[1200]["compress/sparsity"] == pytest.approx(0.5, abs=0.005)
    assert rows[2000]["compress/sparsity"] == pytest.approx(rows[1200]["compress/sparsity"], abs=1e-9)
    assert rows[100]["compress/sparsity"] == 0.0
    assert rows[1100]["compress/qat_active"] == 0 and rows[1300]["compress/qat_active"] == 1
    for key in (
        "compress/nonzero_params",
        "compress/weight_bits",
        "compress/model_bytes",
        "compress/ratio",
        "compress/weight_sqnr_db",
    ):
        assert key in rows[2000], key


def test_prune_qat_metrics_are_in_the_wandb_run(prune_qat):
    (run_dir,) = (prune_qat / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=cli_env(prune_qat),
        timeout=120,
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    expected = {r["step"]: r["compress/sparsity"] for r in read_metrics(prune_qat)}
    assert {step: history[step]["compress/sparsity"] for step in expected} == pytest.approx(expected)


def test_prune_qat_export_is_small_and_close_to_dense_kd(quickstart, prune_qat):
    dense_run, _ = quickstart
    dense_bytes = folder_bytes(dense_run / "final")
    compressed_bytes = folder_bytes(prune_qat / "final")
    assert dense_bytes / compressed_bytes >= 6.0, (dense_bytes, compressed_bytes)
    dense_loss = final_eval(dense_run)["eval/val_loss"]
    export = next(
        m for m in json.loads((prune_qat / "report.json").read_text())["models"] if m["model"] == "student (export)"
    )
    print(
        f"val loss: dense KD student {dense_loss:.4f}, prune_qat export {export['val_loss']:.4f}; "
        f"bytes: dense {dense_bytes:,}, export {compressed_bytes:,} ({dense_bytes / compressed_bytes:.2f}x)"
    )
    assert export["val_loss"] <= 1.03 * dense_loss, (export["val_loss"], dense_loss)
    report = (prune_qat / "report.md").read_text()
    assert "student (export)" in report and "Compression by layer" in report
