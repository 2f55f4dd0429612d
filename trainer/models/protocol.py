"""The model protocol: everything the trainer, ``parallel/`` and compression may ask of a model.

One ``ModelFamily`` per architecture is the only code that knows a family's attribute names.
Its modules follow one calling convention: ``model(idx, hidden_layers=())`` returns logits, or
``(logits, {layer: hidden state})`` when layers are asked for (0 = the embeddings, ``i`` = the
output of decoder layer ``i``, ``FINAL_HIDDEN`` = the last hidden state after the final norm, the
head's input). Families with ``fused_head`` also take ``head=fn``: the model calls ``fn(final hidden
state, head weight, head bias or None)`` in place of its head and returns that in place of the logits
(a fused loss runs inside the model's forward, where FSDP2 holds the head's weight gathered). A
pipeline stage is the same module with what it does not own deleted: it takes token ids (first
stage) or hidden states and returns hidden states, or logits (last stage).

Structured units (attention heads grouped with their key/value heads, MLP channels) are described
as ``UnitGroup``s: where each unit's rows or columns sit in which parameters, which is all that
channel pruning, dead-unit detection and physical thinning need.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.nn as nn

FINAL_HIDDEN = -1  # hidden_layers key of the final-norm output (what the head reads)

# head=fn of a fused_head family's forward: fn(final hidden state, head weight, head bias or None), called in place of
# the head, with ``softcap=c`` by a model whose logits are ``c * tanh(z / c)`` of its head's output; its result is
# returned in place of the logits.
HeadFn = Callable[..., Any]

# The model class a family works on (a family is only ever handed models of its own class).
ModelT = TypeVar("ModelT", bound=nn.Module)


class KVCache:
    """The keys and values of the positions a model has read so far, by decoder layer (incremental decoding). A
    model whose family has ``kv_cache`` takes ``cache=`` in its forward: it reads ``idx`` as the positions after
    the ``length`` cached ones, appends their keys and values (``update``, called by each attention layer, also by
    transformers' own attention modules) and then advances ``length``."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: Any, **kwargs: Any):
        """The layer's keys and values ``[batch, heads, positions, head_dim]`` with ``key`` and ``value`` appended."""
        if layer in self.layers:
            past_key, past_value = self.layers[layer]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.layers[layer] = (key, value)
        return key, value


class ConfigFieldError(ValueError):
    """A family config's field has a bad value (raised by the config's ``__post_init__``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class Unsupported(ValueError):
    """A family cannot do what was asked (e.g. a teacher-only family asked to be pipelined)."""


@dataclass(frozen=True)
class UnitSlice:
    """One parameter's share of a unit group.

    Along ``dim`` (0: output rows of an in-projection's weight or bias, 1: input columns of the
    out-projection), the parameter holds ``parts`` stacked runs (3 for a fused q/k/v) of
    ``n_units * unit_size`` entries; ``parts`` as a tuple gives each run's unit size in multiples of
    ``unit_size`` (Phi-3's fused q/k/v under grouped-query attention: ``(group, 1, 1)`` heads a unit).
    ``gate_part`` names the run whose entries, all masked, make the unit's output exactly zero (a
    head's v rows, an MLP's up or gate rows); None if it has none.
    """

    param: str
    module: str
    dim: int
    unit_size: int
    parts: int | tuple[int, ...] = 1
    gate_part: int | None = None

    @property
    def run_sizes(self) -> tuple[int, ...]:
        """Each run's entries per unit."""
        scales = (1,) * self.parts if isinstance(self.parts, int) else self.parts
        return tuple(self.unit_size * scale for scale in scales)

    def _runs(self, tensor: torch.Tensor, n_units: int) -> list[torch.Tensor]:
        """``tensor``'s runs, each as [n_units, entries of a unit along dim, rest]."""
        moved = tensor.movedim(self.dim, 0)
        runs = moved.split([n_units * size for size in self.run_sizes])
        return [run.reshape(n_units, size, -1) for run, size in zip(runs, self.run_sizes, strict=True)]

    def per_unit(self, tensor: torch.Tensor, n_units: int) -> torch.Tensor:
        return sum(run.sum((1, 2)) for run in self._runs(tensor, n_units))  # type: ignore[return-value]

    def expand(self, keep: torch.Tensor, shape: torch.Size, n_units: int) -> torch.Tensor:
        moved = (shape[self.dim], *(s for d, s in enumerate(shape) if d != self.dim))
        rest = math.prod(moved[1:])
        runs = [keep.view(-1, 1, 1).expand(n_units, size, rest).reshape(-1, rest) for size in self.run_sizes]
        return torch.cat(runs).reshape(moved).movedim(0, self.dim)

    def gate_alive(self, mask: torch.Tensor, n_units: int) -> torch.Tensor:
        """Per unit: whether any entry of the gating run is kept."""
        assert self.gate_part is not None
        return self._runs(mask, n_units)[self.gate_part].flatten(1).any(1)

    def indices(self, kept: torch.Tensor, n_units: int) -> torch.Tensor:
        rows = torch.arange(n_units * sum(self.run_sizes))
        runs = rows.split([n_units * size for size in self.run_sizes])
        return torch.cat([run.view(n_units, -1)[kept].reshape(-1) for run in runs])


@dataclass(frozen=True)
class UnitGroup:
    """The structured units of one kind in one decoder layer: ``kind`` is "mlp" or "attn"."""

    kind: str
    layer: int
    n_units: int
    slices: tuple[UnitSlice, ...]
    out_module: str  # the projection that reads the units (its input columns are theirs)
    # Whether masking a unit leaves the other units' outputs as they were, so that pruning by masks and thinning keep
    # the function (OLMo 2 normalises all query heads together: its heads are cut, never masked).
    maskable: bool = True

    @property
    def modules(self) -> set[str]:
        return {s.module for s in self.slices}

    @property
    def param_names(self) -> list[str]:
        return [s.param for s in self.slices]

    @property
    def weight_names(self) -> list[str]:
        return [s.param for s in self.slices if s.param.endswith("weight")]

    def slice(self, name: str) -> UnitSlice:
        return next(s for s in self.slices if s.param == name)

    def per_unit(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` (parameter ``name`` or its mask) over each unit's entries: [n_units]."""
        return self.slice(name).per_unit(tensor, self.n_units)

    def expand(self, name: str, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A per-unit bool vector broadcast to the shape of parameter ``name``."""
        return self.slice(name).expand(keep, shape, self.n_units)

    def indices(self, name: str, kept: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(dim, index) selecting the kept units' entries of parameter ``name``."""
        s = self.slice(name)
        return s.dim, s.indices(kept, self.n_units)

    def dead_units(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units whose output is exactly zero under ``masks`` (bool [n_units] on the CPU): every entry of a
        gating run of some module (its weight rows and bias) is masked."""
        dead = torch.zeros(self.n_units, dtype=torch.bool)
        for module in sorted({s.module for s in self.slices if s.gate_part is not None}):
            gating = [s for s in self.slices if s.module == module and s.gate_part is not None]
            if any(s.param not in masks for s in gating):
                continue  # a gating entry without a mask is always alive
            alive = torch.zeros(self.n_units, dtype=torch.bool)
            for s in gating:
                alive |= s.gate_alive(masks[s.param], self.n_units).cpu()
            dead |= ~alive
        return dead


class ModelFamily(ABC, Generic[ModelT]):
    """An architecture family: how to build its models and what their parts are.

    The first group of methods every family answers (teachers need them); the student ones raise
    ``Unsupported`` for a family that only serves as a teacher.
    """

    name: str
    model_class: type[nn.Module]

    @abstractmethod
    def layers(self, model: ModelT) -> dict[str, nn.Module]:
        """The decoder layers by their name under ``layers_attr`` (FSDP2 units, pipeline split points)."""

    @abstractmethod
    def width(self, model: ModelT) -> int:
        """The residual stream's width (hidden states, what a pipeline stage sends the next)."""

    @abstractmethod
    def vocab_size(self, model: ModelT) -> int:
        """The number of logits per token."""

    task = "lm"  # lm: next-token prediction over token ids | classify: one label per feature vector
    fused_head = False  # whether its models' forward takes ``head=fn`` (see the module's docstring)
    kv_cache = False  # whether its models' forward takes ``cache=KVCache`` (incremental decoding)

    # ---- students -------------------------------------------------------------------------
    config_class: type | None = None
    layers_attr = "layers"
    structured_units = False  # whether unit_groups finds heads and MLP channels (channel pruning, thinning)
    pipelines = False  # whether pipeline_stage can split it (it has embeddings, layers and outputs)

    def build(self, config: Any) -> nn.Module:
        raise Unsupported(f"{self.name} models cannot be built as students")

    def config(self, model: ModelT) -> Any:
        """The config dataclass that rebuilds ``model``'s architecture."""
        raise Unsupported(f"{self.name} models have no Stillroom config")

    def depth(self, config: Any) -> int:
        """How many layers a config has (hidden states 0..depth; pipeline stages need one each)."""
        raise Unsupported(f"{self.name} models cannot be built as students")

    def layers_prefix(self, model: ModelT) -> str:
        """The dotted name the decoder layers' modules start with (what the ``layers`` target role stands for)."""
        return self.layers_attr

    def lacks(self, what: str) -> str:
        """The end of a line saying these models have no ``what`` (decoder layers, heads and MLP channels...)."""
        return f"{self.name} models have no {what}"

    def unit_importance_hook(self, group: UnitGroup, totals: dict[tuple[str, int], torch.Tensor]) -> Any:
        """A forward hook on ``group``'s ``out_module`` adding each unit's importance on a batch to
        ``totals[group.kind, group.layer]`` where the family measures it its own way (experts); None for the mean
        |input| of the unit's columns of the out-projection (``trainer.cut``)."""
        return None

    def logit_softcap(self, model: ModelT) -> float | None:
        """The cap ``c`` of the logits ``c * tanh(z / c)`` the model applies to its head's output ``z`` (a fused loss
        applies it too), None when its logits are the head's output."""
        return None

    def plain_head(self, model: ModelT) -> bool:
        """Whether the logits are the head's output as it is (a fused loss computes them so)."""
        return True

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        """The fields of a spec's ``config`` (as JSON) that say what the model is, flattened to dotted keys: what a
        checkpoint must match to be resumed. All of them by default; a family drops the incidental ones."""
        return flatten(config)

    def unit_groups(self, model: ModelT) -> list[UnitGroup]:
        """The structured units of every layer (none: channel pruning finds nothing)."""
        return []

    def thinned_widths(self, model: ModelT, alive: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The units each group keeps when thinned, given ``alive[kind, layer]`` units left alive: those, or more
        where the family's config cannot say so (one width for every layer; dead units kept compute zero)."""
        return alive

    def thinned_config(self, model: ModelT, widths: dict[tuple[str, int], int]) -> Any:
        """``model``'s config with ``widths[kind, layer]`` units in each unit group (``thinned_widths``' answer)."""
        raise Unsupported(f"{self.name} models cannot be thinned")

    def hidden_dims(self, model: ModelT) -> dict[str, int]:
        """For each state-dict entry that has one, the dim indexing the residual stream's channels (its width): what
        cutting the model's width keeps a subset of."""
        raise Unsupported(f"{self.name} models cannot be cut in width")

    def hidden_norms(self, model: ModelT) -> list[str]:
        """The weights of the RMS norms over the residual stream that multiply their normalized input: a cut of the
        width scales them (``trainer.cut``), so that channels that carried nothing leave the function as it was.
        None by default (a LayerNorm's mean moves too; a norm of another form needs its own rule)."""
        return []

    def cut_config(self, model: ModelT, layers: list[int], widths: dict[tuple[str, int], int], hidden: int) -> Any:
        """``model``'s config with only its decoder ``layers`` (renumbered from 0), ``widths[kind, i]`` units in the
        unit groups of new layer ``i`` (``thinned_widths``' answer) and a residual stream ``hidden`` wide."""
        raise Unsupported(f"{self.name} models cannot be cut")

    def head(self, model: ModelT) -> nn.Module:
        """The output head (what ``head=fn`` replaces in a ``fused_head`` family's forward)."""
        raise Unsupported(f"{self.name} models do not expose their head")

    def tied_weights(self, model: ModelT) -> list[str]:
        """Parameters read both where the model starts and where it ends (a tied embedding and head)."""
        return []

    def embeddings(self, model: ModelT) -> list[str]:
        """Names of the modules before the first layer (a pipeline's first stage holds them)."""
        raise Unsupported(f"{self.name} models cannot be pipelined")

    def outputs(self, model: ModelT) -> list[str]:
        """Names of the modules after the last layer (a pipeline's last stage holds them)."""
        raise Unsupported(f"{self.name} models cannot be pipelined")

    def pipeline_stage(self, model: ModelT, layers: list[str], first: bool, last: bool) -> nn.Module:
        """``model`` without what a stage of ``layers`` does not own: the layers of other stages, the
        embeddings unless ``first``, the final norm and head unless ``last`` (a tied embedding stays on the
        last stage too: the head reads its weight). It shares the kept modules with ``model``. Names may be
        dotted (``model.layers``): the modules on the way are copied, so ``model`` stays whole."""
        view = shallow_copy(model)
        owned = self.layers(model)
        replace_child(view, self.layers_attr, nn.ModuleDict({name: owned[name] for name in layers}))
        tied_modules = {name.rsplit(".", 1)[0] for name in self.tied_weights(model)}
        for name in self.embeddings(model):
            if not first and not (last and name in tied_modules):
                replace_child(view, name, None)
        for name in self.outputs(model):
            if not last:
                replace_child(view, name, None)
        return view

    # ---- exports --------------------------------------------------------------------------
    pretrained_format = False  # whether a dense export is a folder the family's ecosystem loads (save_pretrained)

    def save_pretrained(self, model: ModelT, folder: Path) -> None:
        """Write ``model`` as a folder its own ecosystem loads without Stillroom (a Hugging Face folder)."""
        raise Unsupported(f"{self.name} models have no format of their own: Stillroom's dense export holds them")


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing ``module``'s children, parameters and buffers; replacing
    or deleting a child of the copy leaves ``module`` as it is."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    return view


def replace_child(view: nn.Module, name: str, child: nn.Module | None) -> None:
    """Set the submodule ``name`` (dotted) of ``view`` (a ``shallow_copy``) to ``child``, shallow-copying the
    modules on the way so that the module ``view`` was copied from keeps its own."""
    *path, leaf = name.split(".")
    owner = view
    for part in path:
        inner = shallow_copy(owner.get_submodule(part))
        setattr(owner, part, inner)
        owner = inner
    setattr(owner, leaf, child)


def flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


FAMILIES: dict[str, ModelFamily[Any]] = {}


def register(family: ModelFamily[Any]) -> ModelFamily[Any]:
    """Make ``family`` known by its name (a config's ``arch``) and by its model class."""
    FAMILIES[family.name] = family
    return family


def family(arch: str) -> ModelFamily[Any]:
    if arch not in FAMILIES:
        raise KeyError(f"unknown model family {arch!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[arch]


def fuses_head(model: nn.Module) -> bool:
    """Whether ``model``'s forward can run a fused loss in place of its head: its family takes ``head=fn`` and the
    head is a plain ``nn.Linear`` (a fake-quantized head computes its logits from other weights)."""
    family = family_of(model)
    return family.fused_head and type(family.head(model)) is nn.Linear and family.plain_head(model)


def family_of(model: nn.Module) -> ModelFamily[Any]:
    """The family of ``model``'s class or its nearest base (FSDP2 subclasses the model's class)."""
    by_class = {candidate.model_class: candidate for candidate in FAMILIES.values()}
    for cls in type(model).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise KeyError(f"{type(model).__name__} belongs to no registered model family")
