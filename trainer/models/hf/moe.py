"""Mixture-of-experts decoders of the Llama layout (transformers' ``Qwen3MoeForCausalLM``, ``MixtralForCausalLM``):
a layer's ``mlp`` is a router (``mlp.gate.weight``: a row per expert) and its experts, stored stacked
(``mlp.experts.gate_up_proj`` [experts, 2 x channels, width], ``mlp.experts.down_proj`` [experts, width, channels]);
each token goes to the ``num_experts_per_tok`` experts the router scores highest. Qwen3-MoE may keep dense MLPs in
some layers (``mlp_only_layers``), which are the Llama family's.

The experts of a layer are its units of kind ``experts``: a cut (``student.experts=K``) keeps the K experts that
matter most on the calibration batches, with their router rows, so the router picks among them as before. An
expert's importance is the mean over tokens of the norm of what it adds to the layer's output (its routing weight
times its output; zero where it is not chosen): its load and its output's size together. Masking an expert would
leave the router choosing it, so experts are cut, never pruned by masks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from trainer.models.hf import HFConfig, HFDecoderLM, register_decoder
from trainer.models.hf.llama import LlamaFamily, LlamaLM
from trainer.models.protocol import UnitGroup, UnitSlice

EXPERT_COUNT = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts"}  # the config field, by model type


class MoELM(LlamaLM):
    """A mixture-of-experts causal LM (its own class: a model's class names its family)."""


class MoEFamily(LlamaFamily):
    """Qwen3-MoE and Mixtral causal LMs through the model protocol (the Llama family's forward)."""

    name, model_class = "hf_moe", MoELM
    model_types = tuple(EXPERT_COUNT)

    def mlp_group(self, layer: int, mlp: Any) -> UnitGroup:
        """Layer ``layer``'s experts with their router rows (in a dense layer, its MLP channels)."""
        if not hasattr(mlp, "experts"):
            return super().mlp_group(layer, mlp)
        m = f"model.layers.{layer}.mlp"
        slices = (
            UnitSlice(f"{m}.experts.gate_up_proj", f"{m}.experts", dim=0, unit_size=1),
            UnitSlice(f"{m}.experts.down_proj", f"{m}.experts", dim=0, unit_size=1),
            UnitSlice(f"{m}.gate.weight", f"{m}.gate", dim=0, unit_size=1),
        )
        return UnitGroup("experts", layer, mlp.experts.num_experts, slices, f"{m}.experts", maskable=False)

    def unit_importance_hook(self, group: UnitGroup, totals: dict[tuple[str, int], torch.Tensor]) -> Any:
        """For the experts: a forward hook on the experts adding each expert's mean |contribution| to ``totals``."""
        if group.kind != "experts":
            return None

        def hook(experts: Any, args: tuple, _output: Any) -> None:
            hidden, chosen, weights = args
            added = torch.zeros(group.n_units, dtype=torch.float64)
            for expert in range(group.n_units):
                tokens, slot = torch.where(chosen == expert)
                if len(tokens) == 0:
                    continue
                gate, up = torch.nn.functional.linear(hidden[tokens], experts.gate_up_proj[expert]).chunk(2, dim=-1)
                out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
                added[expert] = (out * weights[tokens, slot, None]).norm(dim=-1).sum().double().cpu()
            totals[group.kind, group.layer] += added / hidden.shape[0]

        return hook

    def hidden_dims(self, model: HFDecoderLM) -> dict[str, int]:
        """The Llama family's, and the experts' and router's dims of the width."""
        dims = super().hidden_dims(model)
        for name in model.state_dict():
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")):
                dims[name] = 2 if name.endswith("gate_up_proj") else 1
        return dims

    def thinned_config(self, model: HFDecoderLM, widths: dict[tuple[str, int], int]) -> HFConfig:
        """As the Llama family's, with the experts each layer keeps (the router's choices per token at most them)."""
        config = super().thinned_config(model, widths)
        assert config.hf_config is not None  # a Hugging Face config as a dict
        experts = {kind: width for (kind, _), width in widths.items()}.get("experts")
        if experts is None:
            return config
        count = EXPERT_COUNT[model.config.model_type]
        fields = config.hf_config | {
            model.config.attribute_map.get(count, count): experts,  # Qwen3-MoE's is an alias of Mixtral's name
            "num_experts_per_tok": min(model.config.num_experts_per_tok, experts),
        }
        return dataclasses.replace(config, hf_config=fields)

    def cut_config(
        self, model: HFDecoderLM, layers: list[int], widths: dict[tuple[str, int], int], hidden: int
    ) -> HFConfig:
        """As the Llama family's, with Qwen3-MoE's dense layers (``mlp_only_layers``) numbered as the cut's."""
        config = super().cut_config(model, layers, widths, hidden)
        dense = getattr(model.config, "mlp_only_layers", None)
        if not dense:
            return config
        assert config.hf_config is not None  # a Hugging Face config as a dict
        fields = config.hf_config | {"mlp_only_layers": [new for new, old in enumerate(layers) if old in dense]}
        return dataclasses.replace(config, hf_config=fields)


register_decoder(MoEFamily())
