"""Quantization-aware training with torchao's fake-quantized linears and embeddings.

Schemes: weights int8 symmetric per row (output channel / embedding row) or int4 symmetric per
group of ``group_size`` row elements, with fp16 scales; activations int8 asymmetric per token
(dynamic) or none.

``prepare`` swaps ``nn.Linear`` / ``nn.Embedding`` modules for torchao's ``FakeQuantizedLinear`` /
``FakeQuantizedEmbedding`` through ``quantize_(model, QATConfig(..., step="prepare"), filter_fn=...)``,
then installs ``fused_fake_quant.FusedIntxFakeQuantizer`` (torchao's quantizer with the same config and
bitwise the same numbers, in one autograd node per call) as their weight and activation quantizers.
The swap keeps the same ``weight``/``bias`` Parameter objects (so ties survive) and the fake
quantizers hold no parameters or buffers, so parameter names, state-dict keys and optimizer state
are unchanged. Fake-quant starts disabled; ``set_enabled`` flips torchao's ``enabled`` flag on every
quantizer (a plain attribute, not saved in checkpoints: set it again after a resume).

Embeddings, and Linears whose weight is shared (GPT's head, tied to ``tok_emb``), are fake-quantized
weight-only. All modules sharing a weight must be prepared together and share one weight fake
quantizer: per-row quantization of the ``[vocab, dim]`` matrix is the same whether its rows are read
as embeddings or as the head's output channels, so every use sees the identical tensor and the export
stores it once. The head gets no activation fake-quant: the export's head is a plain Linear over the
dequantized table, and quantizing its input would add error at the logits without saving a byte.

torchao's conventions, mirrored by ``quantize_weight`` / ``dequantize_weight`` and the export:
symmetric scale = max|w| / ((qmax - qmin) / 2), i.e. /127.5 for int8 and /7.5 for int4, clamped to
``SCALE_EPS`` and rounded to fp16; zero point 0; q = clamp(round(w * (1 / scale)), qmin, qmax) with
the reciprocal taken in fp16; fake-quantized w = q * scale (fp32).
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchao.quantization import quantize_
from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig
from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine
from torchao.quantization.utils import get_group_qparams_symmetric

from trainer.compress.fused_fake_quant import FusedIntxFakeQuantizer

WEIGHT_DTYPES = {8: torch.int8, 4: torch.int4}  # type: ignore[attr-defined]  # torch's stubs omit int4
FLOAT_BITS = 32
SCALE_DTYPE = torch.float16
# The smallest normal fp16: every scale keeps full fp16 precision and its fp16 reciprocal (<= 2**14)
# stays finite, also for an all-zero (pruned) row. Rows with max|w| < 127.5 * 2**-14 (int8) get this
# floor as their step instead of a finer one.
SCALE_EPS = torch.finfo(SCALE_DTYPE).tiny
FAKE_QUANTIZED = (FakeQuantizedLinear, FakeQuantizedEmbedding)


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed ``bits``-bit integer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_fake_quant_config(weight_bits: int, group_size: int) -> IntxFakeQuantizeConfig:
    """int8 per row (``group_size`` unused) or int4 per group, both symmetric with fp16 scales."""
    common = dict(scale_precision=SCALE_DTYPE, eps=SCALE_EPS)
    if weight_bits == 8:
        return IntxFakeQuantizeConfig(torch.int8, "per_channel", **common)
    if weight_bits == 4:
        return IntxFakeQuantizeConfig(torch.int4, group_size=group_size, **common)  # type: ignore[attr-defined]  # torch's stubs omit int4
    raise ValueError(f"weight_bits must be 8 or 4, got {weight_bits}")


def activation_fake_quant_config(act_bits: int) -> IntxFakeQuantizeConfig | None:
    """int8 asymmetric per-token dynamic activations, or None for ``act_bits == 0``."""
    if act_bits == 0:
        return None
    if act_bits == 8:
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    raise ValueError(f"act_bits must be 8 or 0, got {act_bits}")


def weight_sharers(model: nn.Module, module: nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` is ``module.weight`` (itself included)."""
    return [
        name for name, m in model.named_modules(remove_duplicate=False) if getattr(m, "weight", None) is module.weight
    ]


def weight_is_tied(model: nn.Module, module: nn.Module) -> bool:
    """Whether another module shares ``module.weight`` (e.g. GPT's head and ``tok_emb``)."""
    return len(weight_sharers(model, module)) > 1


def prepare(model: nn.Module, module_names: list[str], *, weight_bits: int, group_size: int, act_bits: int) -> None:
    """Swap the named ``nn.Linear`` / ``nn.Embedding`` modules for torchao fake-quantized ones, disabled.

    Linears get ``act_bits`` activation fake-quant; embeddings and weight-tied Linears are
    weight-only, and modules sharing a weight share its fake quantizer (see the module docstring).
    Call before building the optimizer and before any sharding. Raises ValueError for a name that
    is missing, not a Linear or Embedding, already prepared, tied to a module that is not named
    too, or whose rows are not a multiple of ``group_size`` (int4).
    """
    names = set(module_names)
    for name in sorted(names):
        _check_preparable(model, name, names, weight_bits, group_size)
    weight_only = {
        name
        for name in names
        if isinstance(model.get_submodule(name), nn.Embedding) or weight_is_tied(model, model.get_submodule(name))
    }
    weight_config = weight_fake_quant_config(weight_bits, group_size)
    for selected, act_config in ((names - weight_only, activation_fake_quant_config(act_bits)), (weight_only, None)):
        if selected:
            config = QATConfig(activation_config=act_config, weight_config=weight_config, step="prepare")
            quantize_(model, config, filter_fn=lambda module, fqn, selected=selected: fqn in selected)
    for name in names:
        _fuse_quantizers(model.get_submodule(name))
    for name in sorted(weight_only):
        first, *others = weight_sharers(model, model.get_submodule(name))
        for other in others:
            model.get_submodule(other).weight_fake_quantizer = model.get_submodule(first).weight_fake_quantizer
    for name in names:
        _set_module_enabled(model.get_submodule(name), False)


def _fuse_quantizers(module: nn.Module) -> None:
    """Replace torchao's fake quantizers of a freshly prepared module by fused ones (same configs)."""
    for attr in ("weight_fake_quantizer", "activation_fake_quantizer"):
        quantizer = getattr(module, attr, None)
        if quantizer is not None:
            setattr(module, attr, FusedIntxFakeQuantizer(quantizer.config))


def _check_preparable(model: nn.Module, name: str, names: set[str], weight_bits: int, group_size: int) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"QAT target {name!r}: no such module") from None
    if is_quantized(module):
        raise ValueError(f"QAT target {name!r}: already prepared")
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise ValueError(
            f"QAT target {name!r}: only nn.Linear and nn.Embedding are supported, got {type(module).__name__}"
        )
    missing = [other for other in weight_sharers(model, module) if other not in names]
    if missing:
        raise ValueError(
            f"QAT target {name!r}: its weight is tied to {', '.join(missing)}, which must be a "
            "QAT target too (every use of the weight must see the same quantized tensor)"
        )
    if weight_bits == 4 and (group_size < 2 or module.weight.shape[1] % group_size):
        raise ValueError(
            f"QAT target {name!r}: rows of {module.weight.shape[1]} are not a multiple of group_size={group_size}"
        )


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn weight and activation fake-quant on or off in every prepared module."""
    for module in model.modules():
        _set_module_enabled(module, enabled)


def _set_module_enabled(module: nn.Module, enabled: bool) -> None:
    for quantizer in _quantizers(module):
        quantizer.enabled = enabled


def _quantizers(module: nn.Module) -> list[Any]:  # torchao's fake quantizers (torchao has no type information)
    if not isinstance(module, FAKE_QUANTIZED):
        return []
    found = [module.weight_fake_quantizer, getattr(module, "activation_fake_quantizer", None)]
    return [quantizer for quantizer in found if quantizer is not None]


def freeze_ranges(model: nn.Module) -> None:
    """Stop range updates. A no-op for every scheme ``prepare`` builds, by design.

    Weight scales are recomputed from the current weight at every forward (per row / per group)
    and activation scales per token from the current input: there is no observer or running range
    to freeze. Raises NotImplementedError for a quantizer that does keep ranges (static or
    range-learning torchao configs), so such a scheme is never silently left unfrozen.
    """
    for name, module in model.named_modules():
        for quantizer in _quantizers(module):
            config = getattr(quantizer, "config", None)
            if config is not None and (not config.is_dynamic or config.range_learning):
                raise NotImplementedError(f"{name}: freezing static/learned ranges is not supported")


def is_quantized(module: nn.Module) -> TypeGuard[FakeQuantizedLinear | FakeQuantizedEmbedding]:
    """Whether ``module`` is a torchao fake-quantized linear or embedding with a weight quantizer."""
    return isinstance(module, FAKE_QUANTIZED) and module.weight_fake_quantizer is not None


def module_bits(module: nn.Module) -> int:
    """Weight bits of ``module``: 8 or 4 when quantized, 32 otherwise."""
    return quant_spec(module)["weight_bits"] if is_quantized(module) else FLOAT_BITS


def quant_spec(module: nn.Module) -> dict:
    """``{"weight_bits", "group_size", "act_bits"}``; int8 per row reports the row length."""
    if not is_quantized(module):
        raise ValueError(f"{type(module).__name__} is not a QAT-prepared linear or embedding")
    config = module.weight_fake_quantizer.config
    weight_bits = next(b for b, dtype in WEIGHT_DTYPES.items() if dtype == config.dtype)
    activation = getattr(module, "activation_fake_quantizer", None)
    return {
        "weight_bits": weight_bits,
        "group_size": module.weight.shape[1] if weight_bits == 8 else config.group_size,
        "act_bits": 0 if activation is None else 8,
    }


def quantize_weight(weight: torch.Tensor, weight_bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8 tensor, same shape) and fp16 scales ``(rows, row_len // group)`` of ``weight``.

    Uses the same torchao primitives and arguments as the fake quantizer, so
    ``dequantize_weight(*quantize_weight(w, ...))`` equals the fake-quantized weight exactly.
    """
    group = weight.shape[1] if weight_bits == 8 else group_size
    qmin, qmax = int_range(weight_bits)
    scale, zero_point = get_group_qparams_symmetric(weight, weight_bits, group, SCALE_DTYPE, eps=SCALE_EPS)
    codes = quantize_affine(weight, (1, group), scale, zero_point, torch.int8, qmin, qmax)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weight from int8 ``codes`` (rows, row_len) and scales (rows, n_groups): ``codes * scale``."""
    group = codes.shape[1] // scale.shape[1]
    return dequantize_affine(codes, (1, group), scale, None, torch.int8, -128, 127)


def fake_quantize_weight(module: FakeQuantizedLinear | FakeQuantizedEmbedding) -> torch.Tensor:
    """The weight exactly as ``module``'s forward uses it (the float weight while disabled)."""
    return module.weight_fake_quantizer(_full(module.weight))


def weight_sqnr_db(model: nn.Module) -> float:
    """10*log10(sum w^2 / sum (w - q(w))^2) over all quantized weights (shared ones once), enabled or not.

    ``inf`` without quantized modules or without error. Under FSDP2 every rank must call it
    (sharded weights are gathered).
    """
    signal, noise = 0.0, 0.0
    seen = set()
    with torch.no_grad():
        for module in model.modules():
            if not is_quantized(module) or id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            spec = quant_spec(module)
            weight = _full(module.weight).float()
            error = weight - dequantize_weight(*quantize_weight(weight, spec["weight_bits"], spec["group_size"]))
            signal += weight.square().sum().item()
            noise += error.square().sum().item()
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
