"""Teacher placements on 2 ranks (torchrun, gloo): ``shard`` equals ``replicate`` with half the teacher per rank,
``python -m trainer.cache`` on 2 ranks writes the same cache as one process, in 2 shards, and a cache row garbled
on one rank stops every rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics, slow, train_small_teacher

pytestmark = pytest.mark.dist

STEPS = 6
RUN = [
    *FAST,
    "distill=kd",
    "teacher=path",
    "teacher.checkpoint=t/final",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=3",
    "distill.temperature=2.0",
]
EXACT = 1e-5


def env(tmp_path: Path) -> dict:
    return cli_env(tmp_path) | {"OMP_NUM_THREADS": "1"}


def launch(
    root: Path, nproc: int, module: str, name: str, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m module`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m module`` into ``root/name``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *torchrun, "-m", module, *RUN, *overrides, f"hydra.run.dir={name}"]
    proc = subprocess.run(command, cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr[-5000:]
    return proc


def by_step(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with a small teacher (``t/final``) trained by the CLI."""
    root = tmp_path_factory.mktemp("placement")
    train_small_teacher(root)
    return root


@pytest.fixture(scope="module")
def replicate(root) -> Path:
    launch(root, 2, "trainer", "replicate", "parallel=fsdp")
    return root / "replicate"


@pytest.mark.parametrize("student", ["fsdp", slow("ddp", id="ddp")])
def test_sharded_teacher_equals_replicated_with_half_the_bytes(root, replicate, student):
    launch(root, 2, "trainer", f"shard_{student}", f"parallel={student}", "teacher.placement=shard")
    got, want = by_step(root / f"shard_{student}"), by_step(replicate)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in ("train/loss", "distill/kd", "eval/val_loss"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=EXACT), (step, key)
    whole, held = want[STEPS]["distill/teacher_param_bytes"], got[STEPS]["distill/teacher_param_bytes"]
    print(f"teacher parameter bytes on rank 0: replicate {whole:.0f}, shard ({student} student) {held:.0f}")
    assert 0.45 * whole <= held <= 0.55 * whole


@pytest.mark.slow  # the sharded teacher in bf16: its fp32 equality is the test above
def test_bf16_sharded_teacher_is_close(root, replicate):
    launch(root, 2, "trainer", "shard_bf16", "parallel=fsdp", "teacher.placement=shard", "teacher.param_dtype=bf16")
    got, want = by_step(root / "shard_bf16"), by_step(replicate)
    for step, expected in want.items():
        assert got[step]["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-2), step
        assert got[step]["distill/kd"] == pytest.approx(expected["distill/kd"], rel=0.1, abs=2e-3), step


@pytest.mark.slow  # a cache built by one process equals the live teacher in the default tier (test_teacher_cache.py)
def test_two_rank_cache_build_equals_one_process(root):
    launch(root, 1, "trainer.cache", "cache1", "distill.top_k=8", "teacher.cache_dir=one")
    launch(root, 2, "trainer.cache", "cache2", "distill.top_k=8", "teacher.cache_dir=two", "parallel=ddp")
    one, two = (json.loads((root / name / "manifest.json").read_text()) for name in ("one", "two"))
    assert one["shards"] == [[0, STEPS]] and two["shards"] == [[0, STEPS // 2], [STEPS // 2, STEPS]]
    assert one["key"] == two["key"]
    for name in ("values.bin", "indices.bin", "lse.bin", "checksums.bin"):
        whole = (root / "one" / "shard_00000" / name).read_bytes()
        halves = b"".join((root / "two" / f"shard_{i:05d}" / name).read_bytes() for i in range(2))
        assert halves == whole, name


@pytest.mark.slow  # a garbled row stops one process with one line in the default tier (test_teacher_cache.py)
def test_a_row_garbled_on_one_rank_stops_every_rank(root):
    """FSDP over 2 ranks, 2 micro-batches: rank 1 reads rows 6-7 of step 2 in its second micro-batch, and row 7 is
    garbled. Both ranks stop at that read (before the student's all-gathers), rank 0 prints rank 1's line. Without
    the ranks agreeing on the failure, rank 0 waits in an all-gather for good (seen: the 300 s timeout)."""
    launch(root, 1, "trainer.cache", "cache_garbled", "distill.top_k=8", "teacher.cache_dir=garbled")
    values = root / "garbled" / "shard_00000" / "values.bin"
    data = bytearray(values.read_bytes())
    data[((2 * 8 + 7) * 16 * 8) * 4] ^= 1  # [steps, batch 8, positions 16, k 8] fp32: step 2, row 7
    values.write_bytes(bytes(data))
    cached = ["distill.top_k=8", "teacher.placement=cache", "teacher.cache_dir=garbled", "train.grad_accum=2"]
    proc = launch(root, 2, "trainer", "run_garbled", "parallel=fsdp", *cached, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [
        f"error: {values} is garbled at step 2, row 7 (its CRC32 differs from the one written); rebuild it with "
        "python -m trainer.cache and this run's overrides (it rewrites the garbled steps)"
    ], proc.stderr[-5000:]
    assert "exitcode  : 1" in proc.stderr  # torchrun's summary: a worker exited 1 (torchrun then ends the others)


@pytest.mark.parametrize("teacher_ranks", [1, slow(2, id="2")])
def test_remote_teacher_ranks_equal_the_replicated_teacher(root, replicate, teacher_ranks):
    """2 student ranks (DDP) + ``teacher_ranks`` dedicated teacher ranks: the same KD loss at every step, and the
    same top-1 agreement and teacher entropy at evals, as the teacher replicated on the 2 student ranks."""
    name = f"remote_{teacher_ranks}"
    launch(
        root,
        2 + teacher_ranks,
        "trainer",
        name,
        "parallel=ddp",
        "teacher.placement=remote",
        f"parallel.teacher_ranks={teacher_ranks}",
    )
    got, want = by_step(root / name), by_step(replicate)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in ("train/loss", "distill/kd", "eval/val_loss", "distill/agreement", "distill/teacher_entropy"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=EXACT), (step, key)
    assert 0 < want[STEPS]["distill/agreement"] <= 1 and want[STEPS]["distill/teacher_entropy"] > 0
    assert got[STEPS]["distill/teacher_param_bytes"] == 0  # the student ranks hold no teacher
    assert all(f"memory/rank{r}/params_bytes" in got[STEPS] for r in range(2))
    assert "memory/rank2/params_bytes" not in got[STEPS]  # teacher ranks are not among the trainer's ranks


@pytest.mark.slow  # the remote protocol runs in the default tier (the test above); the compact rows' KD against
# the exact top-k too (tests/unit/test_compact_cache.py)
def test_a_compact_wire_sends_the_top_k_with_its_tail_as_the_compact_cache_stores_it(root):
    """``teacher.wire=compact`` (top-8 with the tail, 6-bit codes and Elias-Fano ids) on 2 student ranks and a teacher
    rank: the KD loss is the replicated live teacher's with the same top-8 within the codes' rounding (the compact
    cache's allowance), the evals (full logits still) equal, and the teacher rank says what a token cost on the
    wire: 20 bytes (a 6-byte header and 6 bytes of codes, 4 id bytes, the tail's 4) against fp32 logits' 128."""
    top8 = ["distill.top_k=8", "distill.top_k_tail=true", "parallel=ddp"]
    launch(root, 2, "trainer", "replicate_top8", *top8)
    proc = launch(root, 3, "trainer", "remote_compact", *top8, "teacher.placement=remote", "parallel.teacher_ranks=1",
                  "teacher.wire=compact")  # fmt: skip
    got, want = by_step(root / "remote_compact"), by_step(root / "replicate_top8")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        assert got[step]["distill/kd"] == pytest.approx(expected["distill/kd"], rel=1e-2), step
        for key in ("eval/val_loss", "distill/agreement"):
            if key in expected:  # evals: the same student up to the KD's rounding, full teacher logits
                assert got[step][key] == pytest.approx(expected[key], rel=1e-2), (step, key)
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("teacher rank 2: served")]
    assert "compact: 20.0 bytes a token" in line and "logits: 128.0 bytes a token" in line, line


@pytest.mark.slow  # 3 ranks; the sharded teacher on 2 equals the replicated one in the default tier
def test_teacher_sharded_over_three_ranks_with_uneven_rows_equals_replicated(root):
    """A dense export is loaded straight into its shards (each rank reads its own rows of the file); over 3 ranks
    the 32-row embedding splits 11/11/10, and the run equals the replicated teacher's on the same 3 ranks."""
    three = ["parallel=ddp", "train.batch_size=6"]
    launch(root, 3, "trainer", "replicate_3", *three)
    launch(root, 3, "trainer", "shard_3", *three, "teacher.placement=shard")
    got, want = by_step(root / "shard_3"), by_step(root / "replicate_3")
    for step, expected in want.items():
        for key in ("train/loss", "distill/kd", "eval/val_loss"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=EXACT), (step, key)
    whole, held = want[STEPS]["distill/teacher_param_bytes"], got[STEPS]["distill/teacher_param_bytes"]
    assert held <= (1 / 3 + 0.05) * whole
