"""``distill.fused=true`` (head + divergence a chunk of tokens at a time, inside the student's forward) trains the
same student as ``distill.fused=false`` (full logits) at every step, in one process, under FSDP2 on 2 ranks and
pipelined on 2 ranks (the loss inside the last stage's forward): on
Stillroom's GPT (forward KL) and on a small Llama with a tied head (JSD with the top-k tail), both from a small GPT
teacher replicated, whose head is fused too. The chunk size splits each micro-batch's 64 tokens into 3 chunks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, save_hf_student, slow
from tests.dist import test_parallel_runs
from tests.dist.equality import LOSS_KEYS, REASSOCIATION, by_step
from tests.dist.test_pipeline_runs import PIPELINE_2

pytestmark = pytest.mark.dist

teacher = test_parallel_runs.teacher  # the same fixture: a small GPT teacher (module scope)
STEPS = 6
STUDENTS = {
    "gpt": ["distill.loss=forward_kl"],
    "llama": ["student=hf", "distill.loss=jsd", "distill.top_k=8", "distill.top_k_tail=true"],
}


def overrides(kind: str, root: Path, teacher: Path) -> list[str]:
    student = [arg for arg in FAST if not arg.startswith("student.") or kind == "gpt"]
    if kind == "llama":
        student += [f"student.path={root / kind}", "student.block_size=16"]
    return [
        *student,
        *STUDENTS[kind],
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teacher}",
        "distill.chunk_size=24",
        f"train.max_steps={STEPS}",
        "logger.log_every=1",
        "train.eval_every=3",
    ]


def launch(root: Path, nproc: int, name: str, args: list[str]) -> tuple[Path, str]:
    """``python -m trainer`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m trainer`` into ``root/name``; the run's
    folder and its output (stdout, then stderr: a teacher rank's closing line)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *torchrun, "-m", "trainer", *args, f"hydra.run.dir={name}"]
    proc = subprocess.run(
        command, cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root / name, proc.stdout + proc.stderr


@pytest.mark.slow  # the fused loss against float64 in the default tier (tests/unit/test_fused_kd.py); fused FSDP2
# runs equal one process there too (test_parallel_runs.py, fused by default)
@pytest.mark.parametrize("kind", ["gpt", slow("llama", id="llama")])
def test_fused_equals_full_logits_in_one_process_under_fsdp_and_pipelined(tmp_path, teacher, kind):
    if kind == "llama":
        pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")
        save_hf_student(tmp_path / kind, kind)
    args = overrides(kind, tmp_path, teacher)
    reference, said = launch(tmp_path, 1, "full", [*args, "distill.fused=false", "train.grad_accum=2"])
    assert "distill: fused" not in said
    runs = []
    layouts = (
        (1, "fused", ["train.grad_accum=2"], ""),
        (2, "fused_fsdp", ["parallel=fsdp"], ""),
        (2, "fused_pp", PIPELINE_2, " on the last stage"),
    )
    for nproc, name, layout, where in layouts:
        run, said = launch(tmp_path, nproc, name, [*args, "distill.fused=true", *layout])
        assert f"distill: fused head + divergence{where}, 24 tokens at a time (teacher: its head)" in said
        runs.append(run)
    want = by_step(reference)
    assert sorted(want) == list(range(1, STEPS + 1))
    for run in runs:
        got = by_step(run)
        for step, expected in want.items():
            for key in LOSS_KEYS:
                if key in expected:
                    assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (run.name, step, key)
