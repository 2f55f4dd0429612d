"""Quantization-aware training with torchao's fake-quantized linears.

Schemes: weights int8 symmetric per output channel or int4 symmetric per group of
``group_size`` input elements; activations int8 asymmetric per token (dynamic) or none.

``prepare`` swaps ``nn.Linear`` modules for ``torchao.quantization.qat.FakeQuantizedLinear``
through ``quantize_(model, QATConfig(..., step="prepare"), filter_fn=...)``. The swap keeps the
same ``weight``/``bias`` Parameter objects and the fake quantizers hold no parameters or buffers,
so parameter names, state-dict keys and optimizer state are unchanged. Fake-quant starts disabled;
``set_enabled`` flips torchao's ``enabled`` flag on both quantizers (a plain attribute, not saved in
checkpoints: set it again after a resume).

torchao's conventions, mirrored by ``quantize_weight`` / ``dequantize_weight`` and the export:
symmetric scale = max|w| / ((qmax - qmin) / 2), i.e. /127.5 for int8 and /7.5 for int4, clamped
to the smallest normal float; zero point 0; q = clamp(round(w * (1 / scale)), qmin, qmax);
fake-quantized w = q * scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchao.quantization import quantize_
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig
from torchao.quantization.qat.linear import enable_linear_fake_quant
from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine
from torchao.quantization.utils import get_group_qparams_symmetric

WEIGHT_DTYPES = {8: torch.int8, 4: torch.int4}
FLOAT_BITS = 32


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed ``bits``-bit integer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_fake_quant_config(weight_bits: int, group_size: int) -> IntxFakeQuantizeConfig:
    """int8 per output channel (``group_size`` unused) or int4 per group, both symmetric."""
    if weight_bits == 8:
        return IntxFakeQuantizeConfig(torch.int8, "per_channel")
    if weight_bits == 4:
        return IntxFakeQuantizeConfig(torch.int4, group_size=group_size)
    raise ValueError(f"weight_bits must be 8 or 4, got {weight_bits}")


def activation_fake_quant_config(act_bits: int) -> IntxFakeQuantizeConfig | None:
    """int8 asymmetric per-token dynamic activations, or None for ``act_bits == 0``."""
    if act_bits == 0:
        return None
    if act_bits == 8:
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    raise ValueError(f"act_bits must be 8 or 0, got {act_bits}")


def weight_is_tied(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module.weight`` is shared with another parameter name (e.g. GPT's head)."""
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight]
    return len(owners) > 1


def prepare(model: nn.Module, module_names: list[str], *, weight_bits: int, group_size: int,
            act_bits: int) -> None:
    """Swap the named ``nn.Linear`` modules for torchao fake-quantized linears, fake-quant disabled.

    Call before building the optimizer and before any sharding. Raises ValueError for a name that
    is missing, not a Linear, already prepared, weight-tied, or whose ``in_features`` is not a
    multiple of ``group_size`` (int4).
    """
    names = set(module_names)
    for name in sorted(names):
        _check_preparable(model, name, weight_bits, group_size)
    config = QATConfig(
        activation_config=activation_fake_quant_config(act_bits),
        weight_config=weight_fake_quant_config(weight_bits, group_size),
        step="prepare",
    )
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    for name in names:
        enable_linear_fake_quant(model.get_submodule(name), enabled=False)


def _check_preparable(model: nn.Module, name: str, weight_bits: int, group_size: int) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"QAT target {name!r}: no such module") from None
    if is_quantized(module):
        raise ValueError(f"QAT target {name!r}: already prepared")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"QAT target {name!r}: only nn.Linear is supported, got {type(module).__name__}")
    if weight_is_tied(model, module):
        raise ValueError(f"QAT target {name!r}: its weight is tied to another parameter "
                         "(quantizing it would need a float and a quantized copy)")
    if weight_bits == 4 and (group_size < 2 or module.in_features % group_size):
        raise ValueError(f"QAT target {name!r}: in_features={module.in_features} is not a "
                         f"multiple of group_size={group_size}")


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn weight and activation fake-quant on or off in every prepared module."""
    for module in model.modules():
        enable_linear_fake_quant(module, enabled=enabled)


def freeze_ranges(model: nn.Module) -> None:
    """Stop range updates. A no-op for every scheme ``prepare`` builds, by design.

    Weight scales are recomputed from the current weight at every forward (per channel / per
    group) and activation scales per token from the current input: there is no observer or
    running range to freeze. Raises NotImplementedError for a quantizer that does keep ranges
    (static or range-learning torchao configs), so such a scheme is never silently left unfrozen.
    """
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantizedLinear):
            continue
        for quantizer in (module.weight_fake_quantizer, module.activation_fake_quantizer):
            config = getattr(quantizer, "config", None)
            if config is not None and (not config.is_dynamic or config.range_learning):
                raise NotImplementedError(f"{name}: freezing static/learned ranges is not supported")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a torchao fake-quantized linear with a weight quantizer."""
    return isinstance(module, FakeQuantizedLinear) and module.weight_fake_quantizer is not None


def module_bits(module: nn.Module) -> int:
    """Weight bits of ``module``: 8 or 4 when quantized, 32 otherwise."""
    return quant_spec(module)["weight_bits"] if is_quantized(module) else FLOAT_BITS


def quant_spec(module: nn.Module) -> dict:
    """``{"weight_bits", "group_size", "act_bits"}``; int8 per channel reports ``in_features``."""
    if not is_quantized(module):
        raise ValueError(f"{type(module).__name__} is not a QAT-prepared linear")
    config = module.weight_fake_quantizer.config
    weight_bits = next(b for b, dtype in WEIGHT_DTYPES.items() if dtype == config.dtype)
    return {
        "weight_bits": weight_bits,
        "group_size": module.in_features if weight_bits == 8 else config.group_size,
        "act_bits": 0 if module.activation_fake_quantizer is None else 8,
    }


def quantize_weight(weight: torch.Tensor, weight_bits: int, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8 tensor, same shape) and fp32 scales ``(out, in // group)`` of ``weight``.

    Uses the same torchao primitives and arguments as the fake quantizer, so
    ``dequantize_weight(*quantize_weight(w, ...))`` equals the fake-quantized weight exactly.
    """
    group = weight.shape[1] if weight_bits == 8 else group_size
    qmin, qmax = int_range(weight_bits)
    scale, zero_point = get_group_qparams_symmetric(weight, weight_bits, group, torch.float32)
    codes = quantize_affine(weight, (1, group), scale, zero_point, torch.int8, qmin, qmax)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weight from int8 ``codes`` (out, in) and scales (out, n_groups): ``codes * scale``."""
    group = codes.shape[1] // scale.shape[1]
    return dequantize_affine(codes, (1, group), scale, None, torch.int8, -128, 127)


def fake_quantize_weight(module: nn.Module) -> torch.Tensor:
    """The weight exactly as ``module``'s forward uses it (the float weight while disabled)."""
    return module.weight_fake_quantizer(_full(module.weight))


def weight_sqnr_db(model: nn.Module) -> float:
    """10*log10(sum w^2 / sum (w - q(w))^2) over all quantized modules, enabled or not.

    ``inf`` without quantized modules or without error. Under FSDP2 every rank must call it
    (sharded weights are gathered).
    """
    signal, noise = 0.0, 0.0
    with torch.no_grad():
        for module in model.modules():
            if not is_quantized(module):
                continue
            spec = quant_spec(module)
            weight = _full(module.weight).float()
            error = weight - dequantize_weight(*quantize_weight(weight, spec["weight_bits"], spec["group_size"]))
            signal += weight.square().sum().item()
            noise += error.square().sum().item()
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
