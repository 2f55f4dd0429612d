"""Jobs on the local SLURM cluster: launch/slurm/*.sbatch across two nodes, a USR1 preemption that requeues the
job and resumes it to the uninterrupted run's metrics, and a Hydra sweep through hydra/launcher=slurm."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, cli_env, read_metrics, train_small_teacher

pytestmark = pytest.mark.slurm
STEPS = 300
SIGNAL_AFTER_ROWS = 30
TRAIN_SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
SRUN_SBATCH = str(REPO / "launch" / "slurm" / "train_srun.sbatch")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return train_small_teacher(tmp_path_factory.mktemp("teacher"))


def kd_run(teacher: Path, parallel: str = "ddp", steps: int = STEPS) -> list[str]:
    return [
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teacher}",
        f"parallel={parallel}",
        f"train.max_steps={steps}",
        "train.ckpt_every=100",
        "train.eval_every=100",
        "logger.log_every=1",
    ]


def job_env(cluster, root: Path) -> dict:
    return {**cli_env(root), "SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1"}


@dataclass
class Job:
    """A job submitted from ``root``; its run dir is the one the scripts pin: outputs/<name>/slurm-<job id>."""

    root: Path
    job_id: str

    @property
    def run_dir(self) -> Path:
        return self.root / "outputs" / "run" / f"slurm-{self.job_id}"

    @property
    def log(self) -> str:
        return (self.root / f"slurm-{self.job_id}.out").read_text()


def submit(cluster, script: str, root: Path, overrides: list[str]) -> Job:
    """``sbatch --nodes=2 SCRIPT OVERRIDES`` from ``root``."""
    return Job(root, cluster.sbatch("--nodes=2", script, *overrides, cwd=root, env=job_env(cluster, root)))


def assert_completed(fields: dict, job: Job) -> None:
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, job.log[-3000:])


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, teacher, tmp_path_factory) -> Job:
    """``sbatch --nodes=2 launch/slurm/train.sbatch`` of a KD run (DDP, 2 nodes x 1 process) to the end."""
    job = submit(slurm_cluster, TRAIN_SBATCH, tmp_path_factory.mktemp("sbatch"), kd_run(teacher))
    assert_completed(slurm_cluster.wait(job.job_id), job)
    return job


def test_sbatch_runs_a_two_node_kd_run_to_completion(uninterrupted):
    assert "2 nodes x 1 processes" in uninterrupted.log
    assert "ddp: parameters identical on all 2 ranks" in uninterrupted.log
    assert [row["step"] for row in read_metrics(uninterrupted.run_dir)] == list(range(1, STEPS + 1))
    assert (uninterrupted.run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow  # a requeued job; the default tier runs the sbatch and srun scripts, SIGTERM resumes: test_signals.py
def test_usr1_midway_checkpoints_requeues_and_matches_uninterrupted(slurm_cluster, teacher, uninterrupted, tmp_path):
    job = submit(slurm_cluster, TRAIN_SBATCH, tmp_path, kd_run(teacher))
    run_dir, metrics = job.run_dir, job.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < SIGNAL_AFTER_ROWS:
        assert time.monotonic() < deadline, slurm_cluster.job(job.job_id)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job.job_id)
    fields = slurm_cluster.wait(
        job.job_id,
        until=lambda f: (
            f["JobState"] == "COMPLETED" and f["Restarts"] != "0" or f["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT")
        ),
    )
    assert_completed(fields, job)
    log = job.log
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint \S+; exit 75", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert SIGNAL_AFTER_ROWS <= step < STEPS
    assert f"resumed from {run_dir}/ckpt/step_{step:07d} at step {step}" in log
    assert "restart 1: 2 nodes x 1 processes" in log

    got, expected = read_metrics(run_dir), read_metrics(uninterrupted.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for a, b in zip(got, expected):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6), a["step"]
    assert got[-1]["eval/val_loss"] == pytest.approx(expected[-1]["eval/val_loss"], abs=1e-6)


def test_srun_only_script_matches_torchrun(slurm_cluster, teacher, uninterrupted, tmp_path):
    """One task per rank, ranks and rendezvous from SLURM_* (parallel/env.py): the same run as under torchrun."""
    job = submit(slurm_cluster, SRUN_SBATCH, tmp_path, kd_run(teacher))
    assert_completed(slurm_cluster.wait(job.job_id), job)
    assert "2 ranks" in job.log and "ddp: parameters identical on all 2 ranks" in job.log
    got, expected = read_metrics(job.run_dir), read_metrics(uninterrupted.run_dir)
    assert [r["train/loss"] for r in got] == pytest.approx([r["train/loss"] for r in expected], abs=1e-6)


def test_hydra_sweep_through_the_slurm_launcher(slurm_cluster, teacher, tmp_path):
    temperatures = ["1", "2", "4"]
    overrides = [*kd_run(teacher, parallel="single", steps=30), "hydra.sweep.dir=sweep"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "-m",
            "hydra/launcher=slurm",
            *overrides,
            f"distill.temperature={','.join(temperatures)}",
        ],
        cwd=tmp_path,
        env=job_env(slurm_cluster, tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kd_losses = []
    for num, temperature in enumerate(temperatures):
        run_dir = tmp_path / "sweep" / str(num)
        assert f"distill.temperature={temperature}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, 31))
        assert (run_dir / "final" / "model.safetensors").is_file()
        kd_losses.append(rows[-1]["distill/kd"])
    assert len(set(kd_losses)) == 3  # each job ran its own temperature
    assert len(list((tmp_path / "sweep" / ".submitit").iterdir())) >= 3  # submitted as SLURM jobs


@pytest.mark.slow  # the sweep through the launcher runs in the default tier (the test above); this is the search's use
def test_the_cut_search_trains_each_candidate_as_a_slurm_job(slurm_cluster, tmp_path):
    """``python -m trainer.search search.launcher=slurm``: the best two candidates as cut are trained as jobs of the
    Hydra SLURM launcher (all submitted at once), and ranked after training as a local search ranks them."""
    import json

    from tests.conftest import save_hf_student

    save_hf_student(tmp_path / "llama", "llama")
    run = [*(arg for arg in FAST if not arg.startswith("student.")), "student=from_teacher", "student.block_size=16",
           "student.calib_batches=2", "teacher=hf", f"teacher.checkpoint={tmp_path / 'llama'}", "distill=kd",
           "data.eval_batches=2", "search.budget=0.5", "search.top=2", "search.tokens=1280", "search.evals=2",
           "search.layers=[2,3,4]", "search.launcher=slurm"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.search", *run],
        cwd=tmp_path,
        env=job_env(slurm_cluster, tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "search" / "search.json").read_text())
    trained = [row for row in result["candidates"] if row["loss_after"] is not None]
    assert sorted(row["rank_as_cut"] for row in trained) == [1, 2]
    for row in trained:
        folder = tmp_path / "search" / row["name"]
        assert len(list((folder / ".submitit").iterdir())) >= 1  # a SLURM job
        assert [r["step"] for r in read_metrics(folder)][-1] == 10
        assert row["curve"][-1] == [1280, row["loss_after"]]
    assert f"winner: {result['winner']['name']}" in proc.stdout
