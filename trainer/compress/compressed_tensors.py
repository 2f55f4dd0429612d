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
equals the fake-quantized one bit for bit. The file is thus larger than ``compress/model_bytes`` by 2 bytes per
scale, 16 per ``weight_shape`` and the safetensors header.

Quantized embeddings, weight-tied Linears and modules that are not ``nn.Linear`` in transformers (GPT-2's
``Conv1D``) have no form here (``unsupported`` says which). Sparse weights are stored dense: compressed-tensors
0.20 and transformers 5 no longer read the ``sparse-bitmask`` format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
from safetensors.torch import save_file

from trainer.compress import qat
from trainer.models import CONFIG_FILE, WEIGHTS_FILE, unique_state_dict
from trainer.models.hf import HFDecoderFamily, HFDecoderLM, import_transformers
from trainer.models.protocol import family_of

QUANT_METHOD = "compressed-tensors"


def unsupported(model: nn.Module, specs: dict[str, dict]) -> str | None:
    """Why the quantized modules ``specs`` (module -> quant spec) of ``model`` have no compressed-tensors form, or
    None when they do (a Hugging Face student whose quantized modules are untied Linears in transformers too)."""
    family = family_of(model)
    if not isinstance(family, HFDecoderFamily):
        return f"{family.name} is not a Hugging Face family"
    transformers = import_transformers()
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(model.config)
    hf_modules = dict(hf_model.named_modules())
    for name in specs:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or type(hf_modules.get(name)) is not nn.Linear:
            return f"{name} is not a Linear in transformers"
        if qat.weight_is_tied(model, module):
            return f"{name} shares its weight"
    return None


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
    """Write ``model`` (unsharded, thinned) to ``folder`` in the compressed-tensors format, its ``masks`` applied and
    the modules of ``specs`` quantized; ``unsupported(model, specs)`` must be None."""
    family = family_of(model)
    assert isinstance(family, HFDecoderFamily)  # unsupported() said so
    folder.mkdir(parents=True, exist_ok=True)
    # config, generation config, tokenizer; the weights are written anew below
    family.save_pretrained(cast(HFDecoderLM, model), folder)
    tensors = {}
    for name, tensor in unique_state_dict(model).items():
        tensor = tensor.detach().float().cpu()
        if name in masks:
            tensor = tensor.masked_fill(~masks[name].cpu(), 0.0)
        tensors[name] = tensor
    state = compressed_state(family.to_hf_state(tensors), specs)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config_file = folder / CONFIG_FILE
    config = json.loads(config_file.read_text()) | {"quantization_config": quantization_config(specs)}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
