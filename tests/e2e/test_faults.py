"""Faults in real CLI runs: corrupt checkpoints, a checkpoint of another model, a disk error while writing a
checkpoint, W&B online without a network. Each is one clear line on stderr and loses nothing."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics, run_cli
from trainer import checkpoint
from trainer.logging import WANDB_INIT_TIMEOUT_S

pytestmark = pytest.mark.e2e
STEPS = 12
RUN = [
    *FAST,
    f"train.max_steps={STEPS}",
    "train.ckpt_every=4",
    "train.eval_every=6",
    "logger.log_every=1",
    "hydra.run.dir=run",
]
FILE_LIMIT_BYTES = 256 * 1024  # below the size of a checkpoint's tensor file (~630 KB), above every other file


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(root, *RUN)
    return root / "run"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run stopped at step 8: checkpoints of steps 4 and 8."""
    root = tmp_path_factory.mktemp("stopped")
    run_cli(root, *RUN, "train.stop_at_step=8")
    assert [p.name for p in checkpoint.list_complete(root / "run" / "ckpt")] == ["step_0000004", "step_0000008"]
    return root / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def stderr_lines(proc: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith(prefix)]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The bytes of every checkpoint file and of metrics.jsonl."""
    files = [*sorted((run_dir / "ckpt").rglob("*")), run_dir / "metrics.jsonl"]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if p.is_file()}


def assert_same_final_metrics(run_dir: Path, reference: Path) -> None:
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for key in ("train/loss", "eval/val_loss"):
        assert got[-1][key] == pytest.approx(want[-1][key], rel=1e-6, abs=1e-7), key


def truncate(data: bytes) -> bytes:
    return data[:1000]


def flip_one_bit(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize(("damage", "word"), [(truncate, "truncated"), (flip_one_bit, "garbled")])
def test_damaged_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, stopped, reference, damage, word):
    run_dir = copy_of(stopped, tmp_path)
    tensors = checkpoint.step_dir(run_dir / "ckpt", 8) / "__0_0.distcp"
    tensors.write_bytes(damage(tensors.read_bytes()))
    proc = run_cli(tmp_path, *RUN)
    (warning,) = stderr_lines(proc, "warning:")
    assert str(tensors) in warning and word in warning, warning
    assert f"resumed from {checkpoint.step_dir(run_dir / 'ckpt', 4)} at step 4" in proc.stderr
    assert_same_final_metrics(run_dir, reference)


def test_no_usable_checkpoint_is_one_error_line_and_nothing_is_deleted(tmp_path, stopped):
    run_dir = copy_of(stopped, tmp_path)
    tensors = checkpoint.step_dir(run_dir / "ckpt", 8) / "__0_0.distcp"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    state = checkpoint.step_dir(run_dir / "ckpt", 4) / checkpoint.STATE_FILE
    state.write_text(state.read_text().replace('"step"', '"stop"'))  # same size, other bytes
    before = snapshot(run_dir)
    proc = run_cli(tmp_path, *RUN, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no usable checkpoint:") and str(tensors) in line and str(state) in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def test_checkpoint_of_another_model_is_refused(tmp_path, stopped):
    run_dir = copy_of(stopped, tmp_path)
    before = snapshot(run_dir)
    proc = run_cli(tmp_path, *RUN, "student.n_embd=48", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (
        "config error: student: checkpoint ckpt/step_0000008 holds another model than this config (n_embd 32 there, "
        "48 here): resume with the same model, or train in another hydra.run.dir"
    ), line
    assert "Traceback" not in proc.stderr and not stderr_lines(proc, "warning:")
    assert snapshot(run_dir) == before


def limit_file_size() -> None:
    """In the child: writing past FILE_LIMIT_BYTES into any file fails with EFBIG (Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))


def test_disk_error_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, stopped, reference):
    run_dir = copy_of(stopped, tmp_path)
    previous = checkpoint.step_dir(run_dir / "ckpt", 8)
    before = snapshot(run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *RUN],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write checkpoint {checkpoint.step_dir(run_dir / 'ckpt', 12)} ("), line
    assert "File too large" in line and line.endswith(f"the newest checkpoint is still {previous}"), line
    assert "Traceback" not in proc.stderr
    assert {k: v for k, v in snapshot(run_dir).items() if k.startswith("ckpt")} == {
        k: v for k, v in before.items() if k.startswith("ckpt")
    }
    assert not list((run_dir / "ckpt").glob(".tmp-*"))
    proc = run_cli(tmp_path, *RUN)
    assert f"resumed from {previous} at step 8" in proc.stderr
    assert_same_final_metrics(run_dir, reference)


def test_wandb_online_without_network_logs_offline(tmp_path):
    env = cli_env(tmp_path) | {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            *FAST,
            "train.max_steps=4",
            "logger.log_every=1",
            "logger=wandb",
            "logger.progress=false",
            "logger.wandb.mode=online",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < WANDB_INIT_TIMEOUT_S, f"the whole run took {seconds:.0f} s: W&B waited for its init timeout"
    (warning,) = stderr_lines(proc, "warning:")
    assert warning.startswith("warning: W&B server http://127.0.0.1:9 unreachable (") and "logging offline" in warning
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
        capture_output=True,
        text=True,
        check=True,
        env=cli_env(tmp_path),
        timeout=120,
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    for row in read_metrics(tmp_path / "run"):
        assert history[row["step"]]["train/loss"] == pytest.approx(row["train/loss"], rel=1e-7)
