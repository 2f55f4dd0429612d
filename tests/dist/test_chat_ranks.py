"""data=chat on a small Llama student with KD from a small Llama teacher that carries the tokenizer (the data's
tokenizer is the teacher's own): 2 DDP ranks equal one process accumulating the 2 ranks' slices, and a run killed
(SIGKILL) inside its second checkpoint write and resumed from the first equals the uninterrupted one. The labels
are masked off the assistant's tokens, so the ranks' slices hold different numbers of trained tokens: the losses
are the mean over the global batch's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KILL_DURING_CHECKPOINT, cli_env
from tests.data_files import conversations, save_llama, save_tokenizer, write_jsonl

pytestmark = pytest.mark.dist
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

STEPS = 6
KEYS = ("train/loss", "train/ce", "distill/kd", "eval/val_loss")


def launch(root: Path, nproc: int, name: str, *extra: str, killed_at: int | None = None) -> Path:
    """``python -m trainer`` (nproc=1), under torchrun (nproc > 1), or killed inside checkpoint write ``killed_at``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    entry = [str(KILL_DURING_CHECKPOINT), str(killed_at)] if killed_at else [*torchrun, "-m", "trainer"]
    overrides = [
        "data=chat", "data.files=[chat.jsonl]", "student=hf", "student.path=student", "student.block_size=32",
        "distill=kd", "distill.alpha=0.5", "teacher=hf", "teacher.checkpoint=llama_teacher", "logger=console",
        "logger.progress=false", "logger.log_every=1", "train.batch_size=8", "train.warmup_steps=2",
        f"train.max_steps={STEPS}", "train.eval_every=3", "train.ckpt_every=3",
    ]  # fmt: skip
    command = [sys.executable, *entry, *overrides, *extra, f"hydra.run.dir={name}"]
    env = cli_env(root) | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (-9 if killed_at else 0), proc.stderr[-5000:]
    return root / name


def losses(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: row[k] for k in KEYS if k in row} for row in rows if "step" in row and "table" not in row}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    tokenizer = save_tokenizer(root / "tok")
    save_llama(root / "llama_teacher", 300, seed=1, tokenizer=tokenizer)
    save_llama(root / "student", 300, seed=0)
    write_jsonl(root / "chat.jsonl", conversations(60))
    return root


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        assert got[step].keys() == expected.keys()
        for key, value in expected.items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=0), (step, key)


@pytest.mark.slow  # ranks and a resume equal one process in the default tier on other data (test_parallel_runs.py)
def test_two_ranks_and_a_resumed_run_equal_one_process(root):
    reference = losses(launch(root, 1, "single", "train.grad_accum=2"))
    assert all(reference[step].keys() >= {"train/loss", "distill/kd"} for step in reference)
    assert_same(losses(launch(root, 2, "ddp", "parallel=ddp")), reference)
    killed = launch(root, 1, "resumed", "train.grad_accum=2", killed_at=2)
    assert (killed / "ckpt" / "step_0000003").is_dir() and not (killed / "ckpt" / "step_0000006").exists()
    assert_same(losses(launch(root, 1, "resumed", "train.grad_accum=2")), reference)  # steps 4-6 again
