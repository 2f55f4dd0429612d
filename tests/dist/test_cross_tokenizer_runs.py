"""A teacher of another tokenizer (``distill.align=span`` and ``uld``) under DDP and FSDP2 on 2 ranks equals one
process of 2 micro-batches (the ranks' slices): the alignment is per row, so each rank aligns its own rows."""

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
