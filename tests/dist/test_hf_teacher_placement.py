"""A Hugging Face teacher on 2 ranks (torchrun, gloo): ``teacher.placement=shard`` (its transformer layers are
FSDP2's units) equals ``replicate`` at every step, logits and hidden states alike, with half the teacher per rank;
a padded vocabulary sliced under ``shard`` equals the unpadded teacher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics, save_hf_teachers

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")

STEPS = 4
RUN = [
    *FAST,
    "distill=kd",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=2",
    "distill.features=[{student_layer:2,teacher_layer:2,loss:mse,weight:0.1}]",
]
EXACT = 1e-5


def launch(root: Path, name: str, *overrides: str) -> dict[int, dict]:
    """``torchrun --nproc_per_node=2 -m trainer`` into ``root/name``; its metrics by step."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer",
        *RUN,
        *overrides,
        f"hydra.run.dir={name}",
    ]
    proc = subprocess.run(
        command,
        cwd=root,
        env=cli_env(root) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {row["step"]: row for row in read_metrics(root / name)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``hf32``: a 2-layer GPT-2 on the synthetic data's 32 tokens; ``hf48``: the same, embeddings padded to 48."""
    root = tmp_path_factory.mktemp("hf_dist")
    save_hf_teachers(root, 32, 48, n_embd=48)
    return root


@pytest.fixture(scope="module")
def replicate(root) -> dict[int, dict]:
    return launch(root, "replicate", "parallel=fsdp", "teacher.checkpoint=hf32")


def assert_same_losses(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in ("train/loss", "distill/kd", "distill/features", "eval/val_loss"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=EXACT), (step, key)


def test_sharded_hf_teacher_equals_replicated_with_half_the_bytes(root, replicate):
    got = launch(root, "shard", "parallel=fsdp", "teacher.checkpoint=hf32", "teacher.placement=shard")
    assert_same_losses(got, replicate)
    assert "distill/features" in replicate[STEPS]
    whole, held = replicate[STEPS]["distill/teacher_param_bytes"], got[STEPS]["distill/teacher_param_bytes"]
    print(f"HF teacher parameter bytes on rank 0: replicate {whole:.0f}, shard {held:.0f}")
    assert 0.45 * whole <= held <= 0.55 * whole


def test_sliced_padded_hf_teacher_under_shard_equals_the_unpadded_one(root, replicate):
    got = launch(
        root,
        "shard_sliced",
        "parallel=ddp",
        "teacher.checkpoint=hf48",
        "teacher.vocab=slice",
        "teacher.placement=shard",
    )
    assert_same_losses(got, replicate)
