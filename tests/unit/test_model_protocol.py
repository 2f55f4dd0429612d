"""The model protocol on two unlike families (Stillroom's GPT and the test-only gated family): pipeline stages
cut by deletion compute the model, unit groups find every head and channel, thinning keeps the function."""

from __future__ import annotations

import pytest
import torch

from parallel.pipeline import rank_stages
from tests.families.gated_lm import NAME as GATED
from trainer import models
from trainer.compress import pruning
from trainer.models.protocol import FINAL_HIDDEN, family_of

VOCAB, BLOCK = 19, 12
BUILDERS = {
    "gpt": lambda: models.build("gpt", vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=32, block_size=BLOCK),
    "gated": lambda: models.build(
        GATED, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=48, block_size=BLOCK
    ),
}


@pytest.fixture(params=list(BUILDERS))
def model(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]().eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pp, per_rank", [(2, 1), (4, 1), (2, 2)])
def test_stages_in_order_compute_the_model_bit_for_bit(model, pp, per_rank):
    spec, x = family_of(model), tokens()
    n_stages = pp * per_rank
    stages = {
        index: stage for rank in range(pp) for index, stage in zip(*rank_stages(model, spec, n_stages, pp, rank)[:2])
    }
    out = x
    for index in range(n_stages):
        out = stages[index](out)
    assert torch.equal(out, model(x))  # the same modules and ops in the same order


def test_a_stage_shares_the_models_modules_and_leaves_it_whole(model):
    spec = family_of(model)
    names = set(dict(model.named_parameters()))
    _, (first,), _ = rank_stages(model, spec, 2, 2, 0)
    assert set(dict(model.named_parameters())) == names  # deleting from a stage leaves the model as it was
    shared = dict(first.named_parameters())
    assert shared and all(param is model.get_parameter(name) for name, param in shared.items())


def test_hidden_states_and_the_final_hidden_state(model):
    spec, x = family_of(model), tokens()
    logits, hidden = model(x, hidden_layers=(0, 2, FINAL_HIDDEN))
    assert sorted(hidden) == [FINAL_HIDDEN, 0, 2]
    assert all(h.shape == (3, BLOCK, spec.width(model)) for h in hidden.values())
    head = model.head if hasattr(model, "head") else model.lm_head
    assert torch.allclose(head(hidden[FINAL_HIDDEN]), logits, rtol=0, atol=1e-6)  # the same matmul, reshaped


def test_unit_groups_cover_every_head_and_channel(model):
    groups = family_of(model).unit_groups(model)
    assert {(g.kind, g.layer) for g in groups} == {(k, i) for k in ("attn", "mlp") for i in range(4)}
    for group in groups:
        for name in group.param_names:
            param = model.get_parameter(name)
            ones = torch.ones_like(param, dtype=torch.bool)
            # Every entry the group claims belongs to exactly one unit, and every unit has entries.
            per_unit = group.per_unit(name, ones.float())
            assert float(per_unit.sum()) == param.numel()
            assert bool((per_unit > 0).all())


def test_thinning_dead_units_keeps_the_function(model):
    spec, x = family_of(model), tokens()
    masks = {}
    for group in spec.unit_groups(model):
        keep = torch.ones(group.n_units, dtype=torch.bool)
        keep[0] = False  # one head (or key/value group) and one MLP unit per layer removed
        for name in group.param_names:
            param = model.get_parameter(name)
            masks[name] = group.expand(name, keep, param.shape)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    small, left = pruning.thin(model, masks)
    assert left == {}  # the structured masks are gone with the units
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(small.eval()(x), model(x), rtol=0, atol=1e-5)
    assert family_of(small) is spec
