"""Pipeline pieces that need no process group: the stage split, stage names, per-stage compression, sizes,
config checks."""

from __future__ import annotations

import pytest
import torch

from parallel.mesh import ParallelDims, ParallelDimsError
from parallel.pipeline import rank_stages, stage_blocks
from trainer.compress import build_compressor
from trainer.config import ConfigError, ModifierConfig, ParallelConfig, RunConfig
from trainer.models import build, family
from trainer.preflight import validate

VOCAB, BLOCK = 17, 16


def tiny_gpt(n_layer: int = 4):
    torch.manual_seed(0)
    return build("gpt", vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=32, block_size=BLOCK)


def stages_of(gpt, pp: int, per_rank: int, rank: int) -> list:
    """The stages pipeline rank ``rank`` holds (stage s on rank s % pp), as ``build_pipeline`` makes them."""
    return rank_stages(gpt, family("gpt"), pp * per_rank, pp, rank)[1]


def part_of(gpt, pp: int, per_rank: int, rank: int):
    """Pipeline rank ``rank``'s stages as one module, as ``build_pipeline`` makes it."""
    return rank_stages(gpt, family("gpt"), pp * per_rank, pp, rank)[2]


@pytest.mark.parametrize(
    "n_layer, n_stages, expected",
    [
        (4, 2, [[0, 1], [2, 3]]),
        (5, 3, [[0, 1], [2, 3], [4]]),
        (2, 2, [[0], [1]]),
        (3, 1, [[0, 1, 2]]),
    ],
)
def test_blocks_are_split_evenly_earlier_stages_taking_the_rest(n_layer, n_stages, expected):
    assert [list(r) for r in stage_blocks(n_layer, n_stages)] == expected


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_stages_in_order_compute_the_gpt_bit_for_bit(n_stages):
    gpt = tiny_gpt().eval()
    x = torch.randint(0, VOCAB, (3, BLOCK))
    out = x
    for stage in [s for r in range(n_stages) for s in stages_of(gpt, n_stages, 1, r)]:
        out = stage(out)
    assert torch.equal(out, gpt(x))


@pytest.mark.parametrize("pp, per_rank", [(2, 1), (2, 2), (4, 1)])
def test_rank_parts_name_parameters_as_the_gpt_and_the_last_keeps_the_tie(pp, per_rank):
    gpt = tiny_gpt()
    parts = [part_of(gpt, pp, per_rank, rank) for rank in range(pp)]
    assert set().union(*(part.state_dict() for part in parts)) == set(gpt.state_dict())
    first, last = dict(parts[0].named_parameters()), dict(parts[-1].named_parameters())
    assert "tok_emb.weight" in first and "tok_emb.weight" in last and "head.weight" not in last  # tied: one name
    assert parts[-1].get_submodule("head").weight is last["tok_emb.weight"]
    middle = [name for part in parts[1:-1] for name, _ in part.named_parameters()]
    assert all(name.startswith("blocks.") for name in middle)


def test_a_stage_compressor_masks_its_parameters_as_the_whole_student_does():
    modifiers = [
        ModifierConfig(
            kind="magnitude", targets=["blocks.*", "tok_emb", "pos_emb"], schedule="constant", final_sparsity=0.5
        ),
        ModifierConfig(kind="qat", targets=["blocks.*", "tok_emb", "pos_emb", "head"]),
    ]
    whole = build_compressor(tiny_gpt(), modifiers)
    whole.after_optimizer_step(0)
    for rank in range(2):
        gpt = tiny_gpt()  # every rank builds the same student, then keeps its stages
        part = part_of(gpt, 2, 2, rank)
        compressor = build_compressor(gpt, modifiers).for_part(part)
        compressor.after_optimizer_step(0)
        params = dict(part.named_parameters())
        assert set(compressor.masks) == {name for name in whole.masks if name in params}
        assert all(torch.equal(mask, whole.masks[name]) for name, mask in compressor.masks.items())
        assert compressor.qat.enabled and set(compressor.qat.modules) == {
            name for name in whole.qat.modules if name in dict(part.named_modules())
        }


@pytest.mark.parametrize(
    "replicate, shard, pp, world, expected",
    [
        (1, 1, -1, 4, (1, 1, 4)),
        (1, 2, -1, 4, (1, 2, 2)),
        (1, -1, 2, 4, (1, 2, 2)),
        (2, 1, 2, 4, (2, 1, 2)),
    ],
)
def test_pipeline_sizes_are_inferred(replicate, shard, pp, world, expected):
    dims = ParallelDims(replicate, shard, world, pp=pp)
    assert (dims.dp_replicate, dims.dp_shard, dims.pp) == expected and dims.pp_enabled == (expected[2] > 1)


@pytest.mark.parametrize(
    "replicate, shard, pp, world, field, needle",
    [
        (1, 1, 3, 4, "pp", "dp_replicate=1 x dp_shard=1 x pp=3 = 3 ranks, but the world size is 4"),
        (1, -1, -1, 4, "pp", "only one of dp_shard, pp may be -1"),
        (1, 3, -1, 4, "pp", "divisible by dp_shard=3"),
        (1, 1, 0, 2, "pp", "must be >= 1 or -1"),
    ],
)
def test_bad_pipeline_sizes_name_the_field(replicate, shard, pp, world, field, needle):
    with pytest.raises(ParallelDimsError) as info:
        ParallelDims(replicate, shard, world, pp=pp)
    assert info.value.field == field and needle in str(info.value)


def pipeline_config(**parallel) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name = "synthetic"
    cfg.train.batch_size = 8
    cfg.parallel = ParallelConfig(**({"strategy": "pipeline", "pp": -1, "microbatches": 2} | parallel))
    return cfg


@pytest.mark.parametrize(
    "world, parallel, changes, key",
    [
        (4, {}, {}, "parallel.pp"),  # 4 stages, 2 blocks
        (2, dict(strategy="fsdp"), {}, "parallel.pp"),
        (2, dict(pp_schedule="zero_bubble"), {}, "parallel.pp_schedule"),
        (2, dict(microbatches=1), {}, "parallel.microbatches"),  # 1f1b
        (2, dict(microbatches=3), {}, "train.batch_size"),
        (2, dict(pp_schedule="gpipe", stages_per_rank=2), {"student.n_layer": 4}, "parallel.stages_per_rank"),
        (
            2,
            dict(pp_schedule="interleaved_1f1b", stages_per_rank=2, microbatches=3),
            {"student.n_layer": 4},
            "parallel.microbatches",
        ),
        (2, dict(param_dtype="bf16"), {}, "parallel.param_dtype"),  # no FSDP inside the stages
        (2, {}, {"train.grad_accum": 2}, "train.grad_accum"),
        (2, {}, {"teacher.placement": "shard"}, "teacher.placement"),
    ],
)
def test_pipeline_config_errors_name_the_key(monkeypatch, world, parallel, changes, key):
    for name, value in (("WORLD_SIZE", str(world)), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    cfg = pipeline_config(**parallel)
    for dotted, value in changes.items():
        group, field = dotted.split(".")
        if group == "student":
            cfg.student[field] = value
        else:
            setattr(getattr(cfg, group), field, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key


def test_valid_pipeline_configs_pass(monkeypatch):
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    validate(pipeline_config(pp=2, dp_shard=-1, param_dtype="bf16"))
    validate(pipeline_config(pp=2, dp_replicate=2, pp_schedule="gpipe", microbatches=1))
    cfg = pipeline_config(pp=2, dp_shard=2, pp_schedule="interleaved_1f1b", stages_per_rank=2, microbatches=2)
    cfg.student["n_layer"] = 4
    validate(cfg)
