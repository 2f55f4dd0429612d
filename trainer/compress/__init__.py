"""Compression of the student while it trains: pruning masks, QAT phases, metrics and export.

The training loop talks to one ``Compressor``, in this order::

    compressor = build_compressor(student, cfg.compress.modifiers)   # before the optimizer and sharding
    ... parallelize the student, build the optimizer ...
    compressor.attach_optimizer(optimizer)        # creates masks; applies what is due at step 0
    compressor.load_state_dict(state)             # on resume (template: compressor.state_dict())
    for each step:
        backward (all micro-batches)
        compressor.mask_gradients()               # before clipping and the optimizer step
        clip; optimizer.step()
        compressor.after_optimizer_step(step)     # step = optimizer steps completed
        compressor.metrics() / layer_table() when logging; state_dict() into every checkpoint
    compressor.export(out_dir)

Masks (bool, True = kept) are keyed by parameter name as ``named_parameters()`` spells it (a tied
head is ``tok_emb.weight``), created with ``torch.ones_like(param)`` on first use, i.e. in
``attach_optimizer`` after sharding, so they take the parameter's placement: under FSDP2 a mask is a
DTensor sharded like its parameter, and masking works on the local shards (``pruning.local``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

# torchao announces optional CUDA/triton kernels it cannot load on a CPU machine; they are not used here.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch
import torch.nn as nn

from trainer import models
from trainer.compress import compressed_tensors, pruning, qat, stats, stillroom_format
from trainer.compress.modifiers import (  # re-exported: the package's config checks and pruning kinds
    PRUNERS,
    QAT,
    Pruner,
    modifier_kinds,
    pruning_kind,
    resolve_targets,
    validate_modifiers,
)
from trainer.config import ConfigError, ModifierConfig
from trainer.models.protocol import family_of

__all__ = [
    "PRUNERS",
    "Compressor",
    "Pruner",
    "build_compressor",
    "modifier_kinds",
    "pruning_kind",
    "resolve_targets",
    "validate_modifiers",
]


# ----------------------------------------------------------------------------- building


def build_compressor(model: nn.Module, modifiers: list[ModifierConfig]) -> Compressor:
    """Validate ``modifiers`` against ``model`` and prepare its QAT modules (in place).

    Call before the optimizer exists and before any sharding. Raises ConfigError naming the field.
    """
    validate_modifiers(modifiers, family_of(model))
    qat_phases = None
    for i, mod in enumerate(modifiers):
        if mod.kind != QAT:
            continue
        key = f"compress.modifiers.{i}"
        modules = resolve_targets(model, list(mod.targets), f"{key}.targets")
        try:
            qat.prepare(model, modules, weight_bits=mod.weight_bits, group_size=mod.group_size, act_bits=mod.act_bits)
        except ValueError as e:
            raise ConfigError(f"{key}.targets", str(e)) from None
        qat_phases = QATPhases(modules, mod.start_step, mod.freeze_step)
    pruners = [
        PRUNERS[mod.kind].build(model, mod, f"compress.modifiers.{i}")
        for i, mod in enumerate(modifiers)
        if mod.kind != QAT
    ]
    return Compressor(model, pruners, qat_phases)


class QATPhases:
    """When fake-quant is on (from ``start_step``) and ranges frozen (from ``freeze_step``)."""

    def __init__(self, modules: list[str], start_step: int, freeze_step: int | None):
        self.modules, self.start_step, self.freeze_step = modules, start_step, freeze_step
        self.enabled = False  # qat.prepare leaves fake-quant off
        self.frozen = False

    def apply(self, model: nn.Module, step: int, force: bool = False) -> None:
        """Bring the model to the phase of ``step``; ``force`` re-sets it (flags are not checkpointed)."""
        enabled = step >= self.start_step
        if enabled != self.enabled or force:
            qat.set_enabled(model, enabled)
            self.enabled = enabled
        frozen = self.freeze_step is not None and step >= self.freeze_step
        if frozen and (not self.frozen or force):
            qat.freeze_ranges(model)
        self.frozen = frozen


# ----------------------------------------------------------------------------- the facade


class Compressor:
    """Masks, schedules and QAT phases of the student; see the module docstring for the call order."""

    def __init__(self, model: nn.Module, pruners: list[Pruner], qat_phases: QATPhases | None):
        self.model = model
        self.pruners = pruners
        self.qat = qat_phases
        self.active = bool(pruners) or qat_phases is not None
        self.masks: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0  # the latest optimizer step processed; schedules never go back
        self._masked: list[tuple[torch.Tensor, torch.Tensor]] = []  # see _masked_params
        self._masked_key: list[tuple[int, int]] = []

    def for_part(self, part: nn.Module) -> Compressor:
        """The same modifiers over ``part``, which holds some of the student's modules under the student's names
        (a pipeline rank's stages): each pruner keeps the weights (or unit groups) ``part`` holds, QAT the modules.

        Call on a freshly built compressor, before ``attach_optimizer``. Pruners ranking across layers
        (``scope="global"``) would rank only ``part``'s weights: the config refuses them with pipelining.
        """
        params, modules = dict(part.named_parameters()), dict(part.named_modules())
        pruners = [
            dataclasses.replace(
                p,
                weights=[name for name in p.weights if name in params],
                groups=[g for g in p.groups if all(name in params for name in g.param_names)],
            )
            for p in self.pruners
        ]
        qat_phases = (
            None
            if self.qat is None
            else QATPhases(
                [name for name in self.qat.modules if name in modules], self.qat.start_step, self.qat.freeze_step
            )
        )
        return Compressor(part, pruners, qat_phases)

    # -- training-loop hooks

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer``'s state when masks change; create the masks; apply step-0 events."""
        self.optimizer = optimizer
        self.after_optimizer_step(self.step)

    def mask_gradients(self) -> None:
        """grad *= mask, after backward and before clipping / the optimizer step."""
        self._ensure_masks()
        grads, keeps = [], []
        for param, keep in self._masked_params():
            if param.grad is not None:
                grads.append(pruning.local(param.grad))
                keeps.append(keep)
        if grads:
            torch._foreach_mul_(grads, keeps)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Update masks the schedules call for at ``step``, zero the optimizer state of newly
        pruned entries, apply every mask in place, and set the QAT phase."""
        self._ensure_masks()
        self.step = step = max(step, self.step)
        newly_pruned: dict[str, torch.Tensor] = {}
        for pruner in self.pruners:
            update = pruner.schedule.last_update(step)
            if update is None or (pruner.last_update is not None and update <= pruner.last_update):
                continue
            params: dict[str, torch.Tensor] = {name: self.model.get_parameter(name) for name in pruner.param_names}
            current = {name: self.masks[name] for name in pruner.param_names}
            for name, mask in pruner.new_masks(params, current, update).items():
                dropped = self.masks[name] & ~mask
                newly_pruned[name] = newly_pruned[name] | dropped if name in newly_pruned else dropped
                self.masks[name].copy_(mask)
            pruner.last_update = update
        self._zero_optimizer_state(newly_pruned)
        self._apply_masks()
        if self.qat is not None:
            self.qat.apply(self.model, step)

    # -- reporting

    def metrics(self) -> dict[str, float]:
        """``compress/*`` metrics measured from the weights (see ``stats``)."""
        self._ensure_masks()
        pruned = list(dict.fromkeys(name for p in self.pruners for name in p.weight_names))
        return stats.summary(self.model, self.masks, pruned, qat_active=self.qat_active)

    @property
    def qat_active(self) -> bool:
        """Whether fake-quant is on at the current step."""
        return self.qat is not None and self.qat.enabled

    @property
    def counts_are_exact(self) -> bool:
        """Whether ``stats.summary_from_counts`` gives this compressor's export size (no structured kind's thinning)."""
        return not any(p.structured for p in self.pruners)

    @torch.no_grad()
    def shard_counts(self) -> dict[str, stats.ParamCounts]:
        """``stats.ParamCounts`` of the parameters this rank holds, summed over their shards (every rank of the
        shard axes calls it; a collective on one small vector)."""
        self._ensure_masks()
        pruned = [name for p in self.pruners for name in p.weight_names]
        counts = stats.local_counts(self.model, self.masks, pruned)
        if counts:
            stacked = torch.tensor([c.counts for c in counts.values()], dtype=torch.float64)
            summed = pruning.sum_over_shards(stacked, list(self.model.parameters()))
            for c, row in zip(counts.values(), summed.tolist()):
                c.counts = row
        return counts

    def layer_table(self) -> tuple[list[str], list[list]]:
        """``[layer, shape, sparsity, bits]`` for every module a modifier targets."""
        targeted = {name.rpartition(".")[0] for p in self.pruners for name in p.weight_names}
        if self.qat is not None:
            targeted |= set(self.qat.modules)
        return stats.layer_table(self.model, [name for name, _ in self.model.named_modules() if name in targeted])

    # -- checkpoints

    def state_dict(self) -> dict:
        """Masks (bool tensors by parameter name), schedule positions and the step (plain values)."""
        self._ensure_masks()
        return {
            "step": self.step,
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "pruners": [{"kind": p.kind, "last_update": p.last_update} for p in self.pruners],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore masks, schedule positions and the QAT phase; re-apply the masks to the weights."""
        self._ensure_masks()
        kinds = [p["kind"] for p in state["pruners"]]
        if kinds != [p.kind for p in self.pruners]:
            raise ValueError(
                f"compression state holds pruners {kinds}, the config builds {[p.kind for p in self.pruners]}"
            )
        saved = state.get("masks", {})
        if set(saved) != set(self.masks):
            raise ValueError(f"compression state masks {sorted(saved)} do not match {sorted(self.masks)}")
        for name, mask in self.masks.items():
            if tuple(saved[name].shape) != tuple(mask.shape):
                raise ValueError(f"mask {name}: shape {tuple(saved[name].shape)} != {tuple(mask.shape)}")
            mask.copy_(saved[name])
        for pruner, pruner_state in zip(self.pruners, state["pruners"]):
            pruner.last_update = pruner_state["last_update"]
        self.step = int(state["step"])
        self._apply_masks()
        if self.qat is not None:
            self.qat.apply(self.model, self.step, force=True)

    # -- export

    def export(self, out_dir: str | Path) -> Path:
        """Write the shipped student: thinned (a family with structured units), masked and quantized. A Hugging Face
        student is written as a Hugging Face folder, quantized modules in the compressed-tensors format where it holds
        them and dense with their fake-quantized values elsewhere (see ``compressed_tensors``); unstructured sparsity
        is kept as zeros there, said in one line. Other students: Stillroom's format."""
        self._ensure_masks()
        specs = stats.quant_specs(self.model)
        family = family_of(self.model)
        model, masks = pruning.thin(self.model, self.masks) if family.structured_units else (self.model, self.masks)
        if not family.pretrained_format:
            return stillroom_format.export_compressed(model, out_dir, masks, specs)
        if any(not pruner.structured for pruner in self.pruners):
            print(
                "note: the pruned weights are stored as zeros (dense): transformers and compressed-tensors no longer "
                "read the sparse-bitmask format",
                file=sys.stderr,
            )
        if specs:
            return compressed_tensors.save(model, Path(out_dir), specs, masks)
        return models.save_dense(model, out_dir)

    # -- internals

    def _ensure_masks(self) -> None:
        """Create an all-True mask for every parameter a pruner may mask, like the live parameter."""
        for pruner in self.pruners:
            for name in pruner.param_names:
                if name not in self.masks:
                    self.masks[name] = torch.ones_like(self.model.get_parameter(name), dtype=torch.bool)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        masked = self._masked_params()
        if masked:
            torch._foreach_mul_([pruning.local(param) for param, _ in masked], [keep for _, keep in masked])

    def _masked_params(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, keep)`` per mask, ``keep`` the mask's local shard as 0/1 in the parameter's dtype.

        One ``torch._foreach_mul_`` then applies all masks, where ``masked_fill_`` with bool masks costs
        ~20x more on CPU. Rebuilt when a mask was added, replaced or changed in place (its version
        counter moved). The parameters are fixed once masks exist (the optimizer holds them too).
        """
        key = [(id(mask), mask._version) for mask in self.masks.values()]
        if key != self._masked_key:
            params = [self.model.get_parameter(name) for name in self.masks]
            self._masked = [
                (param, pruning.local(mask).to(param.dtype)) for param, mask in zip(params, self.masks.values())
            ]
            self._masked_key = key
        return self._masked

    def _zero_optimizer_state(self, newly_pruned: dict[str, torch.Tensor]) -> None:
        """Zero the optimizer's per-entry state (AdamW exp_avg, exp_avg_sq; momentum) of pruned entries."""
        if self.optimizer is None:
            return
        for name, pruned in newly_pruned.items():
            param = self.model.get_parameter(name)
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    pruning.local(value).masked_fill_(pruning.local(pruned), 0.0)
