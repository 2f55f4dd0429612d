"""Compression metrics measured from the weights themselves (not from the schedules' intent).

Model size and bits describe the export (``Compressor.export``): the thinned GPT, masked,
QAT targets (Linears and embeddings; a tied head is stored once, as its embedding) stored as
integers at their QAT bits with fp16 scales (whether or not fake-quant is on yet), the rest fp32,
each tensor dense or sparse, whichever ``stillroom_format.storage_bytes`` says is smaller.
``compress/model_bytes`` is exactly the size of the export's blobs; the folder adds its
``config.json`` and the safetensors header (about 1 KB for a GPT). A Hugging Face student's export is a Hugging Face
folder instead, every tensor dense: ``compressed_tensors.tensor_bytes`` sizes each (codes and fp32 scales where the
compressed-tensors format holds the module, fp32 elsewhere), so ``compress/model_bytes`` is ``model.safetensors``
less its header.

Under sharding the same metrics come from per-parameter counts over each rank's local shard, summed
over the shards (``local_counts`` -> ``pruning.sum_over_shards`` -> ``summary_from_counts``), so no
weight leaves its rank. The counts see tensors unthinned: exact for every modifier but ``channel``,
whose thinned export a GPT needs whole tensors to plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn

from trainer.compress import compressed_tensors, pruning, qat, stillroom_format
from trainer.models import unique_state_dict
from trainer.models.protocol import family_of

FP32_BYTES = 4
TABLE_COLUMNS = ["layer", "shape", "sparsity", "bits"]
COUNT_FIELDS = ("numel", "zeros", "stored_nonzero", "signal", "noise")


@dataclass
class ParamCounts:
    """One parameter's figures: its global shape and export scheme, and ``COUNT_FIELDS`` summed over the
    shards counted so far (numel and zeros of the weight, nonzeros of its stored values, and for a
    quantized weight sum w^2 and sum (w - q(w))^2); ``file_bytes`` its size in a Hugging Face student's export (None:
    Stillroom's format, sized from the counts)."""

    shape: tuple[int, ...]
    pruned: bool
    bits: int
    group_size: int
    counts: list[float]
    file_bytes: int | None = None


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    """Fraction of exactly-zero entries over ``tensors`` (0 when there are none)."""
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def nonzero_params(model: nn.Module) -> int:
    """Nonzero parameters of ``model``, tied weights counted once."""
    return sum(int(p.count_nonzero()) for p in model.parameters())


def quant_specs(model: nn.Module) -> dict[str, dict]:
    """``{module name: qat.quant_spec}`` of the QAT-prepared modules."""
    return {name: qat.quant_spec(m) for name, m in model.named_modules() if qat.is_quantized(m)}


def export_tensors(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float tensors the export stores: unique state entries, masked, thinned (a family with structured
    units)."""
    plan = pruning.plan_thinning(model, masks) if family_of(model).structured_units else None
    tensors = {}
    for name, tensor in unique_state_dict(model).items():
        tensor = tensor.float()
        if name in masks:
            tensor = tensor.masked_fill(~masks[name], 0.0)
        tensors[name] = plan.select(name, tensor) if plan else tensor
    return tensors


def hf_compressed_specs(model: nn.Module, specs: dict[str, dict]) -> dict[str, dict] | None:
    """For a Hugging Face student, the quant ``specs`` its export holds in the compressed-tensors format (see
    ``compressed_tensors.compressed_specs``); None for a family exported in Stillroom's format."""
    return compressed_tensors.compressed_specs(model, specs) if family_of(model).pretrained_format else None


def storage(
    tensors: dict[str, torch.Tensor], specs: dict[str, dict], hf_specs: dict[str, dict] | None = None
) -> tuple[int, float]:
    """(bytes, average bits per stored value) of ``tensors`` when exported with quant ``specs``: in Stillroom's
    format, or with ``hf_specs`` (``hf_compressed_specs``) as a Hugging Face folder."""
    total_bytes, total_bits, total_numel = 0, 0, 0
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        spec = specs.get(module) if leaf == "weight" else None
        bits, group_size = qat.FLOAT_BITS, 0
        stored = tensor
        if spec is not None:
            bits, group_size = spec["weight_bits"], spec["group_size"]
            stored, _ = qat.quantize_weight(tensor, bits, group_size)
        nonzero = int(stored.count_nonzero())
        if hf_specs is None:
            total_bytes += stillroom_format.storage_bytes(
                tensor.numel(), tuple(tensor.shape), nonzero, bits, group_size
            )
        else:
            hf_spec = hf_specs.get(module) if leaf == "weight" else None
            total_bytes += compressed_tensors.tensor_bytes(tuple(tensor.shape), hf_spec)
        total_bits += bits * tensor.numel()
        total_numel += tensor.numel()
    return total_bytes, total_bits / max(total_numel, 1)


@torch.no_grad()
def summary(
    model: nn.Module, masks: dict[str, torch.Tensor], pruned_weights: list[str], qat_active: bool
) -> dict[str, float]:
    """The ``compress/*`` metrics; ``pruned_weights`` names the weights that pruning modifiers target."""
    specs = quant_specs(model)
    model_bytes, weight_bits = storage(export_tensors(model, masks), specs, hf_compressed_specs(model, specs))
    dense_bytes = FP32_BYTES * sum(t.numel() for t in unique_state_dict(model).values())
    metrics = {
        "compress/sparsity": zero_fraction([model.get_parameter(n) for n in pruned_weights]),
        "compress/nonzero_params": float(nonzero_params(model)),
        "compress/weight_bits": weight_bits,
        "compress/model_bytes": float(model_bytes),
        "compress/ratio": dense_bytes / model_bytes,
        "compress/qat_active": float(qat_active),
    }
    if qat_active:
        metrics["compress/weight_sqnr_db"] = qat.weight_sqnr_db(model)
    return metrics


@torch.no_grad()
def layer_table(model: nn.Module, module_names: list[str]) -> tuple[list[str], list[list]]:
    """Columns ``[layer, shape, sparsity, bits]`` and one row per named module, from its weight."""
    rows = []
    for name in module_names:
        module = model.get_submodule(name)
        weight = cast(torch.Tensor, module.weight)  # torch types a submodule's attributes as Tensor | Module
        rows.append([name, "x".join(map(str, weight.shape)), zero_fraction([weight]), qat.module_bits(module)])
    return TABLE_COLUMNS, rows


def weight_specs(model: nn.Module) -> dict[str, dict]:
    """``{parameter name: quant spec}`` of the QAT-prepared modules' weights, a shared weight under its first name."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(m.weight)]: spec
        for name, spec in quant_specs(model).items()
        for m in [model.get_submodule(name)]
        if id(m.weight) in names
    }


@torch.no_grad()
def local_counts(model: nn.Module, masks: dict[str, torch.Tensor], pruned_weights: list[str]) -> dict[str, ParamCounts]:
    """``ParamCounts`` of every parameter (tied ones once) over this rank's local shard of it."""
    specs, pruned = weight_specs(model), set(pruned_weights)
    hf_specs = hf_compressed_specs(model, quant_specs(model))
    out = {}
    for name, param in model.named_parameters():
        weight = pruning.local(param).detach().float()
        if name in masks:
            weight = weight.masked_fill(~pruning.local(masks[name]), 0.0)
        spec = specs.get(name)
        bits, group_size = (spec["weight_bits"], spec["group_size"]) if spec else (qat.FLOAT_BITS, 0)
        stored_nonzero, signal, noise = int(weight.count_nonzero()), 0.0, 0.0
        if spec and weight.numel():
            codes, scale = qat.quantize_weight(weight, bits, group_size)
            stored_nonzero = int(codes.count_nonzero())
            signal = weight.double().square().sum().item()
            noise = (weight - qat.dequantize_weight(codes, scale)).double().square().sum().item()
        zeros = weight.numel() - int(pruning.local(param).count_nonzero())
        out[name] = ParamCounts(
            tuple(param.shape),
            name in pruned,
            bits,
            group_size,
            [float(weight.numel()), float(zeros), float(stored_nonzero), signal, noise],
            None
            if hf_specs is None
            else compressed_tensors.tensor_bytes(tuple(param.shape), hf_specs.get(name.removesuffix(".weight"))),
        )
    return out


def summary_from_counts(counts: dict[str, ParamCounts], qat_active: bool) -> dict[str, float]:
    """The ``compress/*`` metrics of ``summary`` from whole-model ``counts`` (see the module docstring)."""

    def total(field: str, where=lambda c: True) -> float:
        i = COUNT_FIELDS.index(field)
        return sum(c.counts[i] for c in counts.values() if where(c))

    model_bytes = sum(
        stillroom_format.storage_bytes(int(c.counts[0]), c.shape, int(c.counts[2]), c.bits, c.group_size)
        if c.file_bytes is None
        else c.file_bytes
        for c in counts.values()
    )
    numel = total("numel")
    pruned_numel = total("numel", lambda c: c.pruned)
    metrics = {
        "compress/sparsity": total("zeros", lambda c: c.pruned) / pruned_numel if pruned_numel else 0.0,
        "compress/nonzero_params": numel - total("zeros"),
        "compress/weight_bits": sum(c.bits * c.counts[0] for c in counts.values()) / max(numel, 1),
        "compress/model_bytes": float(model_bytes),
        "compress/ratio": FP32_BYTES * numel / model_bytes,
        "compress/qat_active": float(qat_active),
    }
    if qat_active:
        noise = total("noise")
        metrics["compress/weight_sqnr_db"] = math.inf if noise == 0.0 else 10.0 * math.log10(total("signal") / noise)
    return metrics


def table_from_counts(counts: dict[str, ParamCounts]) -> tuple[list[str], list[list]]:
    """``layer_table``'s columns and rows from whole-model ``counts``: every pruned or quantized weight."""
    rows = [
        [
            name.rpartition(".")[0],
            "x".join(map(str, c.shape)),
            c.counts[1] / c.counts[0] if c.counts[0] else 0.0,
            c.bits,
        ]
        for name, c in counts.items()
        if c.pruned or c.bits != qat.FLOAT_BITS
    ]
    return TABLE_COLUMNS, rows
