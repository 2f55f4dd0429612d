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


# uld under FSDP2 repeats the per-row alignment of span under DDP (the default tier's case) with another loss and layout
@pytest.mark.parametrize("align, layout", [("span", "ddp"), slow("uld", "fsdp", id="uld-fsdp")])
def test_a_teacher_of_another_tokenizer_under_two_ranks_equals_one_process(root, align, layout):  # noqa: F811
    args = [*RUN, f"distill.align={align}", "train.batch_size=4"]
    one, _ = launch(root, 1, f"one_{align}", [*args, "train.grad_accum=2"])
    two, _ = launch(root, 2, f"{layout}_{align}", [*args, f"parallel={layout}"])
    got, want = by_step(two), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/aligned_fraction", "distill/shared_mass"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    assert all(row["distill/kd"] > 0 for row in read_metrics(one))
