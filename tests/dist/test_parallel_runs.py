"""DDP, FSDP2 and HSDP runs of the real CLI (torchrun, gloo) against single-process runs of the same global batch.

Every run distills from a small teacher and prunes (AGP, steps 2-6) and fake-quantizes (int8 weights and
activations, from step 4) the student, so masks, thresholds, QAT and the export all run on shards.

The single-process reference of an N-rank run uses ``train.grad_accum=N``: its micro-batches are the ranks'
slices, so both sum the same per-slice gradients. With N=2 that sum has one order. With 4 slices (HSDP 2x2, DDP
2 ranks x 2 micro-batches) the collectives add ``(a+b)+(c+d)``, so the reference sums its micro-batches in that
order too (``train.accum_order=pairwise``): autograd's running sum ``((a+b)+c)+d`` differs in the last bit, which
fake-quant's rounding amplifies (a weight on a rounding boundary flips an int8 code: 7e-5 relative in the loss).
``tests/dist/equality.py`` says how close each run must be and why: 1e-5 relative (float reassociation) before
fake-quant, and after it a bound derived from what the flipped codes the exports show can change.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, slow, train_small_teacher
from tests.dist.equality import assert_same_run, by_step

pytestmark = pytest.mark.dist

STEPS, QAT_START = 10, 4
RUN = [
    *FAST,
    "distill=kd",
    "teacher=path",
    "compress=prune_qat",
    "compress.modifiers.0.start_step=2",
    "compress.modifiers.0.end_step=6",
    "compress.modifiers.0.every=2",
    f"compress.modifiers.1.start_step={QAT_START}",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=5",
    "train.ckpt_every=5",
]
HSDP_2X2 = ["parallel=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"]


def env(tmp_path: Path) -> dict:
    return cli_env(tmp_path) | {"OMP_NUM_THREADS": "1"}


def single(root: Path, teacher: Path, name: str, *overrides: str) -> Path:
    """``python -m trainer`` (one process) into ``root/name``."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *RUN, f"teacher.checkpoint={teacher}", *overrides, f"hydra.run.dir={name}"],
        cwd=root,
        env=env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / name


def torchrun(root: Path, teacher: Path, nproc: int, name: str, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc -m trainer`` into ``root/name``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "trainer",
        *RUN,
        f"teacher.checkpoint={teacher}",
        *overrides,
        f"hydra.run.dir={name}",
    ]
    proc = subprocess.run(command, cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def assert_same(run: Path, reference: Path, teacher: Path) -> int:
    """See ``tests.dist.equality.assert_same_run``; the exports' flipped codes."""
    return assert_same_run(run, reference, teacher, steps=STEPS, qat_start=QAT_START)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small teacher trained by the CLI (plain training, distill=none)."""
    root = tmp_path_factory.mktemp("teacher")
    return train_small_teacher(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference2(runs, teacher) -> Path:
    """The single-process run whose 2 micro-batches are the 2 ranks' slices."""
    return single(runs, teacher, "single_accum2", "train.grad_accum=2")


@pytest.fixture(scope="module")
def reference4(runs, teacher) -> Path:
    return single(runs, teacher, "single_accum4", "train.grad_accum=4", "train.accum_order=pairwise")


def test_ddp_matches_single_process_and_replicas_stay_identical(runs, teacher, reference2):
    proc = torchrun(runs, teacher, 2, "ddp", "parallel=ddp")
    assert "ddp: parameters identical on all 2 ranks" in proc.stderr
    assert_same(runs / "ddp", reference2, teacher)


@pytest.fixture(scope="module")
def fsdp2(runs, teacher) -> Path:
    torchrun(runs, teacher, 2, "fsdp", "parallel=fsdp")
    return runs / "fsdp"


def test_fsdp_matches_single_process(fsdp2, reference2, teacher):
    assert_same(fsdp2, reference2, teacher)


def test_fsdp_ranks_log_their_half_of_the_training_state(fsdp2, reference2):
    """``memory/rank{r}/*``: the two shards' parameter, gradient, optimizer and mask bytes add up to the single
    process's, each rank holding about half; peak memory is measured (nonzero) on each rank."""
    got, want = by_step(fsdp2)[STEPS], by_step(reference2)[STEPS]
    assert "memory/rank1/params_bytes" not in want
    for kind in ("params", "grads", "optimizer", "masks"):
        whole = want[f"memory/rank0/{kind}_bytes"]
        halves = [got[f"memory/rank{r}/{kind}_bytes"] for r in range(2)]
        # AdamW's per-parameter step counters are scalars that every rank keeps whole.
        assert whole > 0 and sum(halves) == pytest.approx(whole, rel=1e-3 if kind == "optimizer" else 0), kind
        assert max(halves) <= 0.55 * whole, kind
    assert all(got[f"memory/rank{r}/peak_bytes"] > 0 for r in range(2))


@pytest.fixture(scope="module")
def hsdp4(runs, teacher) -> Path:
    """HSDP 2 replicas x 2 shards on one node (4 processes)."""
    torchrun(runs, teacher, 4, "hsdp", *HSDP_2X2)
    return runs / "hsdp"


def test_hsdp_2x2_matches_single_process(hsdp4, reference4, teacher):
    assert_same(hsdp4, reference4, teacher)


def two_agents(runs: Path, teacher: Path, name: str, *overrides: str) -> Path:
    """``torchrun --nnodes=2 --nproc_per_node=2`` twice (c10d rendezvous on 127.0.0.1) into ``runs/name``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        f"--rdzv_id={name}",
        "-m",
        "trainer",
        *RUN,
        f"teacher.checkpoint={teacher}",
        *overrides,
        f"hydra.run.dir={name}",
    ]
    logs = [runs / f"{name}_agent{i}.log" for i in range(2)]
    agents = [
        subprocess.Popen(command, cwd=runs, env=env(runs), stdout=log.open("w"), stderr=subprocess.STDOUT)
        for log in logs
    ]
    codes = [agent.wait(timeout=300) for agent in agents]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    return runs / name


@pytest.mark.slow  # two-node jobs (two agents, one rank each) in the default tier: tests/slurm/test_slurm_jobs.py
def test_two_agents_over_loopback_equal_one_node_of_four(runs, teacher, hsdp4):
    """HSDP across two "nodes" equals the same run on one node of four."""
    run = two_agents(runs, teacher, "two_nodes", *HSDP_2X2)
    # The same layout over two agents: the same sums in the same order, so the same bits.
    assert assert_same(run, hsdp4, teacher) == 0


@pytest.mark.slow  # two agents over loopback stay in the default tier (the test above)
def test_two_agents_with_the_teacher_sharded_across_nodes(runs, teacher, hsdp4):
    """The teacher FSDP2-sharded over all 4 ranks of both "nodes" (a quarter each) gives the run of the
    replicated teacher."""
    run = two_agents(runs, teacher, "two_nodes_shard", *HSDP_2X2, "teacher.placement=shard")
    assert_same(run, hsdp4, teacher)
    got, want = by_step(run)[STEPS], by_step(hsdp4)[STEPS]
    assert (
        0.2 * want["distill/teacher_param_bytes"]
        <= got["distill/teacher_param_bytes"]
        <= 0.3 * want["distill/teacher_param_bytes"]
    )


def test_ddp_accumulation_with_no_sync_matches_single_process(runs, teacher, reference4):
    torchrun(runs, teacher, 2, "ddp_accum2", "parallel=ddp", "train.grad_accum=2")
    assert_same(runs / "ddp_accum2", reference4, teacher)


@pytest.mark.parametrize("first, then", [("fsdp2", "single"), slow("single", "fsdp2", id="single-fsdp2")])
def test_resume_on_another_world_size_continues_the_curve(runs, teacher, reference2, first, then):
    """Stop at step 5 with one world size, resume from the DCP checkpoint with the other."""
    name = f"resume_{first}_to_{then}"
    launch = {
        "fsdp2": lambda *o: torchrun(runs, teacher, 2, name, "parallel=fsdp", *o),
        "single": lambda *o: single(runs, teacher, name, "train.grad_accum=2", *o),
    }
    launch[first]("train.stop_at_step=5")
    assert max(by_step(runs / name)) == 5 and not (runs / name / "final").exists()
    launch[then]()
    assert_same(runs / name, reference2, teacher)


def test_the_check_fails_a_run_that_really_differs(runs, teacher, reference2):
    """What the bounds let through is reordering, not a different run: a learning rate 1% off (as a wrong
    gradient scale would give) is refused."""
    wrong = single(runs, teacher, "single_accum2_lr", "train.grad_accum=2", "train.lr=0.00101")
    with pytest.raises(AssertionError):
        assert_same(wrong, reference2, teacher)
