"""Mask math for pruning (unstructured magnitude, N:M, structured GPT units) and thinning.

Masks are bool tensors shaped like their parameter (True = kept). The pruning functions take
the current masks and return subsets of them, so nothing pruned comes back. Their math is
elementwise or uses small reductions (per row, per unit, counts). Magnitude and N:M pruning run on
FSDP2 shards (DTensors): elementwise ops stay local and thresholds all-reduce counts. Channel
pruning and ``thin`` need full tensors.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from trainer.compress import qat
from trainer.compress.schedules import Schedule

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
    assert len(layouts) == 1 and all(isinstance(t, DTensor) for t in tensors), \
        "pruning thresholds need all tensors sharded alike (one FSDP mesh)"
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
        local_counts = [sum(int((t <= _float32_from_bits(mid)).sum()) for t in group) for group, mid in zip(shards, mids)]
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


def magnitude_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                    sparsity: float, scope: str) -> dict[str, torch.Tensor]:
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
        assert all(not p.is_shard() or p.dim == 0 for p in weight.placements), \
            f"N:M pruning needs row-sharded weights, got {weight.placements}"
        kept = nm_mask(weight.to_local(), mask.to_local(), n, m)
        return DTensor.from_local(kept, mask.device_mesh, mask.placements, run_check=False,
                                  shape=mask.shape, stride=mask.stride())
    scores = weight.detach().abs().float().masked_fill(~mask, -1.0).reshape(-1, m)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n, dim=1).indices, True)
    return mask & keep.view_as(mask)


@dataclass(frozen=True)
class UnitGroup:
    """The structured units of one GPT block: MLP hidden units or attention heads.

    The in-layer (``mlp.fc`` / ``attn.qkv``) holds ``parts`` stacked slices (1, or q/k/v = 3) of
    ``n_units * unit_size`` output rows; the out-layer (``proj``) holds one column slice per unit.
    """

    kind: str  # "mlp" | "attn"
    block: int
    n_units: int
    unit_size: int
    parts: int
    has_bias: bool

    @property
    def in_module(self) -> str:
        return f"blocks.{self.block}.{self.kind}.{'fc' if self.kind == 'mlp' else 'qkv'}"

    @property
    def out_module(self) -> str:
        return f"blocks.{self.block}.{self.kind}.proj"

    @property
    def in_weight(self) -> str:
        return f"{self.in_module}.weight"

    @property
    def in_bias(self) -> str:
        return f"{self.in_module}.bias"

    @property
    def out_weight(self) -> str:
        return f"{self.out_module}.weight"

    @property
    def weight_names(self) -> list[str]:
        return [self.in_weight, self.out_weight]

    @property
    def param_names(self) -> list[str]:
        """Every parameter the group's masks cover (the out-layer bias is per output, not per unit)."""
        return [self.in_weight, *([self.in_bias] if self.has_bias else []), self.out_weight]

    def per_unit(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` (one of ``param_names``, or its mask) over each unit's entries: shape [n_units]."""
        if name == self.out_weight:
            return tensor.reshape(tensor.shape[0], self.n_units, self.unit_size).sum((0, 2))
        return tensor.reshape(self.parts, self.n_units, self.unit_size, -1).sum((0, 2, 3))

    def expand(self, name: str, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcast a per-unit bool vector to the shape of parameter ``name``."""
        if name == self.out_weight:
            return keep.view(1, -1, 1).expand(shape[0], self.n_units, self.unit_size).reshape(shape)
        inputs = shape[1] if len(shape) == 2 else 1  # a weight's columns, or 1 for the bias
        return keep.view(1, -1, 1, 1).expand(self.parts, self.n_units, self.unit_size, inputs).reshape(shape)

    def indices(self, name: str, kept: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(dim, index) that selects the kept units' slices of parameter ``name``."""
        if name == self.out_weight:
            return 1, torch.arange(self.n_units * self.unit_size).view(self.n_units, self.unit_size)[kept].reshape(-1)
        rows = torch.arange(self.parts * self.n_units * self.unit_size)
        return 0, rows.view(self.parts, self.n_units, self.unit_size)[:, kept].reshape(-1)


def unit_groups(model: nn.Module, module_names: set[str] | None = None) -> list[UnitGroup]:
    """The GPT unit groups whose in- or out-layer is in ``module_names`` (all groups when None)."""
    groups = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        for group in (
            UnitGroup("mlp", i, mlp.fc.out_features, 1, 1, mlp.fc.bias is not None),
            UnitGroup("attn", i, attn.n_head, attn.head_dim, 3, attn.qkv.bias is not None),
        ):
            if module_names is None or {group.in_module, group.out_module} & module_names:
                groups.append(group)
    return groups


def channel_masks(group: UnitGroup, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                  sparsity: float, norm: int) -> dict[str, torch.Tensor]:
    """Remove the ``round(sparsity * n_units)`` units with the smallest L1/L2 norm (at least one unit stays)."""
    power = sum(group.per_unit(n, params[n].detach().float().masked_fill(~masks[n], 0.0).abs() ** norm)
                for n in group.param_names)
    scores = power ** (1.0 / norm)
    alive = group.per_unit(group.in_weight, masks[group.in_weight]) > 0
    scores = scores.masked_fill(~alive, -1.0)  # already removed units rank first
    n_remove = min(round(sparsity * group.n_units), group.n_units - 1)
    keep = torch.ones(group.n_units, dtype=torch.bool, device=scores.device)
    keep[scores.argsort(stable=True)[:n_remove]] = False
    return {n: masks[n] & group.expand(n, keep, masks[n].shape) for n in group.param_names}


def dead_units(group: UnitGroup, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Units whose activation is exactly zero under ``masks`` (per-unit bool vector, on CPU).

    That is when the unit's value rows (its MLP row, or the head's v rows) and their bias are all
    masked: GELU(0) = 0, and a zero v makes a zero head output whatever q and k are.
    """
    if group.in_weight not in masks or (group.has_bias and group.in_bias not in masks):
        return torch.zeros(group.n_units, dtype=torch.bool)
    alive = _value_part(group, masks[group.in_weight]).flatten(1).any(1)
    if group.has_bias:
        alive |= _value_part(group, masks[group.in_bias]).flatten(1).any(1)
    return ~alive.cpu()


def _value_part(group: UnitGroup, tensor: torch.Tensor) -> torch.Tensor:
    """The last stacked part (the MLP rows, or v of q/k/v) as [n_units, unit_size, -1]."""
    return tensor.reshape(group.parts, group.n_units, group.unit_size, -1)[-1]


@dataclass
class ThinPlan:
    """What ``thin`` keeps: widths per layer and, per parameter name, the (dim, index) slice."""

    mlp_hidden: list[int]
    n_heads: list[int]
    index: dict[str, tuple[int, torch.Tensor]]

    def select(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in self.index:
            return tensor
        dim, index = self.index[name]
        return tensor.index_select(dim, index.to(tensor.device))


def plan_thinning(model: nn.Module, masks: dict[str, torch.Tensor]) -> ThinPlan:
    """Drop the dead units of every GPT block, keeping at least one MLP unit and one head per layer.

    Units feeding a group-quantized out-layer (int4 ``proj``) are all kept: removing input
    columns would shift its quantization groups and change the quantized function.
    """
    fixed_width = {
        name for name, module in model.named_modules()
        if qat.is_quantized(module) and qat.quant_spec(module)["group_size"] < module.weight.shape[1]
    }
    widths, index = {}, {}
    for group in unit_groups(model):
        dead = dead_units(group, masks)
        if group.out_module in fixed_width:
            dead[:] = False
        if bool(dead.all()):
            dead[0] = False
        kept = (~dead).nonzero().flatten()
        widths[group.kind, group.block] = len(kept)
        if len(kept) < group.n_units:
            index.update({name: group.indices(name, kept) for name in group.param_names})
    n_layer = len(model.blocks)
    return ThinPlan([widths["mlp", i] for i in range(n_layer)], [widths["attn", i] for i in range(n_layer)], index)


def thin(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A new, smaller dense GPT without the dead units and heads of ``masks``, and its remaining masks.

    The new model computes the same function as ``model`` with ``masks`` applied (see
    ``plan_thinning`` for what is removed; a layer whose units are all dead keeps one zero unit or
    head, so no layer is degenerate). The remaining (unstructured / N:M) masks are sliced like their
    parameters and applied to the new weights; masks left all-True are dropped. It is a plain GPT
    (no fake-quant modules) on ``model``'s device. Needs full, unsharded tensors.
    """
    from trainer.models import build

    plan = plan_thinning(model, masks)
    config = dataclasses.asdict(model.cfg) | {
        "mlp_hidden": plan.mlp_hidden,
        "n_heads_per_layer": plan.n_heads,
        "head_dim": model.blocks[0].attn.head_dim,
    }
    device = next(model.parameters()).device
    small = build("gpt", **config).to(device)
    source = model.state_dict()
    small.load_state_dict({name: plan.select(name, source[name].detach()) for name in small.state_dict()})
    sliced = {name: plan.select(name, mask) for name, mask in masks.items()}
    small_masks = {name: mask for name, mask in sliced.items() if not bool(mask.all())}
    with torch.no_grad():
        for name, mask in small_masks.items():
            small.get_parameter(name).masked_fill_(~mask, 0.0)
    return small.train(model.training), small_masks


@dataclass
class Pruner:
    """One pruning modifier bound to the parameters it masks (names as in ``named_parameters()``)."""

    kind: str  # magnitude | nm | channel
    schedule: Schedule
    weights: list[str] = field(default_factory=list)  # magnitude / nm: the weights it ranks
    groups: list[UnitGroup] = field(default_factory=list)  # channel: the unit groups it ranks
    scope: str = "layer"
    norm: int = 1
    n: int = 2
    m: int = 4
    last_update: int | None = None  # the schedule's update step last applied

    @property
    def weight_names(self) -> list[str]:
        """The weight matrices it prunes (what ``compress/sparsity`` is measured over)."""
        return self.weights + [name for g in self.groups for name in g.weight_names]

    @property
    def param_names(self) -> list[str]:
        """Every parameter it masks (channel pruning also masks the in-layer bias)."""
        return self.weights + [name for g in self.groups for name in g.param_names]

    def new_masks(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                  step: int) -> dict[str, torch.Tensor]:
        """Masks at the schedule's sparsity for ``step``, each a subset of the current one."""
        sparsity = self.schedule.sparsity(step)
        if self.kind == "magnitude":
            return magnitude_masks({n: params[n] for n in self.weights}, masks, sparsity, self.scope)
        if self.kind == "nm":
            return {n: nm_mask(params[n], masks[n], self.n, self.m) for n in self.weights}
        new = {}
        for group in self.groups:
            new.update(channel_masks(group, params, masks, sparsity, self.norm))
        return new
