"""End-to-end CLI runs: resume equivalence, a kill during a checkpoint write, metrics, W&B and the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, KILL_DURING_CHECKPOINT, cli_env, read_metrics, run_cli, train_small_teacher
from trainer import checkpoint, data, export, models
from trainer.config import DataConfig

pytestmark = pytest.mark.e2e
STEPS = 16
RUN = [
    *FAST,
    "train.max_steps=16",
    "train.ckpt_every=4",
    "train.eval_every=8",
    "logger.log_every=1",
    "student.dropout=0.1",
]
REQUIRED_KEYS = {"step", "train/loss", "train/ce", "distill/kd", "train/lr", "perf/tokens_per_s", "perf/step_ms"}


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small teacher trained by the CLI itself (plain training = distill=none)."""
    root = tmp_path_factory.mktemp("teacher")
    return train_small_teacher(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher) -> Path:
    """An uninterrupted KD run of STEPS steps with W&B offline."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(
        root,
        *RUN,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teacher}",
        "logger=wandb",
        "logger.progress=false",
        "hydra.run.dir=run",
    )
    return root / "run"


def kd(teacher: Path) -> list[str]:
    return ["distill=kd", "teacher=path", f"teacher.checkpoint={teacher}"]


def test_metrics_file_has_the_required_keys(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
    evals = [r["step"] for r in rows if "eval/val_loss" in r]
    assert evals == [8, 16]
    assert (reference / "report.md").is_file()
    assert "| teacher |" in (reference / "report.md").read_text()


def test_wandb_offline_run_holds_the_same_losses(reference):
    (run_dir,) = (reference / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=cli_env(reference),
        timeout=120,
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    for step, loss in losses(reference).items():
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-7)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["distill"]["loss"] == "forward_kl" and config["train"]["max_steps"] == STEPS
    assert {k: config["parallel"][k] for k in ("world_size", "dp_replicate", "dp_shard", "pp")} == {
        "world_size": 1,
        "dp_replicate": 1,
        "dp_shard": 1,
        "pp": 1,
    }
    last = history[max(history)]
    params, optimizer = last["memory/rank0/params_bytes"], last["memory/rank0/optimizer_bytes"]
    assert params > 0 and last["memory/rank0/grads_bytes"] == params and last["memory/rank0/peak_bytes"] > params
    assert 2 * params <= optimizer <= 2 * params + 4096  # AdamW's two moments, plus a step counter per tensor


def test_stop_and_resume_equals_uninterrupted(tmp_path, teacher, reference):
    run_cli(tmp_path, *RUN, *kd(teacher), "train.stop_at_step=8", "hydra.run.dir=run")
    first = losses(tmp_path / "run")
    assert max(first) == 8 and not (tmp_path / "run" / "final").exists()
    proc = run_cli(tmp_path, *RUN, *kd(teacher), "hydra.run.dir=run")
    assert "resumed from" in proc.stderr and "step_0000008" in proc.stderr
    resumed = losses(tmp_path / "run")
    expected = losses(reference)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_kill_during_checkpoint_write_leaves_a_resumable_run(tmp_path, teacher, reference):
    proc = subprocess.run(
        [sys.executable, str(KILL_DURING_CHECKPOINT), "3", *RUN, *kd(teacher), "hydra.run.dir=run"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt_root = tmp_path / "run" / "ckpt"
    assert (ckpt_root / ".tmp-step_0000012").is_dir(), "the kill must land inside the third checkpoint write"
    assert checkpoint.latest(ckpt_root).name == "step_0000008"
    proc = run_cli(tmp_path, *RUN, *kd(teacher), "hydra.run.dir=run")
    assert "step_0000008" in proc.stderr
    resumed, expected = losses(tmp_path / "run"), losses(reference)
    assert sorted(resumed) == sorted(expected)
    assert resumed[STEPS] == pytest.approx(expected[STEPS], rel=1e-6)
    assert not (ckpt_root / ".tmp-step_0000012").exists() or checkpoint.latest(ckpt_root).name == "step_0000016"


def test_export_reloads_to_the_trained_student(reference):
    exported = export.load(reference / "final")
    trained = models.build_from_spec(checkpoint.read_model_spec(checkpoint.latest(reference / "ckpt")))
    checkpoint.load_model_weights(checkpoint.latest(reference / "ckpt"), trained)
    x, _ = next(data.build(DataConfig(name="synthetic"), 16).val_batches(4))
    assert torch.equal(exported(x), trained.eval()(x))


def test_non_finite_loss_stops_with_the_step(tmp_path):
    proc = run_cli(
        tmp_path,
        *FAST,
        "train.max_steps=12",
        "train.ckpt_every=5",
        "train.lr=1e6",
        "train.grad_clip=0",
        "train.warmup_steps=0",
        "hydra.run.dir=run",
        check=False,
    )
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss") and "at step" in line


@pytest.mark.slow  # torchrun's runs of 2 and more ranks equal one plain process throughout tests/dist
def test_torchrun_single_process_equals_plain_python(tmp_path, teacher, reference):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "trainer",
            *RUN,
            *kd(teacher),
            "logger=wandb",
            "logger.progress=false",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, expected = losses(tmp_path / "run"), losses(reference)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # a larger run: two 300-step trainings held to an accuracy
def test_digits_teacher_and_distilled_student(tmp_path):
    common = [
        "data=digits",
        "logger=console",
        "logger.progress=false",
        "train.batch_size=64",
        "train.warmup_steps=10",
        "train.eval_every=100",
        "train.max_steps=300",
        "train.lr=5e-3",
        "train.min_lr=5e-4",
    ]
    run_cli(tmp_path, *common, "student=mlp_teacher", "hydra.run.dir=teacher")
    run_cli(
        tmp_path,
        *common,
        "student=mlp_small",
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={tmp_path / 'teacher'}",
        "hydra.run.dir=student",
    )
    for name in ("teacher", "student"):
        last = [r for r in read_metrics(tmp_path / name) if "eval/accuracy" in r][-1]
        assert last["eval/accuracy"] > 0.85, (name, last)
        assert last["eval/errors"] == round((1 - last["eval/accuracy"]) * 360)
