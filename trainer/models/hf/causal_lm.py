"""A Hugging Face causal LM from a folder on local disk, as a Stillroom teacher.

A model of a Stillroom family (the Llama family, GPT-2: ``trainer.models.hf.DECODERS``, ``hf/llama.py``,
``hf/gpt2.py``) is loaded as that family's model, as a student would be, with the model protocol's layers and
hidden states. Any other causal LM is wrapped here (forward and hidden states only): ``module(x,
hidden_layers=(...))`` returns logits ``[B, T, V]`` (and hidden states by layer: 0 = the embeddings, ``i`` = the
output of block ``i``, before the final norm); ``HFTeacherFamily`` gives its width and its transformer layers
(FSDP2's units under ``teacher.placement=shard``). ``transformers`` is the optional extra ``hf``, imported only when
a model is read (``trainer.models.hf``) and never allowed to download anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from trainer.models.hf import (
    DECODERS,
    HFDecoderLM,
    first_line,
    gguf,
    import_transformers,
    load_pretrained,
    read_config,
    weights,
)
from trainer.models.protocol import ModelFamily, register


def spec(folder: Path) -> dict:
    """What config validation compares: {"arch": "hf_teacher", "config": {vocab_size, n_layer, n_embd, block_size}}."""
    return config_spec(read_config(folder), "hf")


def config_spec(config, source: str) -> dict:
    """``spec`` of a transformers causal LM's ``config``, read from a ``source`` ("hf" folder or "gguf" file)."""
    return {
        "arch": DECODERS[config.model_type].name if config.model_type in DECODERS else HFTeacherFamily.name,
        "source": source,
        "model_type": config.model_type,
        "config": {
            "vocab_size": config.vocab_size,
            "n_layer": config.num_hidden_layers,
            "n_embd": config.hidden_size,
            "block_size": getattr(config, "max_position_embeddings", None),
        },
    }


def _layers_path(model: nn.Module, n_layer: int) -> str:
    """The dotted name of the model's list of ``n_layer`` transformer layers (``transformer.h``, ``model.layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layer:
            return name
    raise ValueError(f"cannot find the {n_layer} transformer layers of this {type(model).__name__}")


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind the teacher interface (logits, hidden states by layer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # A transformers PreTrainedModel: its ``config`` fields (num_hidden_layers, hidden_size, ...) are dynamic.
        self.model: Any = model
        self.layers_path = _layers_path(model, cast(Any, model).config.num_hidden_layers)

    @property
    def blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.model.get_submodule(self.layers_path))

    def _record(self, hidden_layers: tuple[int, ...], hidden: dict[int, torch.Tensor]) -> list:
        """Hooks that store the input of block 0 (layer 0) and the output of block ``i - 1`` (layer ``i``)."""

        def block_input(_module, args, kwargs):
            hidden[0] = args[0] if args else kwargs["hidden_states"]

        def block_output(layer: int):
            def hook(_module, _args, output):
                hidden[layer] = output[0] if isinstance(output, tuple) else output

            return hook

        blocks = self.blocks
        handles = [blocks[0].register_forward_pre_hook(block_input, with_kwargs=True)] if 0 in hidden_layers else []
        handles += [blocks[layer - 1].register_forward_hook(block_output(layer)) for layer in hidden_layers if layer]
        return handles

    def forward(self, idx: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        hidden: dict[int, torch.Tensor] = {}
        handles = self._record(hidden_layers, hidden)
        try:
            logits = self.model(input_ids=idx, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return (logits, hidden) if hidden_layers else logits


class HFTeacherFamily(ModelFamily[HFCausalLM]):
    """Any ``transformers`` causal LM, as a teacher only: its transformer layers, width and vocabulary."""

    name, model_class = "hf_teacher", HFCausalLM

    def layers(self, model: HFCausalLM) -> dict[str, nn.Module]:
        return {str(i): layer for i, layer in enumerate(model.blocks)}

    def width(self, model: HFCausalLM) -> int:
        return model.model.config.hidden_size

    def vocab_size(self, model: HFCausalLM) -> int:
        return model.model.config.vocab_size


register(HFTeacherFamily())


def empty(folder: Path) -> nn.Module:
    """The folder's causal LM (as ``load`` gives it) with its parameters on the meta device and its buffers (rotary
    frequencies) computed: what ``trainer.distill.shard_load`` shards, then fills."""
    config = read_config(folder)
    model = empty_model(config)
    if config.model_type in DECODERS:
        return DECODERS[config.model_type].wrap(model, str(folder))
    return HFCausalLM(model)


def empty_gguf(file: Path) -> nn.Module:
    """The GGUF file's causal LM as ``teacher.load`` wraps it (``HFCausalLM``), on the meta device as ``empty``."""
    return HFCausalLM(empty_model(gguf.read_config(file)))


def empty_model(config) -> nn.Module:
    """transformers' fp32 causal LM of ``config``, its parameters on the meta device and its buffers computed."""
    from accelerate import init_empty_weights

    transformers = import_transformers()
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # accelerate's parameter hook undoes the tie made while the model was built
    return model.float()


def stored_as(model: nn.Module) -> Callable[[str], tuple[tuple[str, ...], bool]]:
    """A parameter's name -> the names a Hugging Face checkpoint may store it by (with or without the base model's
    prefix, ``transformer.`` or ``model.``), and whether it is stored transposed (GPT-2's ``Conv1D`` weights)."""
    if isinstance(model, HFDecoderLM):
        family, prefix = DECODERS[model.config.model_type], f"{model.base_model_prefix}."
        return lambda name: ((name, name.removeprefix(prefix)), family.stored_transposed(name))
    wrapped = cast(HFCausalLM, model)
    prefix = f"{wrapped.model.base_model_prefix}."

    def names(name: str) -> tuple[tuple[str, ...], bool]:
        key = name.removeprefix("model.")
        return (key, key.removeprefix(prefix)), False

    return names


def load(folder: Path) -> nn.Module:
    """The folder's causal LM in fp32 on CPU, eval mode, gradients off: a Stillroom family's model where it is one,
    else the wrapper."""
    transformers = import_transformers()
    config = read_config(folder)
    if config.model_type in DECODERS:
        model = load_pretrained(folder)
        model.requires_grad_(False)
        return model
    weights.check(folder, config)  # a WeightsError is a ValueError: one line naming the folder
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: transformers cannot load the model ({first_line(e)})") from None
    module = HFCausalLM(hf_model.float())
    module.requires_grad_(False)
    return module.eval()
