"""ParallelDims (sizes, inference, errors naming the field) and the parallel config checks."""

from __future__ import annotations

import pytest

from parallel.mesh import ParallelDims, ParallelDimsError
from trainer.config import ConfigError, ParallelConfig, RunConfig
from trainer.preflight import validate


@pytest.mark.parametrize(
    "replicate, shard, world, expected",
    [
        (1, 1, 1, (1, 1)),
        (-1, 1, 4, (4, 1)),
        (1, -1, 4, (1, 4)),
        (2, -1, 4, (2, 2)),
        (-1, 2, 8, (4, 2)),
    ],
)
def test_sizes_are_inferred(replicate, shard, world, expected):
    dims = ParallelDims(replicate, shard, world)
    assert (dims.dp_replicate, dims.dp_shard) == expected
    assert dims.dp_size == world


@pytest.mark.parametrize(
    "replicate, shard, world, field, needle",
    [
        (2, 3, 4, "dp_shard", "2 x dp_shard=3 = 6 ranks, but the world size is 4"),
        (3, -1, 4, "dp_shard", "divisible by dp_replicate=3"),
        (-1, -1, 4, "dp_shard", "only one of"),
        (0, 1, 1, "dp_replicate", "must be >= 1 or -1"),
        (2, 1, 1, "dp_replicate", "the world size is 1"),
    ],
)
def test_bad_sizes_name_the_field(replicate, shard, world, field, needle):
    with pytest.raises(ParallelDimsError) as info:
        ParallelDims(replicate, shard, world)
    assert info.value.field == field and needle in str(info.value)


def test_strategy_flags():
    assert ParallelDims(2, 1, 2).ddp_enabled and not ParallelDims(2, 1, 2).fsdp_enabled
    assert ParallelDims(1, 2, 2).fsdp_enabled and not ParallelDims(1, 2, 2).hsdp_enabled
    assert ParallelDims(2, 2, 4).hsdp_enabled and not ParallelDims(2, 2, 4).ddp_enabled
    single = ParallelDims(1, 1, 1)
    assert not (single.ddp_enabled or single.fsdp_enabled) and single.build_mesh("cpu") is None
    assert single.dp_rank(None) == 0


def launched(monkeypatch, world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def config(**parallel) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name = "synthetic"
    cfg.train.batch_size = 8
    cfg.parallel = ParallelConfig(**parallel)
    return cfg


@pytest.mark.parametrize(
    "world, parallel, train, key",
    [
        (2, dict(strategy="single"), {}, "parallel.strategy"),
        (2, dict(strategy="ddp", dp_replicate=-1, dp_shard=2), {}, "parallel.dp_shard"),
        (4, dict(strategy="fsdp", dp_replicate=2, dp_shard=-1), {}, "parallel.dp_replicate"),
        (4, dict(strategy="hsdp", dp_replicate=3, dp_shard=-1), {}, "parallel.dp_shard"),
        (2, dict(strategy="ddp", dp_replicate=-1, param_dtype="bf16"), {}, "parallel.param_dtype"),
        (2, dict(strategy="fsdp", dp_shard=-1, param_dtype="fp16"), {}, "parallel.param_dtype"),
        (2, dict(strategy="fsdp", dp_shard=-1), dict(batch_size=9, grad_accum=3), "train.batch_size"),
        (4, dict(strategy="ddp", dp_replicate=-1), dict(batch_size=6), "train.batch_size"),
    ],
)
def test_parallel_config_errors_name_the_key(monkeypatch, world, parallel, train, key):
    launched(monkeypatch, world)
    cfg = config(**parallel)
    for name, value in train.items():
        setattr(cfg.train, name, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key


def test_valid_parallel_configs_pass(monkeypatch):
    launched(monkeypatch, 4)
    validate(config(strategy="hsdp", dp_replicate=2, dp_shard=-1))
    validate(config(strategy="fsdp", dp_shard=-1, param_dtype="bf16", cpu_offload=True))
    validate(config(strategy="ddp", dp_replicate=-1))
