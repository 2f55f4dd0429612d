"""Signals to a running ``python -m trainer``: Ctrl-C (SIGINT) and SIGTERM finish the step, write a checkpoint
and exit with PREEMPTED_EXIT; rerunning resumes to the uninterrupted run's metrics. Under torchrun a signal to
one rank stops every rank at the same step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics, run_cli, slow
from trainer import checkpoint
from trainer.failure import INTERRUPTED_EXIT
from trainer.preemption import CTRL_C_NOTICE, PREEMPTED_EXIT

pytestmark = pytest.mark.e2e
STEPS = 400
SIGNAL_AFTER_ROWS = 20
# No dropout, so two DDP ranks compute what one process does (each rank draws its own dropout masks).
RUN = [
    *FAST,
    f"train.max_steps={STEPS}",
    "train.ckpt_every=100",
    "train.eval_every=200",
    "logger.log_every=1",
    "hydra.run.dir=run",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli(root, *RUN)
    return read_metrics(root / "run")


def start(root: Path, *command: str) -> subprocess.Popen:
    return subprocess.Popen(
        list(command),
        cwd=root,
        env={**cli_env(root), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stopped_by_sigterm_and_resumed(root: Path, run: list[str], steps: int) -> None:
    """Run ``run`` whole (``whole``), and again (``stopped``) stopped by SIGTERM after 3 metric rows: exit
    PREEMPTED_EXIT with the line saying to rerun; the same command resumes from the stop's checkpoint, and the run
    ends as the whole one (every step logged; the last train and val loss, rel 1e-6)."""
    run_cli(root, *run, "hydra.run.dir=whole")
    proc = start(root, sys.executable, "-m", "trainer", *run, "hydra.run.dir=stopped")
    wait_for_rows(proc, root / "stopped" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, stderr[-2000:]
    stopped_at = checkpoint.latest(root / "stopped" / "ckpt")
    assert stopped_at is not None and "run the same command again to resume" in stderr
    resumed = run_cli(root, *run, "hydra.run.dir=stopped")
    assert f"resumed from {stopped_at}" in resumed.stderr
    got, want = read_metrics(root / "stopped"), read_metrics(root / "whole")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # a step 0 row too with train.eval_at_start
    assert [r["step"] for r in got if r["step"] > 0] == list(range(1, steps + 1))
    for key in ("train/loss", "eval/val_loss"):
        assert got[-1][key] == pytest.approx(want[-1][key], rel=1e-6), key


def wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < rows:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {rows} metric rows (exit {proc.poll()}):\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def stopped_step(stderr: str, signal_name: str) -> int:
    found = re.search(rf"stopped by {signal_name} after step (\d+); checkpoint (\S+); exit {PREEMPTED_EXIT}", stderr)
    assert found, stderr[-3000:]
    step = int(found.group(1))
    assert SIGNAL_AFTER_ROWS <= step < STEPS
    assert checkpoint.is_complete(Path(found.group(2))) and Path(found.group(2)).name == f"step_{step:07d}"
    return step


def assert_same_metrics(got: list[dict], expected: list[dict], tolerance: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for a, b in zip(got, expected):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=tolerance), a["step"]
    assert got[-1]["eval/val_loss"] == pytest.approx(expected[-1]["eval/val_loss"], abs=tolerance)


@pytest.mark.parametrize("sig", [slow(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")])
def test_signal_checkpoints_exits_and_resume_matches_uninterrupted(sig, tmp_path, reference):
    proc = start(tmp_path, sys.executable, "-m", "trainer", *RUN)
    wait_for_rows(proc, tmp_path / "run" / "metrics.jsonl", SIGNAL_AFTER_ROWS)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, stderr[-3000:]
    step = stopped_step(stderr, sig.name)
    assert not (tmp_path / "run" / "final").exists()
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == step

    resumed = run_cli(tmp_path, *RUN)
    assert f"resumed from {tmp_path / 'run' / 'ckpt' / f'step_{step:07d}'} at step {step}" in resumed.stderr
    assert_same_metrics(read_metrics(tmp_path / "run"), reference, tolerance=1e-6)


def test_a_second_ctrl_c_aborts_with_one_line_and_exit_130(tmp_path):
    proc = start(tmp_path, sys.executable, "-m", "trainer", *RUN)
    wait_for_rows(proc, tmp_path / "run" / "metrics.jsonl", SIGNAL_AFTER_ROWS)
    proc.send_signal(signal.SIGINT)
    # The second Ctrl-C only once the first one's handler has run: two signals that arrive before Python runs its
    # handler are one call of it (CPython keeps a flag per signal, not a count).
    assert proc.stderr is not None  # start() pipes it
    before = b""
    while (CTRL_C_NOTICE + "\n").encode() not in before:  # from the pipe itself: communicate() reads on from there
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the run ended without the Ctrl-C notice: {before.decode()[-3000:]}"
        before += chunk
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stderr = before.decode() + stderr
    assert proc.returncode == INTERRUPTED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    newest = checkpoint.latest(tmp_path / "run" / "ckpt")
    kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"
    assert line == f"interrupted by a second Ctrl-C; {kept}", line
    assert not list((tmp_path / "run" / "ckpt").glob(".tmp-*"))


def worker_of_rank(agent_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker with RANK=``rank`` (a child of the agent process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if ppid == agent_pid and f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.2)
    pytest.fail(f"no worker of rank {rank} under torchrun {agent_pid}")


TORCHRUN_DDP = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--nproc_per_node=2",
    "-m",
    "trainer",
    *RUN,
    "parallel=ddp",
]


def resume_matches_uninterrupted(root: Path, step: int, reference: list[dict]) -> None:
    """Rerunning the torchrun command resumes at ``step`` and ends with the uninterrupted run's metrics."""
    resumed = subprocess.run(
        TORCHRUN_DDP,
        cwd=root,
        env={**cli_env(root), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    # Two DDP ranks match one process to float rounding (docs/distributed.md); the step count and resume point
    # are exact.
    assert_same_metrics(read_metrics(root / "run"), reference, tolerance=1e-5)


@pytest.mark.dist
@pytest.mark.slow  # torchrun's own SIGTERM to every rank stays in the default tier (the test below)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, reference):
    proc = start(tmp_path, *TORCHRUN_DDP)
    worker = worker_of_rank(proc.pid, 1)
    wait_for_rows(proc, tmp_path / "run" / "metrics.jsonl", SIGNAL_AFTER_ROWS)
    os.kill(worker, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its workers' exit 75 as a failure of its own
    step = stopped_step(stderr, "a signal to another rank")  # rank 0 prints it: it did not get the signal itself
    assert f"exitcode  : {PREEMPTED_EXIT}" in stderr
    resume_matches_uninterrupted(tmp_path, step, reference)


@pytest.mark.dist
@pytest.mark.slow  # SIGTERM to one process checkpoints, exits and resumes in the default tier (the test above)
def test_sigterm_to_torchrun_checkpoints_and_torchrun_exits_1(tmp_path, reference):
    """SIGTERM to torchrun itself (what a scheduler sends): torchrun forwards it, every rank finishes its step,
    checkpoints and exits 75, and torchrun ends with its own ``SignalException`` traceback and exit code 1 (what
    docs/faults.md tells users to expect); the same command resumes to the uninterrupted run's metrics."""
    proc = start(tmp_path, *TORCHRUN_DDP)
    wait_for_rows(proc, tmp_path / "run" / "metrics.jsonl", SIGNAL_AFTER_ROWS)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "SignalException" in stderr
    resume_matches_uninterrupted(tmp_path, stopped_step(stderr, "SIGTERM"), reference)
