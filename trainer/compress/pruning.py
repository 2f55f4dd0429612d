"""Mask math for pruning (unstructured magnitude, N:M, structured units) and thinning.

Masks are bool tensors shaped like their parameter (True = kept). The pruning functions take
the current masks and return subsets of them, so nothing pruned comes back. Their math is
elementwise or uses small reductions (per row, per unit, counts). Magnitude and N:M pruning run on
FSDP2 shards (DTensors): elementwise ops stay local and thresholds all-reduce counts. Channel
pruning and ``thin`` need full tensors. The pruning kinds that use them are in ``trainer.compress.modifiers``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from trainer.compress import qat
from trainer.models.protocol import UnitGroup, family_of

FLOAT32_INF_BITS = 0x7F800000


def _float32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the parameter); a tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sum_over_shards(counts: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum per-rank ``counts`` over the mesh axes that ``tensors`` (all placed alike) are sharded on."""
    layouts = {(t.device_mesh, t.placements) for t in tensors if isinstance(t, DTensor)}
    if not layouts:
        return counts
    assert len(layouts) == 1 and all(isinstance(t, DTensor) for t in tensors), (
        "pruning thresholds need all tensors sharded alike (one FSDP mesh)"
    )
    ((mesh, placements),) = layouts
    reduced = counts.to(mesh.device_type)  # CPU-offloaded shards on a GPU mesh reduce on the GPU
    for axis, placement in enumerate(placements):
        if placement.is_shard():
            dist.all_reduce(reduced, group=mesh.get_group(axis))
    return reduced.to(counts.device)


def kth_thresholds(groups: list[list[torch.Tensor]], sparsity: float) -> list[float]:
    """For each group of non-negative score tensors, its k-th smallest value, k = round(sparsity * numel).

    Pruning every entry ``<= threshold`` removes k entries of the group (more only on ties). Found
    by bisection over float32 bit patterns (at most 31 rounds; non-negative floats order like their
    bits), all groups in lock-step, each round needing one count per group: for DTensor shards, one
    all-reduce of that count vector over the shard axes, so no weight leaves its rank. A group's
    threshold is -inf when its k is 0.
    """
    flat = [t for group in groups for t in group]
    shards = [[local(t) for t in group] for group in groups]
    ks = [round(sparsity * sum(t.numel() for t in group)) for group in groups]  # DTensor numel is global
    below = [-1] * len(groups)  # count(<= below) < k <= count(<= at_or_above)
    at_or_above = [FLOAT32_INF_BITS] * len(groups)
    while any(k > 0 and hi - lo > 1 for k, lo, hi in zip(ks, below, at_or_above)):
        mids = [(lo + hi) // 2 for lo, hi in zip(below, at_or_above)]
        local_counts = [
            sum(int((t <= _float32_from_bits(mid)).sum()) for t in group) for group, mid in zip(shards, mids)
        ]
        counts = sum_over_shards(torch.tensor(local_counts, dtype=torch.int64), flat).tolist()
        for i, (k, mid, count) in enumerate(zip(ks, mids, counts)):
            if k > 0 and at_or_above[i] - below[i] > 1:
                if count >= k:
                    at_or_above[i] = mid
                else:
                    below[i] = mid
    return [_float32_from_bits(hi) if k > 0 else -math.inf for k, hi in zip(ks, at_or_above)]


def global_threshold(tensors: list[torch.Tensor], sparsity: float) -> float:
    """The k-th smallest value over all of ``tensors`` (see ``kth_thresholds``)."""
    return kth_thresholds([tensors], sparsity)[0]


def magnitude_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|w| in fp32, 0 where already pruned (so pruned entries rank first)."""
    return weight.detach().abs().float().masked_fill(~mask, 0.0)


def magnitude_masks(
    weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Prune the smallest |w|: per tensor (``scope="layer"``) or over all of them (``"global"``)."""
    scores = {name: magnitude_scores(w, masks[name]) for name, w in weights.items()}
    groups = [list(scores.values())] if scope == "global" else [[s] for s in scores.values()]
    thresholds = kth_thresholds(groups, sparsity)
    if scope == "global":
        thresholds = thresholds * len(scores)
    return {name: masks[name] & (s > threshold) for (name, s), threshold in zip(scores.items(), thresholds)}


def nm_mask(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive entries along the last (input) dim.

    A DTensor weight must be sharded by rows (FSDP2's ``Shard(0)``), so every group is on one rank.
    """
    if isinstance(weight, DTensor):
        # Placement.is_shard() does not narrow a placement to Shard (which has .dim): hence the ignore
        assert all(not p.is_shard() or p.dim == 0 for p in weight.placements), (  # type: ignore[attr-defined]
            f"N:M pruning needs row-sharded weights, got {weight.placements}"
        )
        assert isinstance(mask, DTensor)  # a mask is sharded like its weight
        kept = nm_mask(weight.to_local(), mask.to_local(), n, m)
        return DTensor.from_local(
            kept, mask.device_mesh, mask.placements, run_check=False, shape=mask.shape, stride=mask.stride()
        )
    scores = weight.detach().abs().float().masked_fill(~mask, -1.0).reshape(-1, m)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n, dim=1).indices, True)
    return mask & keep.view_as(mask)


def unit_groups(model: nn.Module, module_names: set[str] | None = None) -> list[UnitGroup]:
    """The model's maskable unit groups (from its family) that read or write one of ``module_names`` (all when
    None)."""
    groups = [g for g in family_of(model).unit_groups(model) if g.maskable]
    return [g for g in groups if module_names is None or (g.modules | {g.out_module}) & module_names]


def channel_masks(
    group: UnitGroup, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float, norm: int
) -> dict[str, torch.Tensor]:
    """Remove the ``round(sparsity * n_units)`` units with the smallest L1/L2 norm (at least one unit stays)."""
    power = sum(
        group.per_unit(n, params[n].detach().float().masked_fill(~masks[n], 0.0).abs() ** norm)
        for n in group.param_names
    )
    scores = power ** (1.0 / norm)
    first = group.param_names[0]
    alive = group.per_unit(first, masks[first]) > 0
    scores = scores.masked_fill(~alive, -1.0)  # already removed units rank first
    n_remove = min(round(sparsity * group.n_units), group.n_units - 1)
    keep = torch.ones(group.n_units, dtype=torch.bool, device=scores.device)
    keep[scores.argsort(stable=True)[:n_remove]] = False
    return {n: masks[n] & group.expand(n, keep, masks[n].shape) for n in group.param_names}


@dataclass
class ThinPlan:
    """What ``thin`` keeps: units per (kind, layer) and, per parameter name, the (dim, index) slice."""

    widths: dict[tuple[str, int], int]
    index: dict[str, tuple[int, torch.Tensor]]

    def select(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in self.index:
            return tensor
        dim, index = self.index[name]
        return tensor.index_select(dim, index.to(tensor.device))


def plan_thinning(model: nn.Module, masks: dict[str, torch.Tensor]) -> ThinPlan:
    """Drop the dead units of every unit group, keeping at least one unit per group (one MLP unit, one head), and
    as many as the family's config can express (``thinned_widths``: the first dead units stay, computing zero).

    Units feeding a group-quantized out-layer (int4 ``proj``) are all kept: removing input
    columns would shift its quantization groups and change the quantized function.
    """
    fixed_width = {
        name
        for name, module in model.named_modules()
        if qat.is_quantized(module) and qat.quant_spec(module)["group_size"] < module.weight.shape[1]
    }
    groups = family_of(model).unit_groups(model)
    alive = {}
    for group in groups:
        dead = group.dead_units(masks)
        if group.out_module in fixed_width or not group.maskable:  # never masked as a unit: all kept
            dead[:] = False
        if bool(dead.all()):
            dead[0] = False
        alive[group.kind, group.layer] = ~dead
    widths = family_of(model).thinned_widths(model, {key: int(keep.sum()) for key, keep in alive.items()})
    index = {}
    for group in groups:
        keep = alive[group.kind, group.layer].clone()
        keep[(~keep).nonzero().flatten()[: widths[group.kind, group.layer] - int(keep.sum())]] = True
        kept = keep.nonzero().flatten()
        if len(kept) < group.n_units:
            index.update({name: group.indices(name, kept) for name in group.param_names})
    return ThinPlan(widths, index)


def thin(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A new, smaller dense model without the dead units and heads of ``masks``, and its remaining masks.

    The new model computes the same function as ``model`` with ``masks`` applied (see
    ``plan_thinning`` for what is removed; a layer whose units are all dead keeps one zero unit or
    head, so no layer is degenerate). The remaining (unstructured / N:M) masks are sliced like their
    parameters and applied to the new weights; masks left all-True are dropped. It is a plain model
    of the family (no fake-quant modules) on ``model``'s device. Needs full, unsharded tensors.
    """
    plan = plan_thinning(model, masks)
    spec = family_of(model)
    device = next(model.parameters()).device
    small = spec.build(spec.thinned_config(model, plan.widths)).to(device)
    source = model.state_dict()
    small.load_state_dict({name: plan.select(name, source[name].detach()) for name in small.state_dict()})
    sliced = {name: plan.select(name, mask) for name, mask in masks.items()}
    small_masks = {name: mask for name, mask in sliced.items() if not bool(mask.all())}
    with torch.no_grad():
        for name, mask in small_masks.items():
            small.get_parameter(name).masked_fill_(~mask, 0.0)
    return small.train(model.training), small_masks
