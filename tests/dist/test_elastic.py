"""Elastic restarts: a DDP worker SIGKILLed mid-run under ``torchrun --max-restarts=1``; the restarted workers
resume from the newest checkpoint and the run ends with the metrics of an uninterrupted one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics
from trainer import checkpoint

pytestmark = pytest.mark.dist
STEPS = 200
RUN = [
    *FAST,
    "parallel=ddp",
    f"train.max_steps={STEPS}",
    "train.ckpt_every=20",
    "logger.log_every=5",
    "train.eval_every=100",
    "hydra.run.dir=run",
]  # restarted workers must find the same run dir
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--max-restarts=1",
    "-m",
    "trainer",
    *RUN,
]


def env(root: Path) -> dict:
    # torchrun shares its rendezvous store with the workers (the default); parallel/env.py keys the process
    # group's entries by restart so that restarted workers do not read the dead ones' addresses.
    return cli_env(root) | {"OMP_NUM_THREADS": "1"}


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun ``parent`` started, from /proc."""
    workers = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            variables = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue  # exited meanwhile
        if b"RANK" in variables:
            workers[int(variables[b"RANK"])] = int(proc.name)
    return workers


def wait_for_checkpoint(torchrun: subprocess.Popen, ckpt_root: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while (newest := checkpoint.latest(ckpt_root)) is None:
        assert torchrun.poll() is None, "torchrun ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    return newest


def test_worker_killed_mid_run_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    (tmp_path / "reference").mkdir()
    reference = subprocess.run(
        TORCHRUN,
        cwd=tmp_path / "reference",
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    (tmp_path / "killed").mkdir()
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        torchrun = subprocess.Popen(
            TORCHRUN, cwd=tmp_path / "killed", env=env(tmp_path), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            first = wait_for_checkpoint(torchrun, tmp_path / "killed" / "run" / "ckpt")
            victim = worker_pids(torchrun.pid)[0]
            os.kill(victim, signal.SIGKILL)
            returncode = torchrun.wait(timeout=300)
        finally:
            if torchrun.poll() is None:
                torchrun.kill()
    output = log.read_text()
    assert returncode == 0, output[-3000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", output)
    assert len(resumed) == 1, output[-3000:]
    path, step = Path(resumed[0][0]), int(resumed[0][1])
    assert int(first.name.split("_")[1]) <= step < STEPS, f"the kill must land mid-run (resumed at {step})"
    assert path == checkpoint.step_dir(tmp_path / "killed" / "run" / "ckpt", step)

    got, want = read_metrics(tmp_path / "killed" / "run"), read_metrics(tmp_path / "reference" / "run")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5, STEPS + 1, 5))
    for key in ("train/loss", "eval/val_loss"):
        assert got[-1][key] == pytest.approx(want[-1][key], rel=1e-6), key
    for row, expected in zip(got, want):
        assert row["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6), row["step"]
