"""Rerunning a command in a pinned ``hydra.run.dir``: a finished run is left as it is (exit 0, every file
byte-identical); a stopped one resumes only with the teacher, data and settings it was written with, unless
``train.allow_resume_changes`` names what changed; a resume from the last step's checkpoint (a run that stopped
while exporting) still reports real figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, run_cli
from trainer import checkpoint, export, models

pytestmark = pytest.mark.e2e
STEPS = 4
KD = [*FAST, "distill=kd", "teacher=path", f"train.max_steps={STEPS}", "train.ckpt_every=2", "train.eval_every=2"]


def save_teacher(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    teacher = models.build("gpt", vocab_size=32, n_layer=1, n_head=1, n_embd=16, block_size=16)
    staging = export.staging_dir(folder)
    models.save_dense(teacher, staging)
    export.publish(staging, folder)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reruns")
    save_teacher(root / "teacher_a", seed=1)
    save_teacher(root / "teacher_b", seed=2)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_left_byte_identical(root):
    run = [*KD, "teacher.checkpoint=teacher_a", "hydra.run.dir=finished"]
    run_cli(root, *run)
    before = snapshot(root / "finished")
    assert "report.json" in before and "final/model.safetensors" in before
    again = run_cli(root, *run)
    assert again.stderr.strip().splitlines() == [
        f"{root / 'finished'} holds this run, finished (step {STEPS} of {STEPS}; {root / 'finished' / 'report.md'}): "
        "nothing to do; pin another hydra.run.dir to train again"
    ]
    assert snapshot(root / "finished") == before


@pytest.mark.slow  # a resume that differs is refused naming the key in the default tier (test_bad_inputs.py)
def test_a_resume_with_another_teacher_is_refused_unless_allowed(root):
    run = [*KD, "hydra.run.dir=stopped"]
    run_cli(root, *run, "teacher.checkpoint=teacher_a", "train.stop_at_step=2")
    before = snapshot(root / "stopped")
    refused = run_cli(root, *run, "teacher.checkpoint=teacher_b", check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and len(lines[0]) <= 200, lines
    assert lines[0].startswith("config error: teacher: checkpoint step_0000002 differs (")
    assert "teacher_a there, " in lines[0] and "teacher_b here" in lines[0]
    assert snapshot(root / "stopped") == before
    allowed = run_cli(root, *run, "teacher.checkpoint=teacher_b", "train.allow_resume_changes=[teacher]")
    assert f"resumed from {root / 'stopped' / 'ckpt' / 'step_0000002'} at step 2" in allowed.stderr


@pytest.mark.slow  # two 30-step runs
def test_a_run_stopped_after_its_last_checkpoint_reports_real_figures(root):
    """The last step's checkpoint exists but the export and report do not (the run stopped while exporting): the
    rerun resumes at the last step, evaluates, and reports the run's training time, not 0.0 s and nan."""
    steps = 30  # long enough to take a tenth of a second
    run = [*KD, "teacher.checkpoint=teacher_a", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
           f"train.eval_every={steps}", "hydra.run.dir=unreported"]  # fmt: skip
    run_cli(root, *run)
    first = json.loads((root / "unreported" / "report.json").read_text())
    for name in ("report.json", "report.md", "final"):
        path = root / "unreported" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = run_cli(root, *run)
    assert f"resumed from {checkpoint.step_dir(root / 'unreported' / 'ckpt', steps)} at step {steps}" in again.stderr
    second = json.loads((root / "unreported" / "report.json").read_text())
    assert second["train_seconds"] == first["train_seconds"] > 0
    assert [m["val_loss"] for m in second["models"]] == pytest.approx([m["val_loss"] for m in first["models"]])
