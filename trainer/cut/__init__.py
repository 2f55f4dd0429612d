"""A student cut out of its teacher (Minitron's recipe): some of the teacher's decoder layers, attention head groups,
MLP channels and embedding channels, with the teacher's weights; an ordinary smaller model of the teacher's family.

Importance is measured on calibration batches, in eval mode, through the model protocol only:

- a decoder layer's: ShortGPT's block influence, 1 - cosine similarity of the layer's input and output hidden states
  per token, averaged; the layers that change the residual stream least are dropped;
- a unit's (a key/value head with its query heads, an MLP channel; ``UnitGroup``): Minitron's mean |activation| of
  its columns of the out-projection's input;
- an embedding channel's: mean |hidden state| of the channel over the residual stream at every layer;
- an expert's (a mixture-of-experts layer's units): what its family measures (``unit_importance_hook``).

Ties go to the earlier layer or unit, so the choice is deterministic.

A cut of the width scales the RMS norms over the residual stream (``ModelFamily.hidden_norms``) by
``sqrt(kept energy / all energy * width / kept width)``, the energy a channel's mean squared hidden state: the norms
then divide by the stream's RMS as the teacher's did where the channels cut carried nothing (exactly, but for the
norms' ``eps``), and by what it was on average otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.protocol import ConfigFieldError, UnitGroup, Unsupported, family_of

LAYER_SELECT = ("uniform", "importance")


@dataclass
class CutConfig:
    """``student=from_teacher``: ``layers`` of the teacher's decoder layers (all when None), chosen ``uniform`` (evenly
    spaced, the first and last included) or by ``importance``; ``width`` the fraction of attention head groups and MLP
    channels kept (``mlp_width``, when set, that of the MLP channels), ``hidden_width`` that of the model width,
    ``experts`` the experts kept of each mixture-of-experts layer (all when None), all by importance over
    ``calib_batches`` batches of the training data drawn with ``calib_seed`` (not ``train.seed``: every seed of a run
    trains the same student)."""

    layers: int | None = None
    layer_select: str = "uniform"
    width: float = 1.0
    mlp_width: float | None = None
    hidden_width: float = 1.0
    experts: int | None = None
    calib_batches: int = 4
    calib_seed: int = 0
    block_size: int = 64  # the training sequence length: at most the teacher's positions
    vocab_size: int | None = None  # the data's vocabulary (filled in from the data): the teacher's must be it

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ConfigFieldError("layers", f"must be >= 1 (got {self.layers})")
        if self.layer_select not in LAYER_SELECT:
            raise ConfigFieldError(
                "layer_select", f"must be one of {', '.join(LAYER_SELECT)} (got {self.layer_select!r})"
            )
        for key in ("width", "mlp_width", "hidden_width"):
            if getattr(self, key) is not None and not 0 < getattr(self, key) <= 1:
                raise ConfigFieldError(key, f"must be in (0, 1] (got {getattr(self, key)})")
        if self.experts is not None and self.experts < 1:
            raise ConfigFieldError("experts", f"must be >= 1 (got {self.experts})")
        if self.calib_batches < 1:
            raise ConfigFieldError("calib_batches", f"must be >= 1 (got {self.calib_batches})")
        if self.block_size < 1:
            raise ConfigFieldError("block_size", f"must be >= 1 (got {self.block_size})")

    @property
    def calibrates(self) -> bool:
        """Whether the cut needs calibration batches (an importance choice of anything)."""
        widths = (self.width, self.hidden_width, 1.0 if self.mlp_width is None else self.mlp_width)
        return self.layer_select == "importance" or min(widths) < 1 or self.experts is not None


@dataclass
class Importance:
    """What calibration measured: per decoder layer, per unit of each group ``(kind, layer)``, per embedding
    channel (mean |hidden state|, and ``energy``: mean squared hidden state)."""

    layers: torch.Tensor
    units: dict[tuple[str, int], torch.Tensor]
    channels: torch.Tensor
    energy: torch.Tensor


def uniform_layers(depth: int, keep: int) -> list[int]:
    """``keep`` of ``depth`` layer indices, evenly spaced, the first and the last included."""
    if keep == 1:
        return [0]
    return [round(i * (depth - 1) / (keep - 1)) for i in range(keep)]


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the ``keep`` largest ``scores`` in increasing order (ties: the earlier index)."""
    return torch.argsort(scores, descending=True, stable=True)[:keep].sort().values


@torch.no_grad()
def measure(model: nn.Module, batches: list[torch.Tensor]) -> Importance:
    """The importance of ``model``'s layers, units and embedding channels on ``batches`` (see the module)."""
    family = family_of(model)
    depth = len(family.layers(model))
    groups = family.unit_groups(model)
    units = {(g.kind, g.layer): torch.zeros(g.n_units, dtype=torch.float64) for g in groups}
    handles = []
    for g in groups:
        own = family.unit_importance_hook(g, units)
        module = model.get_submodule(g.out_module)
        handles.append(
            module.register_forward_hook(own) if own else module.register_forward_pre_hook(_unit_hook(g, units))
        )
    layers = torch.zeros(depth, dtype=torch.float64)
    channels = torch.zeros(family.width(model), dtype=torch.float64)
    energy = torch.zeros_like(channels)
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            _, hidden = model(x, hidden_layers=tuple(range(depth + 1)))
            for i in range(depth):
                layers[i] += (1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)).mean().double()
            for h in hidden.values():
                channels += h.abs().flatten(0, -2).mean(0).double()
                energy += h.double().square().flatten(0, -2).mean(0)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    n = len(batches)
    per_state = n * (depth + 1)
    return Importance(
        layers / n, {key: total / n for key, total in units.items()}, channels / per_state, energy / per_state
    )


def _unit_hook(group: UnitGroup, totals: dict[tuple[str, int], torch.Tensor]):
    """A pre-hook on ``group``'s out-projection adding each unit's mean |input| to ``totals``."""
    size = next(s for s in group.slices if s.module == group.out_module).unit_size

    def hook(_module, args):
        activations = args[0].detach().abs().reshape(-1, group.n_units, size)
        totals[group.kind, group.layer] += activations.mean((0, 2)).double().cpu()

    return hook


def kept_units(group: UnitGroup, config: CutConfig) -> int:
    """How many of ``group``'s units the cut keeps: ``config.experts`` experts; of ``config.width``, a whole number of
    attention units (key/value head groups), else ConfigFieldError saying which widths would do; MLP channels (of
    ``config.mlp_width`` when set) are rounded."""
    if group.kind == "experts":
        if config.experts is not None and config.experts > group.n_units:
            raise ConfigFieldError("experts", f"{config.experts} is more than the teacher's {group.n_units} experts")
        return group.n_units if config.experts is None else config.experts
    width = config.mlp_width if group.kind != "attn" and config.mlp_width is not None else config.width
    exact = width * group.n_units
    if group.kind == "attn" and abs(exact - round(exact)) > 1e-6:
        fits = ", ".join(f"{k / group.n_units:g}" for k in range(1, group.n_units + 1))
        raise ConfigFieldError(
            "width",
            f"{width} of {group.n_units} attention head groups (a key/value head with its query heads) is "
            f"{exact:g}, not a whole number: use one of {fits}",
        )
    return max(1, round(exact))


def cut(
    model: nn.Module, config: CutConfig, batches: list[torch.Tensor], importance: Importance | None = None
) -> nn.Module:
    """The student ``config`` cuts out of ``model`` (its layers, units and channels chosen on ``batches``, which may be
    empty when ``config.calibrates`` is false, or when ``model`` is on the meta device: then only the sizes matter;
    or on ``importance``, what ``measure`` already found on them). Raises ConfigFieldError naming the field that
    cannot be met."""
    family = family_of(model)
    depth = len(family.layers(model))
    keep = depth if config.layers is None else config.layers
    if keep > depth:
        raise ConfigFieldError("layers", f"{keep} is more than the teacher's {depth} decoder layers")
    sizes_only = next(iter(model.parameters())).is_meta
    scores = None if sizes_only or not config.calibrates else importance or measure(model, batches)
    if config.layer_select == "importance" and scores is not None:
        layers = top(scores.layers, keep).tolist()
    else:
        layers = uniform_layers(depth, keep)
    groups = {(g.kind, g.layer): g for g in family.unit_groups(model) if g.layer in layers}
    if config.experts is not None and not any(kind == "experts" for kind, _ in groups):
        raise ConfigFieldError("experts", f"the teacher has no mixture-of-experts layers ({family.name})")
    wanted = {key: kept_units(g, config) for key, g in groups.items()}
    counts = family.thinned_widths(model, wanted)
    units = {
        key: top(scores.units[key], counts[key]) if scores is not None else torch.arange(counts[key]) for key in groups
    }
    width = family.width(model)
    hidden = max(1, round(config.hidden_width * width))
    channels, hidden_dims, norm_scale = None, {}, 1.0
    if hidden < width:
        try:
            hidden_dims = family.hidden_dims(model)
        except Unsupported as e:
            raise ConfigFieldError("hidden_width", str(e)) from None
        channels = top(scores.channels, hidden) if scores is not None else torch.arange(hidden)
        if scores is not None:
            norm_scale = norm_scale_of(scores.energy, channels)
    renumber = {old: new for new, old in enumerate(layers)}
    widths = {(kind, renumber[layer]): len(index) for (kind, layer), index in units.items()}
    student = family.build(family.cut_config(model, layers, widths, hidden))
    if not sizes_only:
        state = cut_state(model, layers, groups, units, (channels, hidden_dims))
        for name in family.hidden_norms(model):
            target = _renamed(name, f"{family.layers_attr}.", {str(old): str(new) for new, old in enumerate(layers)})
            if target is not None:
                state[target] = state[target] * norm_scale
        student.load_state_dict(state)
    return student


def norm_scale_of(energy: torch.Tensor, channels: torch.Tensor) -> float:
    """The factor of the residual stream's norms when only ``channels`` of it are kept (see the module)."""
    kept = energy[channels].sum() / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float((kept * len(energy) / len(channels)).sqrt())


def _renamed(name: str, prefix: str, renumber: dict[str, str]) -> str | None:
    """``name`` in the cut model: its layer renumbered by ``renumber`` (None for a layer not kept)."""
    if not name.startswith(prefix):
        return name
    layer, rest = name.removeprefix(prefix).split(".", 1)
    return f"{prefix}{renumber[layer]}.{rest}" if layer in renumber else None


def cut_state(
    model: nn.Module,
    layers: list[int],
    groups: dict[tuple[str, int], UnitGroup],
    units: dict[tuple[str, int], torch.Tensor],
    channels: tuple[torch.Tensor | None, dict[str, int]],
) -> dict[str, torch.Tensor]:
    """``model``'s state dict with only ``layers`` (renumbered from 0), the ``units`` of their groups and the embedding
    channels ``channels[0]`` (all when None) along the dims ``channels[1]`` (``hidden_dims``' answer)."""
    family = family_of(model)
    prefix = f"{family.layers_attr}."
    renumber = {str(old): str(new) for new, old in enumerate(layers)}
    owner = {name: key for key, g in groups.items() for name in g.param_names}
    kept_channels, hidden_dims = channels
    state = {}
    for name, tensor in model.state_dict().items():
        target = _renamed(name, prefix, renumber)
        if target is None:
            continue
        if name in owner:
            keep = torch.zeros(groups[owner[name]].n_units, dtype=torch.bool)
            keep[units[owner[name]]] = True
            dim, index = groups[owner[name]].indices(name, keep)
            tensor = tensor.index_select(dim, index.to(tensor.device))
        if kept_channels is not None and name in hidden_dims:
            tensor = tensor.index_select(hidden_dims[name], kept_channels.to(tensor.device))
        state[target] = tensor
    return state
