"""The student as it is shipped: quantized weights stored as integers, sparse tensors stored compactly.

``model.safetensors`` keys are the plain model's parameter names (tied weights once):

- a quantized linear's ``<m>.weight`` holds int8 codes (int4: flat uint8, two codes per byte, low
  nibble first) and ``<m>.weight.scale`` its fp32 scales ``(out, in // group_size)``; quantization
  is symmetric, so there are no zero points.
- a tensor whose sparse form is smaller (see ``storage_bytes``) is stored as ``<key>.bitmask``
  (uint8; bit ``i`` of byte ``j`` is element ``8j + i`` of the flattened tensor) and
  ``<key>.values`` (its nonzeros in row-major order, int8 / packed int4 codes or fp32).
- everything else (embeddings, LayerNorm, biases, unquantized weights) is dense fp32: fp16 would
  break the 1e-4 agreement with the trained model for a few percent of a compressed student's bytes.

``config.json``: ``{"format": "stillroom-compressed", "arch", "config", "quant": {module: spec},
"sparse": [keys stored sparse]}``. ``load_compressed`` rebuilds the plain model and swaps each
quantized linear for ``QuantizedLinear``. torchao's converted CPU kernels are not used: our own
dequantize-then-matmul reproduces the fake-quantized forward bit for bit with the same primitives.
"""

from __future__ import annotations

import json
import math
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from trainer.compress.qat import (
    FLOAT_BITS,
    activation_fake_quant_config,
    dequantize_weight,
    is_quantized,
    prepare,
    quant_spec,
    quantize_weight,
    set_enabled,
    weight_is_tied,
)
from trainer.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_from_spec,
    load_weights,
    model_spec,
    read_export_config,
    unique_state_dict,
)

COMPRESSED_FORMAT = "stillroom-compressed"
SCALE_BYTES = 4  # fp32 scales


# ----------------------------------------------------------------------------- sizes


def storage_bytes(numel: int, shape: tuple, nonzero: int, weight_bits: int, group_size: int) -> int:
    """Bytes one weight tensor takes in the export: values (dense, or bitmask + nonzeros when that is
    smaller) plus scales. ``weight_bits`` 32 = fp32; 8 = one scale per row; 4 = one per group."""
    return _value_bytes(numel, nonzero, weight_bits) + SCALE_BYTES * _scale_count(
        numel, shape, weight_bits, group_size)


def _dense_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def _sparse_bytes(numel: int, nonzero: int, bits: int) -> int:
    return math.ceil(nonzero * bits / 8) + math.ceil(numel / 8)


def _stores_sparse(numel: int, nonzero: int, bits: int) -> bool:
    return _sparse_bytes(numel, nonzero, bits) < _dense_bytes(numel, bits)


def _value_bytes(numel: int, nonzero: int, bits: int) -> int:
    return min(_dense_bytes(numel, bits), _sparse_bytes(numel, nonzero, bits))


def _scale_count(numel: int, shape: tuple, bits: int, group_size: int) -> int:
    if bits == FLOAT_BITS:
        return 0
    return shape[0] if bits == 8 else numel // group_size


# ----------------------------------------------------------------------------- packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Flat uint8 holding two int4 codes (-8..7) per byte, element ``2i`` in the low nibble."""
    flat = codes.flatten().to(torch.int8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0x0F).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` int4 codes of ``pack_int4``'s output, as a flat int8 tensor."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten()[:numel].to(torch.int8)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Flat uint8 bitmask of a bool tensor, little-endian within each byte."""
    flat = flags.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` flags of ``pack_bits``'s output, as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).flatten()[:numel].bool()


# ----------------------------------------------------------------------------- runtime module


class QuantizedLinear(nn.Module):
    """Inference linear holding int8 codes (int4: packed, see ``pack_int4``) and fp32 scales.

    Dequantizes for every matmul and, when ``act_bits == 8``, first applies torchao's int8
    per-token dynamic activation fake-quant, exactly like the QAT model's FakeQuantizedLinear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, weight_bits: int,
                 group_size: int, act_bits: int):
        super().__init__()
        if weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 8 or 4, got {weight_bits}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.group_size, self.act_bits = weight_bits, group_size, act_bits
        if weight_bits == 8:
            qdata = torch.zeros(out_features, in_features, dtype=torch.int8)
        else:
            qdata = torch.zeros(math.ceil(out_features * in_features / 2), dtype=torch.uint8)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        act_config = activation_fake_quant_config(act_bits)
        self.activation_fake_quantizer = IntxFakeQuantizer(act_config) if act_config is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight ``(out, in)``."""
        codes = self.qdata
        if self.weight_bits == 4:
            codes = unpack_int4(codes, self.out_features * self.in_features)
        return dequantize_weight(codes.view(self.out_features, self.in_features), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_bits={self.weight_bits}, group_size={self.group_size}, act_bits={self.act_bits}")


# ----------------------------------------------------------------------------- export / load


def export_compressed(model: nn.Module, out_dir: str | Path, masks: dict[str, torch.Tensor],
                      quant: dict) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of the shipped student to ``out_dir``.

    ``quant`` (module -> quant_spec) is merged over the specs of the model's QAT-prepared modules;
    a plain Linear listed there is quantized post-training. ``masks`` (parameter name -> bool) are
    applied before quantization. Pass an unsharded model (e.g. rebuilt from a gathered state dict).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = _export_specs(model, quant)
    state = unique_state_dict(model)
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise ValueError(f"masks for tensors that are not in the exported state: {unknown}")
    tensors, sparse = {}, []
    for key, tensor in state.items():
        tensor = tensor.float()
        if key in masks:
            tensor = tensor.masked_fill(~masks[key].to(tensor.device, torch.bool), 0.0)
        bits, module_name = FLOAT_BITS, _quantized_module_of(key, specs)
        if module_name is not None:
            spec = specs[module_name]
            bits = spec["weight_bits"]
            tensor, scale = quantize_weight(tensor, bits, spec["group_size"])
            tensors[f"{key}.scale"] = scale
        entries, is_sparse = _encode(key, tensor.cpu(), bits)
        tensors.update(entries)
        if is_sparse:
            sparse.append(key)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": COMPRESSED_FORMAT, **model_spec(model), "quant": specs, "sparse": sparse}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild an export of ``export_compressed`` as a runnable CPU model in eval mode."""
    meta = read_export_config(path)
    if meta["format"] != COMPRESSED_FORMAT:
        raise ValueError(f"{path}: format {meta['format']!r} is not {COMPRESSED_FORMAT!r}")
    model = build_from_spec(meta)
    specs, sparse = meta["quant"], set(meta["sparse"])
    stored = load_file(str(Path(path) / WEIGHTS_FILE))
    state = {}
    for key, template in unique_state_dict(model).items():
        module_name = _quantized_module_of(key, specs)
        bits = FLOAT_BITS if module_name is None else specs[module_name]["weight_bits"]
        state[key] = _decode(stored, key, tuple(template.shape), bits, key in sparse)
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        model.set_submodule(name, QuantizedLinear(linear.in_features, linear.out_features,
                                                  linear.bias is not None, **spec))
        codes = state.pop(f"{name}.weight")
        state[f"{name}.qdata"] = pack_int4(codes) if spec["weight_bits"] == 4 else codes
        state[f"{name}.scale"] = stored[f"{name}.weight.scale"]
    load_weights(model, state)
    return model.eval()


def quantize_dense(model: nn.Module, weight_bits: int = 8, group_size: int = 32, act_bits: int = 8,
                   targets: list[str] | None = None) -> nn.Module:
    """Post-training quantization: prepare the Linear modules matching ``targets`` (fnmatch
    patterns over module names; None = all) and enable fake-quant. Weight-tied Linears (GPT's
    head) are skipped. Returns ``model``, modified in place; export it with ``export_compressed``."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not weight_is_tied(model, module)
             and (targets is None or any(fnmatch(name, pattern) for pattern in targets))]
    prepare(model, names, weight_bits=weight_bits, group_size=group_size, act_bits=act_bits)
    set_enabled(model, True)
    return model


def _export_specs(model: nn.Module, quant: dict) -> dict:
    """Quant specs of the QAT modules overridden by ``quant``, normalised and checked."""
    specs = {name: quant_spec(module) for name, module in model.named_modules() if is_quantized(module)}
    for name, spec in quant.items():
        linear = model.get_submodule(name)
        if weight_is_tied(model, linear):
            raise ValueError(f"cannot quantize {name!r}: its weight is tied to another parameter")
        bits, group = spec["weight_bits"], spec["group_size"]
        if bits == 8:
            group = linear.in_features
        elif bits != 4 or linear.in_features % group:
            raise ValueError(f"{name!r}: unsupported quant spec {spec} for in_features={linear.in_features}")
        specs[name] = {"weight_bits": bits, "group_size": group, "act_bits": spec.get("act_bits", 0)}
    return dict(sorted(specs.items()))


def _quantized_module_of(key: str, specs: dict) -> str | None:
    module_name, _, leaf = key.rpartition(".")
    return module_name if leaf == "weight" and module_name in specs else None


def _to_storage(values: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(values) if bits == 4 else values


def _encode(key: str, tensor: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Stored entries of one tensor (float32 or int8 codes) and whether they are sparse."""
    nonzero = tensor != 0
    if _stores_sparse(tensor.numel(), int(nonzero.sum()), bits):
        return {f"{key}.bitmask": pack_bits(nonzero), f"{key}.values": _to_storage(tensor[nonzero], bits)}, True
    return {key: _to_storage(tensor, bits)}, False


def _decode(stored: dict, key: str, shape: tuple, bits: int, is_sparse: bool) -> torch.Tensor:
    """Inverse of ``_encode``: the tensor (float32, or int8 codes) of ``shape``."""
    numel = math.prod(shape)
    if not is_sparse:
        data = stored[key]
        return (unpack_int4(data, numel) if bits == 4 else data).reshape(shape)
    nonzero = unpack_bits(stored[f"{key}.bitmask"], numel)
    values = stored[f"{key}.values"]
    if bits == 4:
        values = unpack_int4(values, int(nonzero.sum()))
    dense = values.new_zeros(numel)
    dense[nonzero] = values
    return dense.reshape(shape)
