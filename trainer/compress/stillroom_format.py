"""The student as it is shipped: integer weights, bitmask-sparse tensors, four blobs and a small config.

The stored tensors are the plain model's state dict without tied duplicates (GPT's head reuses
``tok_emb.weight``), in state-dict order. ``model.safetensors`` holds up to four flat blobs, each
the concatenation of its parts over the stored tensors:

- ``codes`` (int8): a quantized weight's integer codes; int4 two per byte (see ``pack_int4``),
  each tensor padded to a whole byte.
- ``scales`` (fp16): a quantized weight's symmetric scales ``(rows, row_len // group_size)``,
  row-major; there are no zero points.
- ``floats`` (fp32): every other tensor (LayerNorm, biases, unquantized weights).
- ``bitmasks`` (uint8): for a tensor stored sparse (when that is smaller, see ``storage_bytes``),
  bit ``i`` of byte ``j`` is element ``8j + i`` of the flattened tensor, each tensor padded to a
  whole byte; its ``codes`` / ``floats`` part then holds only the nonzero elements, row-major.

No offsets are stored: ``load_compressed`` rebuilds the architecture from ``config.json``, walks the
same tensors in the same order and takes from each blob what the tensor's shape, scheme and sparsity
imply (a sparse tensor's value count is its bitmask's popcount), then checks every blob is used up.

``config.json`` is compact JSON: ``{"format": "stillroom-compressed", "arch", "config", "quant":
{scheme: [module, ...]}, "sparse": [tensor key, ...]}``. A scheme name spells a quant spec: ``w8``
(int8 per row), ``w4g32`` (int4 per group of 32), plus ``a8`` for int8 per-token activations.
Quantized Linears load as ``QuantizedLinear``; quantized embeddings are dequantized into a plain
``nn.Embedding`` (GPT's head, tied to it, reads the same table). LayerNorm and other float tensors
stay fp32: fp16 would break the 1e-4 agreement with the trained model for about 2% of the bytes.
torchao's converted CPU kernels are not used: our own dequantize-then-matmul reproduces the
fake-quantized forward bit for bit with the same primitives.
"""

from __future__ import annotations

import json
import math
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from trainer.compress.qat import (
    FLOAT_BITS,
    SCALE_DTYPE,
    activation_fake_quant_config,
    dequantize_weight,
    is_quantized,
    prepare,
    quant_spec,
    quantize_weight,
    set_enabled,
    weight_is_tied,
    weight_sharers,
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
SCALE_BYTES = 2  # fp16 scales
BLOB_DTYPES = {"codes": torch.int8, "scales": SCALE_DTYPE, "floats": torch.float32, "bitmasks": torch.uint8}
SCHEME_PATTERN = re.compile(r"w(8|4)(?:g(\d+))?(?:a(8))?")


# ----------------------------------------------------------------------------- sizes


def storage_bytes(numel: int, shape: tuple, nonzero: int, weight_bits: int, group_size: int) -> int:
    """Bytes one tensor adds to the blobs: values (dense, or bitmask + nonzeros when that is
    smaller) plus fp16 scales. ``weight_bits`` 32 = fp32; 8 = one scale per row; 4 = one per group."""
    return _value_bytes(numel, nonzero, weight_bits) + SCALE_BYTES * _scale_count(numel, shape, weight_bits, group_size)


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


# ----------------------------------------------------------------------------- schemes


def scheme_name(spec: dict) -> str:
    """``w8`` / ``w4g<group>``, plus ``a8`` with int8 activations (the int8 group is always the row)."""
    group = f"g{spec['group_size']}" if spec["weight_bits"] == 4 else ""
    return f"w{spec['weight_bits']}{group}" + ("a8" if spec["act_bits"] else "")


def parse_scheme(name: str, row_len: int) -> dict:
    """The quant spec a ``scheme_name`` spells, for a weight whose rows hold ``row_len`` elements."""
    match = SCHEME_PATTERN.fullmatch(name)
    if match is None or (match[1] == "4") != (match[2] is not None):
        raise ValueError(f"unknown quant scheme {name!r}")
    bits = int(match[1])
    return {
        "weight_bits": bits,
        "group_size": int(match[2]) if bits == 4 else row_len,
        "act_bits": 8 if match[3] else 0,
    }


# ----------------------------------------------------------------------------- runtime module


class QuantizedLinear(nn.Module):
    """Inference linear holding int8 codes (int4: packed, see ``pack_int4``) and fp16 scales.

    Dequantizes for every matmul and, when ``act_bits == 8``, first applies torchao's int8
    per-token dynamic activation fake-quant, exactly like the QAT model's FakeQuantizedLinear.
    """

    qdata: torch.Tensor  # buffers (registered in __init__)
    scale: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: bool, *, weight_bits: int, group_size: int, act_bits: int
    ):
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
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=SCALE_DTYPE))
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_bits={self.weight_bits}, group_size={self.group_size}, act_bits={self.act_bits}"
        )


# ----------------------------------------------------------------------------- export / load


def export_compressed(model: nn.Module, out_dir: str | Path, masks: dict[str, torch.Tensor], quant: dict) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of the shipped student to ``out_dir``.

    ``quant`` (module -> quant_spec) is merged over the specs of the model's QAT-prepared modules;
    a plain Linear or Embedding listed there is quantized post-training. ``masks`` (parameter name
    -> bool) are applied before quantization. Pass an unsharded model (e.g. rebuilt from a gathered
    state dict).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = _export_specs(model, quant)
    state = unique_state_dict(model)
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise ValueError(f"masks for tensors that are not in the exported state: {unknown}")
    blobs = BlobWriter()
    sparse = []
    for key, tensor in state.items():
        tensor = tensor.float()
        if key in masks:
            tensor = tensor.masked_fill(~masks[key].to(tensor.device, torch.bool), 0.0)
        module_name = _quantized_module_of(key, specs)
        if blobs.add(tensor.cpu(), None if module_name is None else specs[module_name]):
            sparse.append(key)
    save_file(blobs.tensors(), str(out / WEIGHTS_FILE))
    quant_by_scheme: dict[str, list[str]] = {}
    for name, spec in specs.items():
        quant_by_scheme.setdefault(scheme_name(spec), []).append(name)
    meta = {"format": COMPRESSED_FORMAT, **model_spec(model), "quant": quant_by_scheme, "sparse": sparse}
    (out / CONFIG_FILE).write_text(json.dumps(meta, separators=(",", ":")))
    return out


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild an export of ``export_compressed`` as a runnable CPU model in eval mode."""
    meta = read_export_config(path)
    if meta["format"] != COMPRESSED_FORMAT:
        raise ValueError(f"{path}: format {meta['format']!r} is not {COMPRESSED_FORMAT!r}")
    model = build_from_spec(meta)
    specs = {
        name: parse_scheme(scheme, cast(torch.Tensor, model.get_submodule(name).weight).shape[1])
        for scheme, names in meta["quant"].items()
        for name in names
    }
    sparse = set(meta["sparse"])
    blobs = BlobReader(load_file(str(Path(path) / WEIGHTS_FILE)))
    state = {}
    for key, template in unique_state_dict(model).items():
        module_name = _quantized_module_of(key, specs)
        spec = None if module_name is None else specs[module_name]
        values, scale = blobs.take_tensor(tuple(template.shape), spec, key in sparse)
        if spec is None:
            state[key] = values
            continue
        assert module_name is not None and scale is not None  # a quantized tensor: its module's, with scales
        if isinstance(model.get_submodule(module_name), nn.Embedding):
            state[key] = dequantize_weight(values, scale)
        else:
            linear = cast(nn.Linear, model.get_submodule(module_name))  # quantized: an Embedding or a Linear
            model.set_submodule(
                module_name, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, **spec)
            )
            state[f"{module_name}.qdata"] = pack_int4(values) if spec["weight_bits"] == 4 else values
            state[f"{module_name}.scale"] = scale
    blobs.check_used_up(path)
    load_weights(model, state)
    return model.eval()


class BlobWriter:
    """Appends each tensor's parts to the blobs (see the module docstring)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in BLOB_DTYPES}

    def add(self, tensor: torch.Tensor, spec: dict | None) -> bool:
        """Store fp32 ``tensor``, quantized by ``spec`` unless None; returns whether it went sparse."""
        values, bits = tensor, FLOAT_BITS
        if spec is not None:
            bits = spec["weight_bits"]
            values, scale = quantize_weight(tensor, bits, spec["group_size"])
            self.parts["scales"].append(scale.flatten())
        nonzero = values != 0
        sparse = _stores_sparse(values.numel(), int(nonzero.sum()), bits)
        if sparse:
            self.parts["bitmasks"].append(pack_bits(nonzero))
            values = values[nonzero]
        if bits == FLOAT_BITS:
            self.parts["floats"].append(values.flatten())
        else:
            self.parts["codes"].append(pack_int4(values).view(torch.int8) if bits == 4 else values.flatten())
        return sparse

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty blobs, each one flat contiguous tensor of its dtype."""
        return {
            name: torch.cat(parts).to(BLOB_DTYPES[name]).contiguous() for name, parts in self.parts.items() if parts
        }


class BlobReader:
    """Takes each tensor's parts from the blobs, in the order ``BlobWriter`` wrote them."""

    def __init__(self, blobs: dict[str, torch.Tensor]):
        self.blobs = blobs
        self.used = dict.fromkeys(blobs, 0)

    def take(self, name: str, count: int) -> torch.Tensor:
        blob = self.blobs.get(name, torch.empty(0, dtype=BLOB_DTYPES[name]))
        start = self.used.get(name, 0)
        if start + count > blob.numel():
            raise ValueError(f"{WEIGHTS_FILE}: blob {name!r} ends before the tensors that config.json describes")
        self.used[name] = start + count
        return blob[start : start + count]

    def take_tensor(self, shape: tuple, spec: dict | None, sparse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 values, None) or (int8 codes, fp16 scales) of one tensor of ``shape``."""
        numel = math.prod(shape)
        nonzero = unpack_bits(self.take("bitmasks", math.ceil(numel / 8)), numel) if sparse else None
        count = numel if nonzero is None else int(nonzero.sum())
        scale = None
        if spec is None:
            values = self.take("floats", count)
        else:
            bits, group = spec["weight_bits"], spec["group_size"]
            scale = self.take("scales", shape[0] * (shape[1] // group)).view(shape[0], -1)
            codes = self.take("codes", _dense_bytes(count, bits))
            values = unpack_int4(codes.view(torch.uint8), count) if bits == 4 else codes
        if nonzero is not None:
            values = values.new_zeros(numel).masked_scatter(nonzero, values)
        return values.reshape(shape), scale

    def check_used_up(self, path: str | Path) -> None:
        left = {
            name: blob.numel() - self.used[name] for name, blob in self.blobs.items() if blob.numel() != self.used[name]
        }
        if left:
            raise ValueError(f"{path}: {WEIGHTS_FILE} holds data that config.json does not describe: {left}")


def linear_targets(model: nn.Module, targets: list[str] | None) -> dict[str, list[str]]:
    """The Linear modules each of ``targets`` (fnmatch patterns over module names; None = all: ``"*"``) matches, by
    pattern. Weight-tied Linears (GPT's head) are never matched: their weight is the embedding's."""
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not weight_is_tied(model, module)
    ]
    return {pattern: [name for name in linears if fnmatch(name, pattern)] for pattern in targets or ["*"]}


def quantize_dense(
    model: nn.Module, weight_bits: int = 8, group_size: int = 32, act_bits: int = 8, targets: list[str] | None = None
) -> nn.Module:
    """Post-training quantization: prepare the Linear modules matching ``targets`` (``linear_targets``) and enable
    fake-quant. Returns ``model``, modified in place; export it with ``export_compressed``."""
    matched = linear_targets(model, targets)
    names = sorted({name for names in matched.values() for name in names})
    prepare(model, names, weight_bits=weight_bits, group_size=group_size, act_bits=act_bits)
    set_enabled(model, True)
    return model


def _export_specs(model: nn.Module, quant: dict) -> dict:
    """Quant specs of the QAT modules overridden by ``quant``, normalised and checked, by module name.

    A weight shared by several modules is stored once, under the first; the others (GPT's head)
    must be quantized with the same weight scheme, weight-only, and are left out: they load as
    plain modules over the shared dequantized weight.
    """
    requested = {name: quant_spec(module) for name, module in model.named_modules() if is_quantized(module)}
    specs = {name: _normalized_spec(model, name, spec) for name, spec in (requested | dict(quant)).items()}
    shared = {tuple(weight_sharers(model, model.get_submodule(name))) for name in specs}
    for owner, *sharers in shared:
        for sharer in sharers:
            spec = specs.pop(sharer, None)
            if (
                spec is None
                or owner not in specs
                or spec["act_bits"]
                or _weight_scheme(spec) != _weight_scheme(specs[owner])
            ):
                raise ValueError(
                    f"{sharer!r} shares its weight with {owner!r}: quantize both with the same "
                    f"weight scheme and {sharer!r} without activation quantization, or neither"
                )
    return dict(sorted(specs.items()))


def _normalized_spec(model: nn.Module, name: str, spec: dict) -> dict:
    module = model.get_submodule(name)
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise ValueError(f"cannot quantize {name!r}: only Linear and Embedding weights are supported")
    bits, group, act_bits = spec["weight_bits"], spec["group_size"], spec.get("act_bits", 0)
    row_len = module.weight.shape[1]
    if bits == 8:
        group = row_len
    elif bits != 4 or group < 2 or row_len % group:
        raise ValueError(f"{name!r}: unsupported quant spec {spec} for rows of {row_len}")
    if act_bits not in (0, 8) or (act_bits and isinstance(module, nn.Embedding)):
        raise ValueError(f"{name!r}: unsupported act_bits={act_bits}")
    return {"weight_bits": bits, "group_size": group, "act_bits": act_bits}


def _weight_scheme(spec: dict) -> tuple[int, int]:
    return spec["weight_bits"], spec["group_size"]


def _quantized_module_of(key: str, specs: dict) -> str | None:
    module_name, _, leaf = key.rpartition(".")
    return module_name if leaf == "weight" and module_name in specs else None
