"""``teacher=ensemble``: an ensemble of one teacher of weight 1 trains the student the plain teacher trains, bit for
bit (both with full logits: an ensemble's loss reads the student's logits whole); an ensemble of two weighted
teachers logs each member's KD term, its KD is their weighted sum, and DDP on 2 ranks equals one process whose 2
micro-batches are the ranks' slices; members sharded or on a teacher rank train what replicated ones train."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST, preflight_in_process, read_metrics, run_cli
from tests.dist import test_parallel_runs
from tests.dist.equality import LOSS_KEYS, REASSOCIATION, by_step
from tests.dist.test_fused_runs import launch

pytestmark = pytest.mark.dist

teacher = test_parallel_runs.teacher  # the same fixture: a small GPT teacher (module scope)
STEPS = 4
RUN = [*FAST, "distill=kd", "distill.fused=false", f"train.max_steps={STEPS}", "logger.log_every=1"]


def ensemble(*members: tuple[Path, float]) -> list[str]:
    listed = ", ".join(f"{{checkpoint: {path}, weight: {weight}}}" for path, weight in members)
    return ["teacher=ensemble", f"teacher.members=[{listed}]"]


def test_an_ensemble_of_one_is_the_plain_teacher(tmp_path, teacher):
    plain, _ = launch(tmp_path, 1, "plain", [*RUN, "teacher=path", f"teacher.checkpoint={teacher}"])
    one, _ = launch(tmp_path, 1, "one", [*RUN, *ensemble((teacher, 1.0))])
    got, want = read_metrics(one), read_metrics(plain)
    assert [row["step"] for row in got] == list(range(1, STEPS + 1))
    for row, expected in zip(got, want, strict=True):
        assert {key: row[key] for key in LOSS_KEYS if key in expected} == {
            key: expected[key] for key in LOSS_KEYS if key in expected
        }
        assert row["distill/kd/member0"] == expected["distill/kd"]


@pytest.mark.slow  # two runs under torchrun; an ensemble's loss in one process is the test above's
def test_a_weighted_ensemble_under_ddp_equals_one_process(tmp_path, teacher):
    """Two members (the same teacher twice, weights 0.25 and 0.75): the KD is their weighted sum; 2 DDP ranks equal
    one process of 2 micro-batches."""
    members = ensemble((teacher, 0.25), (teacher, 0.75))
    one, _ = launch(tmp_path, 1, "one", [*RUN, *members, "train.grad_accum=2"])
    ddp, _ = launch(tmp_path, 2, "ddp", [*RUN, *members, "parallel=ddp"])
    rows = read_metrics(one)
    for row in rows:
        weighted = 0.25 * row["distill/kd/member0"] + 0.75 * row["distill/kd/member1"]
        assert row["distill/kd"] == pytest.approx(weighted, rel=1e-6)
    got, want = by_step(ddp), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/kd/member0", "distill/kd/member1"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)


@pytest.mark.slow  # the sharded teacher equals the replicated one alone in the default tier (test_parallel_runs.py)
def test_an_ensemble_with_a_sharded_member_equals_its_replicated_twin(tmp_path, teacher):
    """A member sharded over the 2 DDP ranks (FSDP2, resharded after each forward) beside a replicated one trains
    what the two replicated members train."""
    members = f"[{{checkpoint: {teacher}, weight: 0.25, placement: shard}}, {{checkpoint: {teacher}, weight: 0.75}}]"
    sharded, _ = launch(tmp_path, 2, "sharded", [*RUN, "teacher=ensemble", f"teacher.members={members}",
                                                  "parallel=ddp"])  # fmt: skip
    replicated, _ = launch(tmp_path, 2, "replicated", [*RUN, *ensemble((teacher, 0.25), (teacher, 0.75)),
                                                        "parallel=ddp"])  # fmt: skip
    got, want = by_step(sharded), by_step(replicated)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/kd/member0", "distill/kd/member1"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    # a rank holds half of the sharded member between forwards: 3/4 of the two replicated members' bytes
    held, whole = (runs[STEPS]["distill/teacher_param_bytes"] for runs in (got, want))
    assert held == pytest.approx(0.75 * whole, rel=0.02)


@pytest.mark.slow  # 3 ranks; the remote protocol of one teacher equals the replicated one in the default tier
# (test_teacher_placement.py)
def test_remote_members_on_a_teacher_rank_equal_their_replicated_twins(tmp_path, teacher):
    """Two remote members of two different teachers (one teacher rank holds both, each request names its member)
    beside a replicated one, on 2 DDP student ranks: the losses and each member's KD are those of the three members
    replicated; the student ranks hold the replicated member's parameters only."""
    run_cli(tmp_path, *FAST, "train.max_steps=5", "student.n_layer=2", "student.n_embd=48", "hydra.run.dir=t2")
    members = ((teacher, 0.25), (teacher, 0.5), (tmp_path / "t2" / "final", 0.25))
    placed = ", ".join(f"{{checkpoint: {path}, weight: {w}, placement: {p}}}"
                       for (path, w), p in zip(members, ("remote", "replicate", "remote"), strict=True))  # fmt: skip
    remote, _ = launch(tmp_path, 3, "remote", [*RUN, "teacher=ensemble", f"teacher.members=[{placed}]",
                                               "parallel=ddp", "parallel.teacher_ranks=1"])  # fmt: skip
    replicated, _ = launch(tmp_path, 2, "replicated", [*RUN, *ensemble(*members), "parallel=ddp"])
    got, want = by_step(remote), by_step(replicated)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/kd/member0", "distill/kd/member1", "distill/kd/member2"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    assert got[STEPS]["distill/kd/member0"] != got[STEPS]["distill/kd/member2"]  # two teachers: a swap would show
    held, whole = (runs[STEPS]["distill/teacher_param_bytes"] for runs in (got, want))
    assert held == pytest.approx(whole / 3, rel=1e-6)


@pytest.mark.parametrize(
    "members, line",
    [
        ("[{checkpoint: TEACHER, weight: -1}]", "config error: teacher.members.0.weight: must be >= 0 (got -1.0)"),
        ("[{checkpoint: TEACHER, weight: 0}]", "config error: teacher.members: the members' weights sum to 0"),
        ("[{checkpoint: TEACHER}, {checkpoint: nowhere}]", "config error: teacher.members.1: teacher.checkpoint: "),
        ("[{weight: 1}]", "config error: teacher.members.0.checkpoint: names the member's teacher: must be set"),
    ],
)
def test_a_bad_ensemble_is_one_line(tmp_path, monkeypatch, teacher, members, line):
    listed = members.replace("TEACHER", str(teacher))
    code, lines = preflight_in_process(tmp_path, monkeypatch, *RUN, "teacher=ensemble", f"teacher.members={listed}")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(line), lines
