"""Compression modifiers from the config: the pruning kinds (``PRUNERS``, each a ``Pruner`` subclass registered with
``@pruning_kind(name)``: its checks, how it is built on a model, its masks), the checks a modifier needs no model for
(``validate_modifiers``) and the resolution of its ``targets`` patterns against a model's modules
(``resolve_targets``). The mask math is in ``trainer.compress.pruning``.

A new pruning kind is one subclass here. Its defaults rank the target modules' weight matrices on the modifier's
sparsity schedule (``schedule``, ``initial_sparsity``, ``final_sparsity``, ``end_step``, ``every``); it computes its
masks in ``masks_at``, reading its options from ``self.modifier``, and overrides ``check`` and ``build`` only for
other options or units. Registered, ``compress.modifiers.<i>.kind=<name>`` passes the checks and trains::

    @pruning_kind("random")
    class RandomPruner(Pruner):
        def masks_at(self, params: Tensors, masks: Tensors, sparsity: float) -> Tensors:
            seeded = torch.Generator().manual_seed(0)  # the same scores at every update: the masks only shrink
            scores = {n: torch.rand(masks[n].shape, generator=seeded).to(masks[n].device) for n in self.weights}
            return {n: masks[n] & (scores[n] >= sparsity) for n in self.weights}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import ClassVar, TypeVar

import torch
import torch.nn as nn

from trainer.compress import pruning
from trainer.compress.schedules import SCHEDULES, Schedule
from trainer.config import ConfigError, ModifierConfig
from trainer.models.protocol import ModelFamily, UnitGroup, Unsupported, family_of

Tensors = dict[str, torch.Tensor]  # by parameter name (a mask: bool, True = kept)
QAT = "qat"  # the modifier kind that is not a pruner (trainer.compress.qat)
OUTPUT_HEAD_NAMES = ("head", "lm_head")


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def one_of(value, allowed, key: str) -> None:
    check(value in allowed, key, f"must be one of {', '.join(map(str, allowed))} (got {value!r})")


# ----------------------------------------------------------------------------- pruning kinds


@dataclass
class Pruner:
    """One pruning modifier bound to the parameters it masks (names as in ``named_parameters()``); a kind is a
    subclass registered with ``@pruning_kind`` (see the module docstring)."""

    kind: ClassVar[str] = ""  # compress.modifiers.<i>.kind (set by @pruning_kind)
    # removes whole units (heads, MLP channels): ranks them on full weights (not under FSDP), the export thins them
    structured: ClassVar[bool] = False

    schedule: Schedule
    modifier: ModifierConfig  # its options
    weights: list[str] = field(default_factory=list)  # the weight matrices it ranks
    groups: list[UnitGroup] = field(default_factory=list)  # the unit groups it ranks (a structured kind)
    last_update: int | None = None  # the schedule's update step last applied

    @classmethod
    def check(cls, mod: ModifierConfig, key: str, family: ModelFamily) -> None:
        """Checks of ``mod`` (``key``: ``compress.modifiers.<i>``) that need no model: the sparsity schedule's."""
        check(mod.every >= 1, f"{key}.every", f"must be >= 1 (got {mod.every})")
        one_of(mod.schedule, SCHEDULES, f"{key}.schedule")
        if mod.schedule != "constant":
            check(
                mod.end_step >= mod.start_step,
                f"{key}.end_step",
                f"must be >= start_step={mod.start_step} (got {mod.end_step})",
            )
        check(0 <= mod.final_sparsity < 1, f"{key}.final_sparsity", f"must be in [0, 1) (got {mod.final_sparsity})")
        check(
            0 <= mod.initial_sparsity <= mod.final_sparsity,
            f"{key}.initial_sparsity",
            f"must be in [0, final_sparsity={mod.final_sparsity}] (got {mod.initial_sparsity})",
        )

    @classmethod
    def build(cls, model: nn.Module, mod: ModifierConfig, key: str) -> Pruner:
        """The pruner of ``mod`` on ``model``: the weights of its target modules, on its sparsity schedule."""
        modules = resolve_targets(model, list(mod.targets), f"{key}.targets")
        return cls(sparsity_schedule(mod), mod, weights=weight_names(model, modules))

    def masks_at(self, params: Tensors, masks: Tensors, sparsity: float) -> Tensors:
        """Masks of ``params`` (the parameters it masks) at ``sparsity``, each a subset of its current one."""
        raise NotImplementedError(f"pruning kind {self.kind!r} has no masks_at")

    def new_masks(self, params: Tensors, masks: Tensors, step: int) -> Tensors:
        """Masks at the schedule's sparsity for ``step``, each a subset of the current one."""
        return self.masks_at(params, masks, self.schedule.sparsity(step))

    @property
    def weight_names(self) -> list[str]:
        """The weight matrices it prunes (what ``compress/sparsity`` is measured over)."""
        return self.weights + [name for g in self.groups for name in g.weight_names]

    @property
    def param_names(self) -> list[str]:
        """Every parameter it masks (channel pruning also masks the in-layer bias)."""
        return self.weights + [name for g in self.groups for name in g.param_names]


PRUNERS: dict[str, type[Pruner]] = {}  # compress.modifiers.<i>.kind -> its Pruner; filled by @pruning_kind(name)
P = TypeVar("P", bound=type[Pruner])


def pruning_kind(name: str) -> Callable[[P], P]:
    """Register the decorated ``Pruner`` subclass as the modifier kind ``name`` (see the module docstring)."""

    def register(cls: P) -> P:
        if name == QAT or name in PRUNERS:
            raise ValueError(f"the modifier kind {name!r} is taken")
        cls.kind = name
        PRUNERS[name] = cls
        return cls

    return register


def modifier_kinds() -> list[str]:
    """Every modifier kind registered now: the pruning kinds, then qat."""
    return [*PRUNERS, QAT]


def sparsity_schedule(mod: ModifierConfig) -> Schedule:
    """The schedule of ``mod``'s sparsity (one shot at ``start_step`` when ``constant``)."""
    one_shot = mod.schedule == "constant"
    return Schedule(
        kind=mod.schedule,
        start_step=mod.start_step,
        end_step=mod.start_step if one_shot else mod.end_step,
        every=mod.every,
        initial=mod.initial_sparsity,
        final=mod.final_sparsity,
    )


def weight_names(model: nn.Module, module_names: list[str]) -> list[str]:
    """The parameter names of the modules' weights, each shared weight once."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    names = [canonical[id(model.get_submodule(m).weight)] for m in module_names]
    return list(dict.fromkeys(names))


@pruning_kind("magnitude")
class MagnitudePruner(Pruner):
    """The smallest |w| of each weight (``scope=layer``) or of all of them (``global``)."""

    @classmethod
    def check(cls, mod: ModifierConfig, key: str, family: ModelFamily) -> None:
        super().check(mod, key, family)
        one_of(mod.scope, ("layer", "global"), f"{key}.scope")

    def masks_at(self, params: Tensors, masks: Tensors, sparsity: float) -> Tensors:
        return pruning.magnitude_masks({n: params[n] for n in self.weights}, masks, sparsity, self.modifier.scope)


@pruning_kind("channel")
class ChannelPruner(Pruner):
    """Whole heads and MLP channels of each layer, by the L1 or L2 norm (``norm``) of their weights."""

    structured = True

    @classmethod
    def check(cls, mod: ModifierConfig, key: str, family: ModelFamily) -> None:
        super().check(mod, key, family)
        one_of(mod.scope, ("layer", "global"), f"{key}.scope")
        check(
            family.structured_units,
            f"{key}.kind",
            f"channel pruning needs a student with heads and MLP channels: {family.lacks('heads and MLP channels')}",
        )
        one_of(mod.norm, (1, 2), f"{key}.norm")
        check(mod.scope == "layer", f"{key}.scope", "channel pruning ranks units per layer: must be layer")

    @classmethod
    def build(cls, model: nn.Module, mod: ModifierConfig, key: str) -> Pruner:
        modules = resolve_targets(model, list(mod.targets), f"{key}.targets")
        groups = pruning.unit_groups(model, set(modules))
        check(
            bool(groups),
            f"{key}.targets",
            "matches no attention or MLP layer (heads or channels of the model's unit groups)",
        )
        return cls(sparsity_schedule(mod), mod, groups=groups)

    def masks_at(self, params: Tensors, masks: Tensors, sparsity: float) -> Tensors:
        new = {}
        for group in self.groups:
            new.update(pruning.channel_masks(group, params, masks, sparsity, self.modifier.norm))
        return new


@pruning_kind("nm")
class NMPruner(Pruner):
    """``n`` of every ``m`` consecutive weights along the input dim, one shot at ``start_step``."""

    @classmethod
    def check(cls, mod: ModifierConfig, key: str, family: ModelFamily) -> None:
        check(mod.every >= 1, f"{key}.every", f"must be >= 1 (got {mod.every})")
        check(mod.m >= 1, f"{key}.m", f"must be >= 1 (got {mod.m})")
        check(1 <= mod.n <= mod.m, f"{key}.n", f"must be in [1, m={mod.m}] (got {mod.n})")

    @classmethod
    def build(cls, model: nn.Module, mod: ModifierConfig, key: str) -> Pruner:
        weights = weight_names(model, resolve_targets(model, list(mod.targets), f"{key}.targets"))
        for name in weights:
            width = model.get_parameter(name).shape[-1]
            check(width % mod.m == 0, f"{key}.m", f"{name} has {width} inputs, not a multiple of m={mod.m}")
        schedule = Schedule(
            kind="constant",
            start_step=mod.start_step,
            end_step=mod.start_step,
            every=mod.every,
            initial=mod.initial_sparsity,
            final=1.0 - mod.n / mod.m,
        )
        return cls(schedule, mod, weights=weights)

    def masks_at(self, params: Tensors, masks: Tensors, sparsity: float) -> Tensors:
        return {n: pruning.nm_mask(params[n], masks[n], self.modifier.n, self.modifier.m) for n in self.weights}


# ----------------------------------------------------------------------------- checks


def validate_modifiers(modifiers: list[ModifierConfig], model_family: ModelFamily) -> None:
    """Config checks that need no model. Raises ConfigError ("compress.modifiers.<i>.<field>: ...")."""
    n_qat = 0
    for i, mod in enumerate(modifiers):
        key = f"compress.modifiers.{i}"
        kinds = modifier_kinds()
        check(mod.kind in kinds, f"{key}.kind", f"unknown kind {mod.kind!r} (expected one of {', '.join(kinds)})")
        targets = list(mod.targets)
        check(
            bool(targets) and all(isinstance(t, str) and t for t in targets),
            f"{key}.targets",
            "must be a non-empty list of module name patterns",
        )
        check(mod.start_step >= 0, f"{key}.start_step", f"must be >= 0 (got {mod.start_step})")
        if mod.kind != QAT:
            PRUNERS[mod.kind].check(mod, key, model_family)
            continue
        n_qat += 1
        check(n_qat == 1, f"{key}.kind", "only one qat modifier is supported")
        one_of(mod.weight_bits, (8, 4), f"{key}.weight_bits")
        one_of(mod.act_bits, (0, 8), f"{key}.act_bits")
        if mod.weight_bits == 4:
            check(mod.group_size >= 2, f"{key}.group_size", f"must be >= 2 (got {mod.group_size})")
        if mod.freeze_step is not None:
            check(
                mod.freeze_step >= mod.start_step,
                f"{key}.freeze_step",
                f"must be >= start_step={mod.start_step} (got {mod.freeze_step})",
            )


ROLES = ("layers", "embedding", "head")  # target names every family resolves to its own modules


def role_patterns(model: nn.Module, role: str) -> list[str]:
    """The patterns a role stands for in ``model``'s family: ``layers``, the Linears of its decoder layers;
    ``embedding``, its embedding tables; ``head``, its output head. Raises Unsupported for a family without one."""
    family = family_of(model)
    if role == "layers":
        return [f"{family.layers_prefix(model)}.*"]
    modules = dict(model.named_modules())
    if role == "embedding":
        return [name for name in family.embeddings(model) if isinstance(modules.get(name), nn.Embedding)]
    head = family.head(model)
    return [next(name for name, module in modules.items() if module is head)]


def resolve_targets(model: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module names matched by ``patterns`` (fnmatch; a role of ``ROLES`` stands for its family's modules):
    ``nn.Linear`` layers, and embeddings or the output head (named ``head``/``lm_head``, or a Linear whose weight is
    an embedding's) only by a pattern equal to their name. Raises ConfigError naming ``key`` for a pattern that
    matches nothing."""
    expanded = []
    for pattern in patterns:
        try:
            expanded += role_patterns(model, pattern) if pattern in ROLES else [pattern]
        except Unsupported:
            check(False, key, f"{family_of(model).name} models have no {pattern!r} to target")
    patterns = expanded
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def explicit_only(name: str, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Embedding)
            or id(module.weight) in embedding_weights
            or name.rpartition(".")[2] in OUTPUT_HEAD_NAMES
        )

    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    names = []
    for pattern in patterns:
        matched = [
            name for name, m in candidates if (name == pattern if explicit_only(name, m) else fnmatch(name, pattern))
        ]
        check(
            bool(matched),
            key,
            f"pattern {pattern!r} matches no Linear layer (embeddings and the output head only by their exact name)",
        )
        names += [name for name in matched if name not in names]
    return names
