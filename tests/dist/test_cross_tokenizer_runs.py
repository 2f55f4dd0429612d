"""A teacher of another tokenizer (``distill.align=span`` and ``uld``) under DDP and FSDP2 on 2 ranks equals one
process of 2 micro-batches (the ranks' slices): the alignment is per row, so each rank aligns its own rows. So does
such a teacher sharded over the 2 ranks, or on a teacher rank of its own (the student ranks align and send it the
text in its tokens)."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, slow
from tests.dist.equality import LOSS_KEYS, REASSOCIATION, by_step
from tests.dist.test_fused_runs import launch
from tests.e2e.test_cross_tokenizer import RUN, root  # noqa: F401 (the module's fixture: teacher, student, corpus)

pytestmark = pytest.mark.dist
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

STEPS = 3


ON_POLICY = ["distill=on_policy", "distill.prompt_tokens=4", "distill.max_new_tokens=8"]


# uld under FSDP2 repeats the per-row alignment of span under DDP (the default tier's case) with another loss and
# layout; on-policy, the same with the student's own completions (each rank writes its rows', as one process does)
@pytest.mark.parametrize(
    "align, layout, extra",
    [("span", "ddp", []), slow("uld", "fsdp", [], id="uld-fsdp"), slow("span", "ddp", ON_POLICY, id="on-policy")],
)
def test_a_teacher_of_another_tokenizer_under_two_ranks_equals_one_process(root, align, layout, extra):  # noqa: F811
    args = [*RUN, f"distill.align={align}", "train.batch_size=4", *extra]
    name = f"{align}{'_on_policy' if extra else ''}"
    one, _ = launch(root, 1, f"one_{name}", [*args, "train.grad_accum=2"])
    two, _ = launch(root, 2, f"{layout}_{name}", [*args, f"parallel={layout}"])
    got, want = by_step(two), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/aligned_fraction", "distill/shared_mass", "distill/teacher_logprob"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    assert all(row["distill/kd"] > 0 for row in read_metrics(one))


@pytest.mark.slow  # 2 and 3 ranks; the replicated teacher's equality is the default tier's case above
@pytest.mark.parametrize("placement, nproc", [("shard", 2), ("remote", 3)])
def test_a_sharded_or_remote_teacher_of_another_tokenizer_equals_one_process(root, placement, nproc):  # noqa: F811
    args = [*RUN, "distill.align=span", "train.batch_size=4"]
    one, _ = launch(root, 1, f"one_for_{placement}", [*args, "train.grad_accum=2"])
    ranks = ["parallel.teacher_ranks=1"] if placement == "remote" else []
    placed, said = launch(root, nproc, f"{placement}_span", [*args, "parallel=ddp", f"teacher.placement={placement}",
                                                              *ranks])  # fmt: skip
    got, want = by_step(placed), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/aligned_fraction", "distill/shared_mass"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    held, whole = (runs[STEPS]["distill/teacher_param_bytes"] for runs in (got, want))
    # a rank holds half of the sharded teacher (its 420-row embedding splits evenly), none of a remote one
    assert held == (pytest.approx(whole / 2, rel=0.02) if placement == "shard" else 0)
    if placement == "remote":  # one request a micro-batch and rank: each requested ahead was the one asked for
        assert f"teacher rank 2: served {2 * STEPS} requests of ranks [0, 1]" in said, said[-3000:]


@pytest.mark.slow  # 3 ranks; remote members of the student's tokenizer: tests/dist/test_ensemble_runs.py
def test_an_ensemble_with_a_remote_member_of_another_tokenizer_equals_one_process(root):  # noqa: F811
    """The member of another tokenizer on a teacher rank, one of the student's replicated: 2 DDP ranks equal one
    process whose members are both replicated."""
    run = [arg for arg in RUN if not arg.startswith("teacher")] + ["train.batch_size=4", "teacher=ensemble"]
    members = "[{checkpoint: teacher, weight: 0.4, placement: PLACEMENT}, {checkpoint: teacher300, weight: 0.6}]"
    one, _ = launch(root, 1, "one_ensemble", [*run, f"teacher.members={members.replace('PLACEMENT', 'replicate')}",
                                              "train.grad_accum=2"])  # fmt: skip
    placed, _ = launch(root, 3, "remote_ensemble", [*run, f"teacher.members={members.replace('PLACEMENT', 'remote')}",
                                                    "parallel=ddp", "parallel.teacher_ranks=1"])  # fmt: skip
    got, want = by_step(placed), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        assert {"distill/kd/member0", "distill/kd/member1", "distill/aligned_fraction/member0"} <= set(expected)
        for key in (*LOSS_KEYS, "distill/kd/member0", "distill/kd/member1", "distill/aligned_fraction/member0"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
