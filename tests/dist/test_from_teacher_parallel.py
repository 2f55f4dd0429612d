"""``student=from_teacher`` on 2 ranks (torchrun, gloo): a student cut out of a small Hugging Face Llama teacher (2
of its 4 layers chosen by importance, half its key/value head groups and MLP channels) trains under FSDP2 equal to
one process summing the ranks' 2 micro-batches: every rank cuts the same student from the same calibration batches,
and each step's losses and the final weights are within float reassociation (``tests.dist.equality``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, save_hf_student
from tests.dist.equality import LOSS_KEYS, REASSOCIATION, by_step, export_val_loss, final_weights
from trainer import checkpoint

pytestmark = pytest.mark.dist
pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")

STEPS = 4
CUT_RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
    "student=from_teacher",
    "student.block_size=16",
    "student.layers=2",
    "student.width=0.5",
    "student.layer_select=importance",
    "student.calib_batches=2",
    "teacher=hf",
    "teacher.checkpoint=llama",
    "distill=kd",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=2",
]


def launch(root: Path, nproc: int, name: str, *overrides: str) -> Path:
    """``python -m trainer`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m trainer`` into ``root/name``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *torchrun, "-m", "trainer", *CUT_RUN, *overrides, f"hydra.run.dir={name}"]
    proc = subprocess.run(
        command, cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root / name


@pytest.mark.slow  # the cut is the same whatever the run's seed (tests/unit/test_cut.py); FSDP2 runs equal
# one process in the default tier (test_hf_students.py)
def test_a_student_cut_from_the_teacher_trains_under_fsdp_equal_to_one_process(tmp_path):
    save_hf_student(tmp_path / "llama", "llama")
    reference = launch(tmp_path, 1, "single", "train.grad_accum=2")
    run = launch(tmp_path, 2, "fsdp", "parallel=fsdp")
    spec = checkpoint.read_model_spec(checkpoint.latest(run / "ckpt"))["config"]["hf_config"]
    assert (spec["num_hidden_layers"], spec["num_key_value_heads"], spec["intermediate_size"]) == (2, 1, 64)
    got, want = by_step(run), by_step(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in LOSS_KEYS:
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    got_weights, want_weights = final_weights(run), final_weights(reference)
    assert sorted(got_weights) == sorted(want_weights)
    assert max(float((got_weights[k] - want_weights[k]).abs().max()) for k in want_weights) <= REASSOCIATION
    assert export_val_loss(run) == pytest.approx(export_val_loss(reference), rel=REASSOCIATION)
