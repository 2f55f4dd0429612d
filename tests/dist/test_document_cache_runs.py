"""A student reading a teacher cache kept by document under DDP and FSDP2 on 2 ranks equals one process of 2
micro-batches (the ranks' slices): each rank looks up its own rows' tokens in the cache. Built by 2 ranks, the cache
is the one one process writes, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import cli_env
from tests.dist.equality import LOSS_KEYS, REASSOCIATION, by_step
from tests.dist.test_fused_runs import launch
from tests.e2e.test_document_cache import RUN, STUDENTS, built, root  # noqa: F401 (the module's fixtures)

pytestmark = pytest.mark.dist
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

STEPS = 3


# slow: the default tier runs two students from one such cache (tests/e2e/test_document_cache.py) and the live
# cross-tokenizer teacher's per-row alignment under DDP (test_cross_tokenizer_runs.py)
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_a_cache_kept_by_document_under_two_ranks_equals_one_process(root, built, layout):  # noqa: F811
    args = [*RUN, *STUDENTS["student_b"], "train.batch_size=4"]
    one, _ = launch(root, 1, f"one_{layout}", [*args, "train.grad_accum=2"])
    two, _ = launch(root, 2, layout, [*args, f"parallel={layout}"])
    got, want = by_step(two), by_step(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in (*LOSS_KEYS, "distill/aligned_fraction", "distill/shared_mass"):
            if key in expected:  # KD of 3e-4 is a sum of terms near 1e-2: float32 rounds each by about 1e-9
                near = pytest.approx(expected[key], rel=REASSOCIATION, abs=1e-8)
                assert got[step][key] == near, (step, key)
    assert all(row["distill/kd"] > 0 and "distill/aligned_fraction" in row for row in want.values())
    assert "eval/val_loss" in want[STEPS]


@pytest.mark.slow  # 2 ranks; one process's build is checked against the live teacher in the default tier
def test_a_cache_built_by_two_ranks_is_the_one_one_process_builds(root, built):  # noqa: F811
    """Each round, the 2 ranks run the teacher over 4 windows each and rank 0 writes all 8: the same files, byte for
    byte, as the one process that wrote the module's cache 4 windows at a time."""
    args = [*(arg for arg in RUN if not arg.startswith("teacher.cache_dir=")), *STUDENTS["student_a"], "parallel=ddp"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "trainer.cache", *args, "teacher.cache_dir=two_ranks", "hydra.run.dir=build_two"]
    proc = subprocess.run(command, cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    one, two = root / "documents_cache", root / "two_ranks"
    names = sorted(path.name for path in one.iterdir())
    assert names == sorted(path.name for path in two.iterdir()) and "values.bin" in names
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
