"""Compression metrics measured from the weights themselves (not from the schedules' intent).

Model size and bits describe the export (``Compressor.export``): the thinned GPT, masked,
QAT targets (Linears and embeddings; a tied head is stored once, as its embedding) stored as
integers at their QAT bits with fp16 scales (whether or not fake-quant is on yet), the rest fp32,
each tensor dense or sparse, whichever ``export.storage_bytes`` says is smaller.
``compress/model_bytes`` is exactly the size of the export's blobs; the folder adds its
``config.json`` and the safetensors header (about 1 KB for a GPT).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.compress import export, pruning, qat
from trainer.models import unique_state_dict
from trainer.models.gpt import GPT

FP32_BYTES = 4
TABLE_COLUMNS = ["layer", "shape", "sparsity", "bits"]


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
    """The float tensors the export stores: unique state entries, masked, thinned for a GPT."""
    plan = pruning.plan_thinning(model, masks) if isinstance(model, GPT) else None
    tensors = {}
    for name, tensor in unique_state_dict(model).items():
        tensor = tensor.float()
        if name in masks:
            tensor = tensor.masked_fill(~masks[name], 0.0)
        tensors[name] = plan.select(name, tensor) if plan else tensor
    return tensors


def storage(tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> tuple[int, float]:
    """(bytes, average bits per stored value) of ``tensors`` when exported with quant ``specs``."""
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
        total_bytes += export.storage_bytes(tensor.numel(), tuple(tensor.shape), nonzero, bits, group_size)
        total_bits += bits * tensor.numel()
        total_numel += tensor.numel()
    return total_bytes, total_bits / max(total_numel, 1)


@torch.no_grad()
def summary(model: nn.Module, masks: dict[str, torch.Tensor], pruned_weights: list[str],
            qat_active: bool) -> dict[str, float]:
    """The ``compress/*`` metrics; ``pruned_weights`` names the weights that pruning modifiers target."""
    specs = quant_specs(model)
    model_bytes, weight_bits = storage(export_tensors(model, masks), specs)
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
        weight = module.weight
        rows.append([name, "x".join(map(str, weight.shape)), zero_fraction([weight]), qat.module_bits(module)])
    return TABLE_COLUMNS, rows
