"""Mask math: magnitude (layer / global), the global threshold, N:M, channel pruning, thinning."""

import pytest
import torch

from trainer.compress import pruning
from trainer.models import build


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=13, n_layer=2, n_head=4, n_embd=32, block_size=16) | overrides
    return build("gpt", **fields)


def ones(t):
    return torch.ones_like(t, dtype=torch.bool)


def test_magnitude_hand_checked():
    w = torch.tensor([[1.0, 2, 3, 4], [-4, -3, -2, -1]])
    masks = pruning.magnitude_masks({"w": w}, {"w": ones(w)}, sparsity=2 / 8, scope="layer")
    assert (w * masks["w"]).tolist() == [[0, 2, 3, 4], [-4, -3, -2, 0]]


def test_magnitude_keeps_pruned_entries_pruned():
    w = torch.tensor([[5.0, 0.1, 3, 4]])
    mask = torch.tensor([[False, True, True, True]])  # the largest weight was pruned before
    new = pruning.magnitude_masks({"w": w}, {"w": mask}, sparsity=0.5, scope="layer")["w"]
    assert new.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.3, 0.5, 0.97])
def test_global_threshold_is_kth_smallest(sparsity):
    torch.manual_seed(1)
    tensors = [torch.randn(37, 11).abs(), torch.rand(5) * 100, torch.randn(64).abs() * 1e-3]
    flat = torch.cat([t.flatten() for t in tensors])
    k = round(sparsity * flat.numel())
    threshold = pruning.global_threshold(tensors, sparsity)
    if k == 0:
        assert threshold == float("-inf")
    else:
        assert threshold == flat.kthvalue(k).values.item()
    assert sum(int((t <= threshold).sum()) for t in tensors) == k


def test_global_scope_prunes_the_small_layer_and_layer_scope_prunes_equally():
    torch.manual_seed(2)
    weights = {"big": torch.randn(16, 16) * 10, "small": torch.randn(16, 16) * 0.01}
    masks = {n: ones(w) for n, w in weights.items()}
    global_ = pruning.magnitude_masks(weights, masks, sparsity=0.5, scope="global")
    layer = pruning.magnitude_masks(weights, masks, sparsity=0.5, scope="layer")
    pruned = {n: int((~m).sum()) for n, m in global_.items()}
    assert pruned["big"] + pruned["small"] == 256
    assert pruned["small"] > 0.9 * 256
    assert [int((~m).sum()) for m in layer.values()] == [128, 128]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (4, 4)])
def test_nm_mask_has_exactly_n_per_group(n, m):
    torch.manual_seed(3)
    w = torch.randn(12, 32)
    mask = pruning.nm_mask(w, ones(w), n, m)
    per_group = mask.reshape(12, 32 // m, m).sum(-1)
    assert (per_group == n).all()
    kept_min = (w.abs() * mask).reshape(12, -1, m).masked_fill(~mask.reshape(12, -1, m), float("inf")).amin(-1)
    dropped_max = (w.abs() * ~mask).reshape(12, -1, m).amax(-1)
    assert (kept_min >= dropped_max).all()  # the n largest |w| are the ones kept


def channel_masks_for(model, sparsity, norm=1):
    groups = pruning.unit_groups(model)
    params = dict(model.named_parameters())
    masks = {n: ones(params[n]) for g in groups for n in g.param_names}
    for group in groups:
        masks.update(pruning.channel_masks(group, params, masks, sparsity, norm))
    return groups, masks


def apply(model, masks):
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).masked_fill_(~mask, 0.0)


@pytest.mark.parametrize("norm", [1, 2])
def test_channel_pruning_removes_whole_units_and_heads(norm):
    model = tiny_gpt()
    groups, masks = channel_masks_for(model, sparsity=0.5, norm=norm)
    for i in range(2):
        fc, proj = masks[f"blocks.{i}.mlp.fc.weight"], masks[f"blocks.{i}.mlp.proj.weight"]
        rows = fc.all(1)
        assert (rows | ~fc.any(1)).all()  # each unit's row is all kept or all removed
        assert (proj.all(0) == rows).all() and (proj.any(0) == rows).all()  # matching columns
        assert int((~rows).sum()) == 64  # half of 128 units
        qkv = masks[f"blocks.{i}.attn.qkv.weight"].reshape(3, 4, 8, 32)
        heads = qkv[0].flatten(1).all(1)
        for part in range(3):
            assert (qkv[part].flatten(1).all(1) == heads).all() and (qkv[part].flatten(1).any(1) == heads).all()
        attn_proj = masks[f"blocks.{i}.attn.proj.weight"].reshape(32, 4, 8)
        assert (attn_proj.all(0).all(1) == heads).all() and (attn_proj.any(0).any(1) == heads).all()
        assert int((~heads).sum()) == 2


def test_channel_pruning_ranks_by_norm():
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks["0"].mlp.fc.weight[5].mul_(1e-3)  # unit 5 is the weakest
        model.blocks["0"].mlp.proj.weight[:, 5].mul_(1e-3)
    group = pruning.unit_groups(model, {"blocks.0.mlp.fc"})[0]
    params = dict(model.named_parameters())
    masks = {n: ones(params[n]) for n in group.param_names}
    new = pruning.channel_masks(group, params, masks, sparsity=1 / 128, norm=2)
    assert (~new["blocks.0.mlp.fc.weight"].all(1)).nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("bias", [False, True])
def test_thin_matches_masked_model_with_fewer_parameters(bias):
    model = tiny_gpt(bias=bias)
    _, masks = channel_masks_for(model, sparsity=0.5)
    w = model.get_parameter("blocks.1.mlp.fc.weight")  # plus unstructured pruning on top
    masks["blocks.1.mlp.fc.weight"] &= pruning.magnitude_masks(
        {"w": w}, {"w": masks["blocks.1.mlp.fc.weight"]}, 0.7, "layer"
    )["w"]
    apply(model, masks)
    small, small_masks = pruning.thin(model, masks)
    assert small.cfg.mlp_hidden == [64, 64] and small.cfg.n_heads_per_layer == [2, 2]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert list(small_masks) == ["blocks.1.mlp.fc.weight"]  # structured masks are gone
    assert small_masks["blocks.1.mlp.fc.weight"].shape == (64, 32)
    assert (small.get_parameter("blocks.1.mlp.fc.weight")[~small_masks["blocks.1.mlp.fc.weight"]] == 0).all()
    x = torch.randint(0, 13, (3, 16))
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


def test_thin_keeps_one_zero_head_when_all_heads_are_dead():
    model = tiny_gpt()
    masks = {"blocks.0.attn.qkv.weight": ones(model.blocks["0"].attn.qkv.weight)}
    masks["blocks.0.attn.qkv.weight"][64:] = False  # every v row of layer 0
    apply(model, masks)
    small, _ = pruning.thin(model, masks)
    assert small.cfg.n_heads_per_layer == [1, 4]
    x = torch.randint(0, 13, (2, 16))
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


def test_thresholds_of_several_groups_in_lock_step_equal_each_alone():
    torch.manual_seed(3)
    groups = [[torch.randn(20, 7).abs()], [torch.rand(50), torch.randn(3, 3).abs()], [torch.zeros(4)]]
    together = pruning.kth_thresholds(groups, 0.4)
    assert together == [pruning.global_threshold(group, 0.4) for group in groups]
