"""A family written only for the tests (``tests/families/gated_lm.py``: separate q/k/v/o projections with
grouped-query attention, a gated MLP, RMSNorm, an untied head) trains under DDP, FSDP2 and pipeline parallelism
on 2 ranks equal to one process, and is channel-pruned and exported smaller: the model protocol is all the
trainer, ``parallel/`` and compression need of a family.

The runs distill from a small GPT teacher and prune by magnitude (AGP, steps 2-6); no fake-quant, so every
loss term is held to ``tests.dist.equality.REASSOCIATION`` at every step (the sums are the same, reordered).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, read_metrics, slow
from tests.dist import test_parallel_runs
from tests.dist.equality import REASSOCIATION, by_step
from tests.families.gated_lm import NAME

pytestmark = pytest.mark.dist

teacher = test_parallel_runs.teacher  # the same fixture: a small GPT teacher (module scope)

STEPS = 8
GATED = [
    *FAST,
    "distill=kd",
    "teacher=path",
    f"student.arch={NAME}",
    "student.n_head=4",
    "+student.n_kv_head=2",
    "+student.mlp_hidden=48",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=4",
    "train.ckpt_every=4",
]
MAGNITUDE = [
    "compress=prune_agp",
    "compress.modifiers.0.targets=[layers.*]",
    "compress.modifiers.0.start_step=2",
    "compress.modifiers.0.end_step=6",
    "compress.modifiers.0.every=2",
]
CHANNEL = [
    "compress=prune_channel",
    "compress.modifiers.0.targets=[layers.*]",
    "compress.modifiers.0.start_step=2",
    "compress.modifiers.0.end_step=6",
    "compress.modifiers.0.every=2",
]


def launch(root: Path, teacher: Path, nproc: int, name: str, *overrides: str) -> Path:
    """``python -m trainer`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m trainer`` into ``root/name``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [
        sys.executable,
        *torchrun,
        "-m",
        "trainer",
        *GATED,
        f"teacher.checkpoint={teacher}",
        *overrides,
        f"hydra.run.dir={name}",
    ]
    proc = subprocess.run(
        command, cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def reference(runs, teacher) -> Path:
    return launch(runs, teacher, 1, "single", *MAGNITUDE, "train.grad_accum=2")


def assert_same_curve(run: Path, reference: Path) -> None:
    got, want = by_step(run), by_step(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in ("train/loss", "train/ce", "distill/kd", "eval/val_loss"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
        for key in ("compress/sparsity", "compress/nonzero_params", "compress/model_bytes"):
            assert got[step][key] == expected[key], (step, key)
    assert want[STEPS]["compress/sparsity"] == 0.5


@pytest.mark.parametrize(
    "layout",
    [
        slow(["parallel=ddp"], id="ddp"),
        pytest.param(["parallel=fsdp"], id="fsdp"),
        slow(["parallel=pipeline", "parallel.pp=2", "parallel.microbatches=2"], id="pipeline"),
    ],
)
def test_the_test_family_matches_one_process(runs, teacher, reference, layout):
    name = layout[0].split("=")[1]
    launch(runs, teacher, 2, name, *MAGNITUDE, *layout)
    assert_same_curve(runs / name, reference)


@pytest.mark.slow  # channel pruning, thinning and a smaller export in the default tier: tests/unit/test_hf_models.py
def test_the_test_family_is_channel_pruned_and_exported_smaller(runs, teacher):
    """Channel pruning (DDP on 2 ranks, against one process) removes half the key/value groups and MLP units
    of each layer; the export is a smaller dense model of the same family that loads in a fresh process."""
    want = launch(runs, teacher, 1, "channel_single", *CHANNEL, "train.grad_accum=2")
    got = launch(runs, teacher, 2, "channel_ddp", *CHANNEL, "parallel=ddp")
    for a, b in zip(read_metrics(got), read_metrics(want)):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=REASSOCIATION), a["step"]
    config = json.loads((got / "final" / "config.json").read_text())
    assert config["arch"] == NAME
    assert config["config"]["kv_heads_per_layer"] == [1, 1] and config["config"]["mlp_per_layer"] == [24, 24]
    report = {m["model"]: m for m in json.loads((got / "report.json").read_text())["models"]}
    dense, export = report["student (fp32 dense)"], report["student (export)"]
    assert export["params"] < dense["params"] and export["bytes"] < dense["bytes"]
    assert export["val_loss"] == pytest.approx(dense["val_loss"], rel=1e-4)  # the same function, thinned
    code = (
        "import sys; from trainer import export; m = export.load(sys.argv[1]); "
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(got / "final")],
        cwd=runs,
        env=cli_env(runs),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert loaded.stdout.split() == ["GatedLM", str(export["params"])]
