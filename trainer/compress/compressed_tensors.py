"""A Hugging Face student with fake-quantized Linears, written in the compressed-tensors format (what llm-compressor
writes; transformers and vLLM load it).

The folder is the dense export's (``config.json``, ``generation_config.json``, tokenizer files) with the quantized
Linears' weights replaced, and ``config.json`` given a ``quantization_config`` (``quant_method:
compressed-tensors``), one config group per scheme naming its modules. Weights are symmetric, as Stillroom's QAT
trains them: int8 per output channel (``strategy: channel``) or int4 per group (``strategy: group``), with the very
codes the fake quantizer rounds to (``qat.quantize_weight``). Per module:

- weight-only (``pack-quantized``): ``weight_packed`` int32, ``32 / bits`` codes per word, offset by ``2**(bits-1)``
  (compressed-tensors' ``pack_to_int32`` layout), ``weight_scale`` ``(rows, groups)``, ``weight_shape`` int64;
- with int8 per-token activations (``int-quantized``): ``weight`` int8 codes, ``weight_scale``; the activations are
  dynamic asymmetric per token, as in QAT.

Scales are stored in the model's dtype (fp32), as llm-compressor does: they hold the fp16 values QAT rounds them
to, and compressed-tensors dequantizes in the scale's dtype, so ``codes * scale`` is exact and the loaded weight
equals the fake-quantized one bit for bit.

Quantized modules transformers 5.24 cannot load from this format are written dense in fp32, holding their
fake-quantized values, so transformers still computes the fake-quant student: embeddings (a packed ``nn.Embedding``
fails in transformers' weight init: the module has no ``weight`` left), a head tied to the embedding, and GPT-2's
``Conv1D`` projections (compressed-tensors quantizes only ``nn.Linear`` and ``nn.Embedding``). A dense module's
int8 activation fake-quant has no form there either: transformers runs its inputs in float (a note line says so).

Sparse weights are stored dense: compressed-tensors 0.20 and transformers 5 no longer read the ``sparse-bitmask``
format. ``tensor_bytes`` is each tensor's exact size in the file, which is what ``compress/model_bytes`` sums for a
Hugging Face student; the file adds only its safetensors header.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
from safetensors.torch import save_file

from trainer.compress import qat
from trainer.models import CONFIG_FILE, WEIGHTS_FILE, unique_state_dict
from trainer.models.hf import HFDecoderFamily, HFDecoderLM, config_from_dict, import_transformers
from trainer.models.protocol import family_of

QUANT_METHOD = "compressed-tensors"
FP32_BYTES = 4
WEIGHT_SHAPE_BYTES = 16  # int64 [rows, row_len]


def compressed_specs(model: nn.Module, specs: dict[str, dict]) -> dict[str, dict]:
    """The quantized modules of ``specs`` (module -> quant spec) that the compressed-tensors format holds: those that
    are untied ``nn.Linear`` modules in transformers too. The others (embeddings, a tied head, GPT-2's ``Conv1D``) are
    written dense, holding their fake-quantized values."""
    held = untied_linears(cast(HFDecoderLM, model).config.to_json_string(use_diff=False))
    return {name: spec for name, spec in specs.items() if name in held}


@functools.lru_cache(maxsize=8)
def untied_linears(config_json: str) -> frozenset[str]:
    """The modules that are untied ``nn.Linear`` in transformers' model of the config ``config_json`` (built on the
    meta device once per config: the metrics ask at every log step)."""
    transformers = import_transformers()
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config_from_dict(json.loads(config_json)))
    return frozenset(
        name
        for name, module in hf_model.named_modules()
        if type(module) is nn.Linear and not qat.weight_is_tied(hf_model, module)
    )


def tensor_bytes(shape: tuple[int, ...], spec: dict | None) -> int:
    """Bytes a tensor of ``shape`` takes in the file: fp32, or for the weight of a module of ``compressed_specs``
    its codes (packed in int32 words, or int8), fp32 scales and, when packed, its int64 ``weight_shape``."""
    numel = math.prod(shape)
    if spec is None:
        return FP32_BYTES * numel
    rows, row_len = shape
    bits = spec["weight_bits"]
    scales = rows * (row_len // (row_len if bits == 8 else spec["group_size"]))
    if spec["act_bits"]:
        return numel + FP32_BYTES * scales
    return FP32_BYTES * (rows * math.ceil(row_len * bits / 32) + scales) + WEIGHT_SHAPE_BYTES


def scheme(spec: dict) -> dict:
    """The compressed-tensors scheme (weights, input activations, format) of a Stillroom quant spec."""
    bits = spec["weight_bits"]
    grouped = bits == 4
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if grouped else "channel",
        "group_size": spec["group_size"] if grouped else None,
        "dynamic": False,
    }
    activations = (
        {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True, "group_size": None}
        if spec["act_bits"]
        else None
    )
    fmt = "int-quantized" if spec["act_bits"] else "pack-quantized"
    return {"weights": weights, "input_activations": activations, "format": fmt}


def quantization_config(specs: dict[str, dict]) -> dict:
    """``config.json``'s ``quantization_config``: one config group per scheme, targeting its modules by name."""
    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict] = {}
    for name, spec in specs.items():
        key = json.dumps(scheme(spec), sort_keys=True)
        groups.setdefault(key, {**scheme(spec), "targets": []})["targets"].append(name)
    formats = {group["format"] for group in groups.values()}
    config = QuantizationConfig.model_validate(
        {
            "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
        }
    )
    return {"version": __version__, "quant_method": QUANT_METHOD, **config.model_dump(exclude={"quant_method"})}


def compressed_state(tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The Hugging Face state ``tensors`` (fp32, masked) with each quantized module's weight replaced by its codes,
    scales and shape (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = dict(tensors)
    for name, spec in specs.items():
        weight = state.pop(f"{name}.weight")
        codes, scale = qat.quantize_weight(weight, spec["weight_bits"], spec["group_size"])
        if spec["act_bits"]:
            state[f"{name}.weight"] = codes.contiguous()
        else:
            state[f"{name}.weight_packed"] = pack_to_int32(codes, spec["weight_bits"])
            state[f"{name}.weight_shape"] = torch.tensor(weight.shape)
        state[f"{name}.weight_scale"] = scale.to(weight.dtype).contiguous()
    return state


def save(model: nn.Module, folder: Path, specs: dict[str, dict], masks: dict[str, torch.Tensor]) -> Path:
    """Write the Hugging Face student ``model`` (unsharded, thinned) to ``folder``, its ``masks`` applied and the
    modules of ``specs`` quantized: in the compressed-tensors format where it holds them, dense elsewhere."""
    family = family_of(model)
    assert isinstance(family, HFDecoderFamily), f"{family.name} is not a Hugging Face family"
    folder.mkdir(parents=True, exist_ok=True)
    # config, generation config, tokenizer; the weights are written anew below
    family.save_pretrained(cast(HFDecoderLM, model), folder)
    tensors = {}
    for name, tensor in unique_state_dict(model).items():
        tensor = tensor.detach().float().cpu()
        if name in masks:
            tensor = tensor.masked_fill(~masks[name].cpu(), 0.0)
        tensors[name] = tensor
    compressed = compressed_specs(model, specs)
    dense_quantized = {}  # weight name -> spec; a weight shared by modules (a tied head) once, as it is fake-quantized
    for name, spec in specs.items():
        if name not in compressed:
            sharers = qat.weight_sharers(model, model.get_submodule(name))
            dense_quantized[next(f"{n}.weight" for n in sharers if f"{n}.weight" in tensors)] = spec
    for key, spec in dense_quantized.items():
        codes, scale = qat.quantize_weight(tensors[key], spec["weight_bits"], spec["group_size"])
        tensors[key] = qat.dequantize_weight(codes, scale)
    unquantized_inputs = [name for name, spec in specs.items() if spec["act_bits"] and name not in compressed]
    if unquantized_inputs:
        print(
            f"note: {len(unquantized_inputs)} modules ({unquantized_inputs[0]}, ...) are stored dense, so their int8 "
            "activation fake-quant is not in the export (transformers runs their inputs in float)",
            file=sys.stderr,
        )
    state = compressed_state(family.to_hf_state(tensors), compressed)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if compressed:
        config_file = folder / CONFIG_FILE
        config = json.loads(config_file.read_text()) | {"quantization_config": quantization_config(compressed)}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
