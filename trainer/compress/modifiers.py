"""Compression modifiers from the config: the checks a modifier needs no model for (``validate_modifiers``) and the
resolution of its ``targets`` patterns against a model's modules (``resolve_targets``)."""

from __future__ import annotations

from fnmatch import fnmatch

import torch.nn as nn

from trainer.compress.schedules import SCHEDULES
from trainer.config import ConfigError, ModifierConfig
from trainer.models.protocol import ModelFamily

KINDS = ("magnitude", "channel", "nm", "qat")
PRUNING_KINDS = ("magnitude", "channel", "nm")
OUTPUT_HEAD_NAMES = ("head", "lm_head")


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def one_of(value, allowed, key: str) -> None:
    check(value in allowed, key, f"must be one of {', '.join(map(str, allowed))} (got {value!r})")


def validate_modifiers(modifiers: list[ModifierConfig], model_family: ModelFamily) -> None:
    """Config checks that need no model. Raises ConfigError ("compress.modifiers.<i>.<field>: ...")."""
    n_qat = 0
    for i, mod in enumerate(modifiers):
        key = f"compress.modifiers.{i}"
        check(mod.kind in KINDS, f"{key}.kind", f"unknown kind {mod.kind!r} (expected one of {', '.join(KINDS)})")
        targets = list(mod.targets)
        check(
            bool(targets) and all(isinstance(t, str) and t for t in targets),
            f"{key}.targets",
            "must be a non-empty list of module name patterns",
        )
        check(mod.start_step >= 0, f"{key}.start_step", f"must be >= 0 (got {mod.start_step})")
        if mod.kind == "qat":
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
            continue
        check(mod.every >= 1, f"{key}.every", f"must be >= 1 (got {mod.every})")
        if mod.kind == "nm":
            check(mod.m >= 1, f"{key}.m", f"must be >= 1 (got {mod.m})")
            check(1 <= mod.n <= mod.m, f"{key}.n", f"must be in [1, m={mod.m}] (got {mod.n})")
            continue
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
        one_of(mod.scope, ("layer", "global"), f"{key}.scope")
        if mod.kind == "channel":
            check(
                model_family.structured_units,
                f"{key}.kind",
                f"channel pruning needs a student with heads and MLP channels (got {model_family.name})",
            )
            one_of(mod.norm, (1, 2), f"{key}.norm")
            check(mod.scope == "layer", f"{key}.scope", "channel pruning ranks units per layer: must be layer")


def resolve_targets(model: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module names matched by ``patterns`` (fnmatch): ``nn.Linear`` layers, and embeddings or the
    output head (named ``head``/``lm_head``, or a Linear whose weight is an embedding's) only by a
    pattern equal to their name. Raises ConfigError naming ``key`` for a pattern that matches nothing."""
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
