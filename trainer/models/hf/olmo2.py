"""OLMo 2 (transformers' ``Olmo2ForCausalLM``): the Llama layout with its norms after attention and after the MLP
(``post_attention_layernorm``, ``post_feedforward_layernorm``; none before them) and RMS norms of the whole query and
key projections (``self_attn.q_norm``, ``self_attn.k_norm``: one weight per row of q and of k).

Because q and k are normalised over all heads together, masking one head's rows rescales every other head's queries:
a head cannot be pruned by masks and then thinned with the function kept. Heads are cut (``student=from_teacher``,
where each unit takes its rows of both norms); MLP channels are pruned by masks too."""

from __future__ import annotations

from typing import Any

from trainer.models.hf import register_decoder
from trainer.models.hf.llama import LlamaFamily, LlamaLM
from trainer.models.protocol import UnitSlice


class Olmo2LM(LlamaLM):
    """An OLMo 2 causal LM (its own class: a model's class names its family)."""


class Olmo2Family(LlamaFamily):
    """OLMo 2 causal LMs through the model protocol (the Llama family's forward)."""

    name, model_class = "hf_olmo2", Olmo2LM
    model_types = ("olmo2",)
    maskable_heads = False

    def attention_slices(self, prefix: str, attn: Any) -> tuple[UnitSlice, ...]:
        head, group = attn.head_dim, attn.num_key_value_groups
        return (
            *super().attention_slices(prefix, attn),
            UnitSlice(f"{prefix}.q_norm.weight", f"{prefix}.q_norm", dim=0, unit_size=group * head),
            UnitSlice(f"{prefix}.k_norm.weight", f"{prefix}.k_norm", dim=0, unit_size=head),
        )


register_decoder(Olmo2Family())
