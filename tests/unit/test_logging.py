"""RunLogger: metrics.jsonl, resume truncation, progress bar and W&B (offline, read back with wandb's CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from trainer.logging import RunLogger, _has_wandb_api_key


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_logger(run_dir: Path, **kwargs) -> RunLogger:
    kwargs = {"config": {}, "total_steps": 10, "progress": False, "wandb_mode": "disabled", **kwargs}
    return RunLogger(run_dir, **kwargs)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No W&B settings or credentials from the host: empty HOME, no netrc, no WANDB_* variables."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / "netrc"))


def inspect_wandb_run(run_dir: Path) -> list[dict]:
    """The records of the single offline W&B run under run_dir, via `wandb leet inspect --json`."""
    (offline,) = run_dir.glob("wandb/offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_metrics_jsonl_one_object_per_log(tmp_path):
    logger = make_logger(tmp_path)
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 0.1})
    logger.log(2, {"loss": torch.tensor(1.25), "lr": 0.05, "tokens": torch.tensor(128)})
    logger.table("samples", ["step", "text"], [[torch.tensor(2), "to be"]], step=2)
    logger.close()
    logger.close()  # idempotent

    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 0.1},
        {"step": 2, "loss": 1.25, "lr": 0.05, "tokens": 128},
        {"step": 2, "table": "samples", "columns": ["step", "text"], "rows": [[2, "to be"]]},
    ]
    assert type(lines[0]["loss"]) is float


def test_lines_are_flushed_before_close(tmp_path):
    logger = make_logger(tmp_path)
    logger.log(1, {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    logger.close()


def test_non_main_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir, is_main=False, progress=True, wandb_mode="online")
    logger.log(1, {"loss": 1.0})
    logger.progress(1, {"loss": 1.0})
    logger.table("t", ["a"], [[1]], step=1)
    logger.summary({"best": 1.0})
    logger.warn("hidden")
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_resume_truncates_steps_after_checkpoint(tmp_path):
    logger = make_logger(tmp_path)
    for step in range(1, 11):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a line torn by a crash

    logger = make_logger(tmp_path, start_step=6)
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    logger.log(7, {"loss": 70.0})
    logger.close()

    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert lines[-1]["loss"] == 70.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_progress_bar_and_warn_go_to_stderr(tmp_path, capsys):
    logger = make_logger(tmp_path, progress=True, start_step=2)
    for step in range(3, 11):
        logger.progress(step, {"loss": torch.tensor(0.5), "tok/s": 123456.0})
    logger.warn("something odd")
    logger.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "10/10" in err and "loss=0.5" in err and "tok/s=123456" in err
    assert "warning: something odd" in err


def test_api_key_detection(tmp_path, monkeypatch, wandb_env):
    assert not _has_wandb_api_key()
    netrc = tmp_path / "home" / "netrc"
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert _has_wandb_api_key()
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert _has_wandb_api_key()


def test_wandb_offline_run_reads_back(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    config = {"model": {"n_layer": 2, "n_embd": 64}, "lr": 0.01}
    losses = {1: 2.0, 2: 1.5, 3: 1.25, 5: 1.125}
    logger = make_logger(run_dir, config=config, wandb_mode="offline", wandb_name="readback", wandb_tags=["test"])
    for step, loss in losses.items():
        logger.log(step, {"loss": torch.tensor(loss), "lr": 0.01})
    logger.summary({"best_loss": 1.125})
    logger.close()

    records = inspect_wandb_run(run_dir)

    def by_type(kind: str) -> list[dict]:
        return [r[kind] for r in records if r["type"] == kind]

    history = {h["step"]["num"]: h["item"]["loss"] for h in by_type("history")}
    assert history == losses
    (run,) = by_type("run")
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == config
    assert run["run_id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert run["display_name"] == "readback" and run["tags"] == ["test"]
    assert any("best_loss" in s["update"] for s in by_type("summary"))
    (exit_record,) = by_type("exit")  # wandb adds "runtime" (seconds) once closing takes a second or more
    assert exit_record.get("exit_code", 0) == 0 and set(exit_record) <= {"exit_code", "runtime"}


def test_wandb_resume_keeps_run_id(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir, wandb_mode="offline")
    logger.log(1, {"loss": 1.0})
    logger.close()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()

    logger = make_logger(run_dir, wandb_mode="offline", start_step=1)
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    logs = [p.name for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")]
    assert logs == [f"run-{run_id}.wandb"] * 2


def test_online_without_api_key_falls_back_to_offline(tmp_path, wandb_env, capsys):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir, wandb_mode="online")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert "offline" in capsys.readouterr().err
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1


def test_broken_wandb_init_warns_and_keeps_logging(tmp_path, wandb_env, monkeypatch, capsys):
    def broken_init(**kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = make_logger(tmp_path, wandb_mode="offline")
    logger.log(1, {"loss": 1.0})
    logger.summary({"best": 1.0})
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert "no wandb today" in capsys.readouterr().err


def test_failing_wandb_log_warns_once_and_disables(tmp_path, wandb_env, monkeypatch, capsys):
    class FlakyRun:
        finished = False

        def log(self, metrics, step):
            raise ConnectionError("lost")

        def finish(self, exit_code):
            FlakyRun.finished = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    logger = make_logger(tmp_path, wandb_mode="offline")
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert capsys.readouterr().err.count("W&B log failed") == 1
    assert not FlakyRun.finished  # W&B stays off after the failure
