"""Phi-3 and Phi-4 (transformers' ``Phi3ForCausalLM``): the Llama layout with fused projections. A layer's
``self_attn.qkv_proj`` stacks the query rows of every head, then the key rows, then the value rows; ``mlp.gate_up_proj``
stacks the gate rows, then the up rows. A key/value head is a unit of the three runs (its query heads' rows, its key
rows, its value rows); an MLP channel is a unit of both runs (its gate row and its up row)."""

from __future__ import annotations

from typing import Any

from trainer.models.hf import register_decoder, row_slices
from trainer.models.hf.llama import LlamaFamily, LlamaLM
from trainer.models.protocol import UnitSlice


class Phi3LM(LlamaLM):
    """A Phi-3 causal LM (its own class: a model's class names its family)."""


class Phi3Family(LlamaFamily):
    """Phi-3/Phi-4 causal LMs through the model protocol (the Llama family's forward and cuts)."""

    name, model_class = "hf_phi3", Phi3LM
    model_types = ("phi3",)

    def attention_slices(self, prefix: str, attn: Any) -> tuple[UnitSlice, ...]:
        head, group = attn.head_dim, attn.num_key_value_groups
        return (
            *row_slices(f"{prefix}.qkv_proj", attn.qkv_proj, unit_size=head, parts=(group, 1, 1), gate_part=2),
            UnitSlice(f"{prefix}.o_proj.weight", f"{prefix}.o_proj", dim=1, unit_size=group * head),
        )

    def mlp_slices(self, prefix: str, mlp: Any) -> tuple[UnitSlice, ...]:
        return (
            *row_slices(f"{prefix}.gate_up_proj", mlp.gate_up_proj, unit_size=1, parts=2, gate_part=1),
            UnitSlice(f"{prefix}.down_proj.weight", f"{prefix}.down_proj", dim=1, unit_size=1),
        )


register_decoder(Phi3Family())
