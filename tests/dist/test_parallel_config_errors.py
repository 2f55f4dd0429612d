"""Bad parallel inputs stop every rank before a process group exists: one line naming the key, exit code 2.

The checks read the world size from the launcher's environment, so each case runs the CLI's preflight in this
process with torchrun's variables set (``preflight_in_process``), two of them also as ``python -m trainer``
processes; one case goes through torchrun itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, cli_env, preflight_in_process, slow

pytestmark = pytest.mark.dist

CASES = {
    "sizes do not multiply to the world": (
        4,
        ["parallel=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=3"],
        "parallel.dp_shard: dp_replicate=2 x dp_shard=3 = 6 ranks, but the world size is 4",
    ),
    "world not divisible for -1": (4, ["parallel=hsdp", "parallel.dp_replicate=3"], "parallel.dp_shard: -1 (infer)"),
    "both inferred": (2, ["parallel=hsdp", "parallel.dp_replicate=-1"], "parallel.dp_shard: only one of"),
    "single on two ranks": (2, ["parallel=single"], "parallel.strategy: single runs one process"),
    "ddp that shards": (2, ["parallel=ddp", "parallel.dp_shard=2"], "parallel.dp_shard: must be 1"),
    "fsdp that replicates": (4, ["parallel=fsdp", "parallel.dp_replicate=2"], "parallel.dp_replicate: must be 1"),
    "batch not divisible": (
        2,
        ["parallel=fsdp", "train.batch_size=6", "train.grad_accum=2"],
        "train.batch_size: 6 is not divisible by data-parallel size 2 x train.grad_accum=2",
    ),
    "unknown param dtype": (2, ["parallel=fsdp", "parallel.param_dtype=fp16"], "parallel.param_dtype: must be one of"),
    "bf16 params under ddp": (2, ["parallel=ddp", "parallel.param_dtype=bf16"], "parallel.param_dtype: applies to"),
    "channel pruning on shards": (2, ["parallel=fsdp", "compress=prune_channel"], "compress.modifiers.0.kind: channel"),
    "nccl without a gpu": (2, ["parallel=ddp", "parallel.backend=nccl"], "parallel.backend: nccl needs a CUDA GPU"),
    "pipeline sizes do not multiply": (
        4,
        ["parallel=pipeline", "parallel.pp=3"],
        "parallel.pp: dp_replicate=1 x dp_shard=1 x pp=3 = 3 ranks, but the world size is 4",
    ),
    "more stages than blocks": (4, ["parallel=pipeline"], "parallel.pp: 4 pipeline stages for 2 blocks"),
    "pp outside the pipeline strategy": (2, ["parallel=ddp", "parallel.pp=2"], "parallel.pp: applies to"),
    "1f1b with fewer micro-batches than stages": (
        2,
        ["parallel=pipeline", "parallel.microbatches=1"],
        "parallel.microbatches: 1f1b needs at least as many",
    ),
    "pipeline batch not divisible": (
        4,
        ["parallel=pipeline", "parallel.pp=2", "parallel.dp_shard=2", "train.batch_size=12"],
        "train.batch_size: 12 is not divisible by data-parallel size 2 x parallel.microbatches=4",
    ),
    "accumulation under a pipeline": (2, ["parallel=pipeline", "train.grad_accum=2"], "train.grad_accum: must be 1"),
    "feature distillation across stages": (
        2,
        ["parallel=pipeline", "distill=kd_features"],
        "distill.features: feature distillation is not supported",
    ),
    "global pruning across stages": (
        2,
        ["parallel=pipeline", "compress=prune_agp", "compress.modifiers.0.scope=global"],
        "compress.modifiers.0.scope: global magnitude pruning",
    ),
    "teacher ranks fill the world": (
        2,
        ["parallel=ddp", "distill=kd", "teacher.placement=remote", "parallel.teacher_ranks=2"],
        "parallel.teacher_ranks: 2 teacher ranks leave no student rank in a world of 2",
    ),
    "teacher ranks without remote": (
        2,
        ["parallel=ddp", "distill=kd", "parallel.teacher_ranks=1"],
        "parallel.teacher_ranks: applies to teacher.placement=remote or remote ensemble members only",
    ),
    "remote without teacher ranks": (
        2,
        ["parallel=ddp", "distill=kd", "teacher.placement=remote"],
        "parallel.teacher_ranks: teacher.placement=remote needs at least one teacher rank",
    ),
    "pairwise accumulation on two ranks": (
        2,
        ["parallel=ddp", "train.accum_order=pairwise", "train.grad_accum=2"],
        "train.accum_order: pairwise applies to one process",
    ),
    "compact wire without a top-k": (
        3,
        ["parallel=ddp", "distill=kd", "teacher.placement=remote", "parallel.teacher_ranks=1", "teacher.wire=compact"],
        "teacher.wire: compact sends the teacher's top distill.top_k logits with their tail: set distill.top_k",
    ),
    "compact wire without remote": (2, ["parallel=ddp", "distill=kd", "teacher.wire=compact"], "teacher.wire: applies"),
    "on-policy distillation through a pipeline": (
        2,
        ["parallel=pipeline", "distill=on_policy", "distill.prompt_tokens=4", "distill.max_new_tokens=4"],
        "parallel.strategy: on-policy distillation (distill.lmbda > 0) is not supported with pipeline parallelism",
    ),
    "interleaved with one stage per rank": (
        2,
        ["parallel=pipeline", "parallel.pp_schedule=interleaved_1f1b"],
        "parallel.stages_per_rank: must be >= 2",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_parallel_input_is_one_line_exit_2(tmp_path, monkeypatch, name):
    world, overrides, expected = CASES[name]
    if "nccl" in name and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    launcher = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}
    code, lines = preflight_in_process(tmp_path, monkeypatch, *FAST, *overrides, launcher=launcher)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {expected}"), lines
    assert not list(tmp_path.glob("outputs/*")), "nothing may be written before the config is valid"


def test_a_run_that_writes_its_own_cache_first_under_torchrun_is_one_line(tmp_path, monkeypatch):
    """Every rank would start ``python -m trainer.cache``: the cache is written first, by torchrun ... -m
    trainer.cache (whose ranks share the work). The teacher is one its recipe trains later (checked once it exists)."""
    from trainer.cli.train import check_run

    overrides = ["parallel=ddp", "distill=kd", "distill.top_k=4", "teacher=shakespeare_cpu",
                 "teacher.checkpoint=t/final", "teacher.placement=cache", "teacher.cache_dir=c",
                 "teacher.cache_build=true"]  # fmt: skip
    launcher = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    code, lines = preflight_in_process(tmp_path, monkeypatch, *FAST, *overrides, launcher=launcher, check=check_run)
    assert code == 2 and lines == ["config error: teacher.cache_build: builds the cache in one process: write it first "
                                   "with torchrun ... -m trainer.cache (the same overrides)"], lines  # fmt: skip


@pytest.mark.parametrize("name", ["sizes do not multiply to the world", "teacher ranks fill the world"])
def test_as_a_process_too(tmp_path, name):
    """The way from ``python -m trainer``'s entry to the line, with torchrun's variables in its environment."""
    world, overrides, expected = CASES[name]
    env = cli_env(tmp_path) | {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *FAST, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {expected}"), proc.stderr
    assert not list(tmp_path.glob("outputs/*")), "nothing may be written before the config is valid"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(
            ["parallel=fsdp", "train.batch_size=5"],
            "train.batch_size: 5 is not divisible by data-parallel size 2 x train.grad_accum=1",
            id="batch",
        ),
        slow(["parallel=fsdp", "parallel.dp_shard=3"], "parallel.dp_shard: ", id="dp_shard"),
        slow(
            ["parallel=pipeline", "parallel.pp=2", "parallel.microbatches=2", "student.n_layer=1"],
            "parallel.pp: 2 pipeline",
            id="pipeline",
        ),
    ],
)
def test_under_torchrun_the_ranks_exit_2_and_rank_0_prints_the_line(tmp_path, overrides, expected):
    """Rank 0 alone prints the line; every rank exits 2 and writes the line to the error file torchrun reads, so
    torchrun's failure summary names the cause (under its own traceback, which torchrun prints and exits 1 after:
    script against the line, or against ``exitcode  : 2`` in that summary)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer",
        *FAST,
        *overrides,
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"config error: {expected}"), proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("Root Cause") :]
    assert "exitcode  : 2" in summary and "error_file: " in summary, summary
    assert f"config error: {expected}" in summary, summary  # the cause, from the error file
