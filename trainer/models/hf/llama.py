"""The Llama family as transformers defines it (``LlamaForCausalLM``; Qwen2 and Mistral have the same layout):
RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, a tied or untied head.

Module names are transformers' own: ``model.embed_tokens``, ``model.layers.<i>.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``
(``model.rotary_emb`` holds no weights and stays on every pipeline stage). ``LlamaFamily`` is the only other
code that knows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from trainer.models.hf import HFConfig, HFDecoderFamily, HFDecoderLM, cache_argument, register_decoder, row_slices
from trainer.models.protocol import FINAL_HIDDEN, HeadFn, KVCache, UnitGroup, UnitSlice

# The dim of the residual stream's channels in each parameter, by its module's last name and the parameter's.
HIDDEN_DIMS = {
    "embed_tokens.weight": 1,
    "lm_head.weight": 1,
    **dict.fromkeys(("norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight"), 0),
    **dict.fromkeys(("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"), 0),  # OLMo 2, Gemma 3
    **dict.fromkeys(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight"), 1),
    **dict.fromkeys(("qkv_proj.weight", "gate_up_proj.weight"), 1),  # Phi-3's fused projections
    **dict.fromkeys(("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias"), 0),
}


class LlamaLM(HFDecoderLM):
    """A Llama-family causal LM. ``forward(idx, hidden_layers=...)`` returns logits, and hidden states if asked (0 =
    the embeddings, ``i`` = the output of decoder layer ``i``, ``FINAL_HIDDEN`` = after ``model.norm``)."""

    model: Any  # transformers' LlamaModel (Qwen2Model, MistralModel), its layers a dict keyed by index

    def __init__(self, hf_model: nn.Module, source: str | None):
        super().__init__(hf_model, source)
        self.model.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(self.model.layers)})

    def attention_kind(self, layer: int) -> str:
        """``full_attention`` or ``sliding_attention`` (Qwen2 names it per layer, Mistral for all of them)."""
        kinds = getattr(self.config, "layer_types", None)
        if kinds:
            return kinds[layer]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, kind: str) -> Any:
        """The rotary position embeddings of ``positions`` for layers of attention ``kind`` (one for all here)."""
        return self.model.rotary_emb(x, position_ids=positions)

    def family_logit_softcap(self) -> float | None:
        """``c`` where the config caps the logits at ``c * tanh(z / c)`` (Gemma's ``final_logit_softcapping``)."""
        return getattr(self.config, "final_logit_softcapping", None)

    def soft_capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits as the model gives them: the head's output, soft-capped where the config says so."""
        cap = self.family_logit_softcap()
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def attention_mask(self, kind: str, x: torch.Tensor, past: int) -> Any:
        """The mask of ``x``'s positions after ``past`` cached ones, as transformers builds it for ``kind``. A new
        position attends to every cached one under full attention (no mask); under a sliding window it gets its
        rows of the whole sequence's mask (transformers' sdpa attention ignores the window without one)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if past and kind == "full_attention":
            return None
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        length = past + x.shape[1]
        whole = x.new_empty(x.shape[0], length, x.shape[2]) if past else x  # only its shape, dtype and device
        positions = torch.arange(length, device=x.device).unsqueeze(0)
        mask = make(config=self.config, inputs_embeds=whole, attention_mask=None, cache=None, position_ids=positions)
        return mask[..., past:, :] if past and mask is not None else mask

    def forward(
        self,
        idx: torch.Tensor,
        hidden_layers: tuple[int, ...] = (),
        head: HeadFn | None = None,
        cache: KVCache | None = None,
    ):
        """Logits of token ids ``idx``. In a pipeline stage (``LlamaFamily`` deletes what it does not own) a float
        input is the previous stage's output, and a stage without ``lm_head`` returns its last layer's output. With
        ``cache`` (incremental decoding: the whole prompt first, then one position at a time), ``idx`` are the
        positions after the cached ones."""
        body = self.model
        x = idx if idx.is_floating_point() else body.embed_tokens(idx)
        past = 0 if cache is None else cache.length
        if past and x.shape[1] > 1:
            raise ValueError("incremental decoding reads one position at a time after the prompt")
        positions = torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0)
        masks: dict[str, Any] = {}
        rotary: dict[str, Any] = {}
        hidden = {0: x} if 0 in hidden_layers else {}
        extra = {} if cache is None else {cache_argument(body.layers["0"]): cache}
        for name, layer in body.layers.items():
            kind = self.attention_kind(int(name))
            if kind not in masks:
                masks[kind] = self.attention_mask(kind, x, past)
                rotary[kind] = self.rotary(x, positions, kind)
            x = layer(x, attention_mask=masks[kind], position_ids=positions, position_embeddings=rotary[kind], **extra)
            if int(name) + 1 in hidden_layers:
                hidden[int(name) + 1] = x
        if cache is not None:
            cache.length += x.shape[1]
        if self.lm_head is None:
            return x
        x = body.norm(x)
        if FINAL_HIDDEN in hidden_layers:
            hidden[FINAL_HIDDEN] = x
        cap = self.family_logit_softcap()
        if head is not None:  # a fused loss caps the logits as soft_capped does
            options = {} if cap is None else {"softcap": cap}
            logits = head(x, self.lm_head.weight, self.lm_head.bias, **options)
        else:
            logits = self.soft_capped(self.lm_head(x))
        return (logits, hidden) if hidden_layers else logits


class LlamaFamily(HFDecoderFamily):
    """Llama, Qwen2 and Mistral causal LMs through the model protocol."""

    name, model_class, layers_attr = "hf_llama", LlamaLM, "model.layers"
    model_types: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
    kv_cache = True
    maskable_heads = True  # see UnitGroup.maskable

    def wrap(self, hf_model: nn.Module, source: str | None) -> LlamaLM:
        return self.model_class(hf_model, source)  # a family of this layout: its own model class

    def embeddings(self, model: HFDecoderLM) -> list[str]:
        return ["model.embed_tokens"]

    def outputs(self, model: HFDecoderLM) -> list[str]:
        return ["model.norm", "lm_head"]

    def tied_weights(self, model: HFDecoderLM) -> list[str]:
        embed = cast(LlamaLM, model).model.embed_tokens
        return ["model.embed_tokens.weight"] if model.lm_head.weight is embed.weight else []

    def unit_groups(self, model: HFDecoderLM) -> list[UnitGroup]:
        """Per layer: key/value heads, each with its query heads (the q rows of its group, its k and v rows, its
        o_proj columns; a unit whose v rows and bias are masked outputs zero), and MLP channels (a gate row, an up
        row, a down column; zero when the gate or the up row is masked with its bias: SiLU(0) = 0)."""
        groups = []
        for name, layer in self.layers(model).items():
            a = f"model.layers.{name}.self_attn"
            slices = self.attention_slices(a, cast(Any, layer).self_attn)
            kv_heads = model.config.num_key_value_heads
            groups.append(UnitGroup("attn", int(name), kv_heads, slices, f"{a}.o_proj", self.maskable_heads))
            groups.append(self.mlp_group(int(name), cast(Any, layer).mlp))
        return groups

    def mlp_group(self, layer: int, mlp: Any) -> UnitGroup:
        """Layer ``layer``'s MLP channels."""
        m = f"model.layers.{layer}.mlp"
        return UnitGroup("mlp", layer, mlp.down_proj.in_features, self.mlp_slices(m, mlp), f"{m}.down_proj")

    def attention_slices(self, prefix: str, attn: Any) -> tuple[UnitSlice, ...]:
        """A layer's attention units: its key/value heads, each with its query heads."""
        head, group = attn.head_dim, attn.num_key_value_groups
        return (
            *row_slices(f"{prefix}.q_proj", attn.q_proj, unit_size=group * head),
            *row_slices(f"{prefix}.k_proj", attn.k_proj, unit_size=head),
            *row_slices(f"{prefix}.v_proj", attn.v_proj, unit_size=head, gate_part=0),
            UnitSlice(f"{prefix}.o_proj.weight", f"{prefix}.o_proj", dim=1, unit_size=group * head),
        )

    def mlp_slices(self, prefix: str, mlp: Any) -> tuple[UnitSlice, ...]:
        """A layer's MLP channels."""
        return (
            *row_slices(f"{prefix}.gate_proj", mlp.gate_proj, unit_size=1, gate_part=0),
            *row_slices(f"{prefix}.up_proj", mlp.up_proj, unit_size=1, gate_part=0),
            UnitSlice(f"{prefix}.down_proj.weight", f"{prefix}.down_proj", dim=1, unit_size=1),
        )

    def logit_softcap(self, model: HFDecoderLM) -> float | None:
        return cast(LlamaLM, model).family_logit_softcap()

    def thinned_config(self, model: HFDecoderLM, widths: dict[tuple[str, int], int]) -> HFConfig:
        """Every layer as wide as ``widths`` say for its kind (``thinned_widths`` made them one width a kind): the
        key/value heads with their query heads, the head size kept, and the MLP channels."""
        config = self.config(model)
        assert config.hf_config is not None  # a model's config is its Hugging Face config as a dict
        attn: Any = next(iter(self.layers(model).values())).self_attn
        by_kind = {kind: width for (kind, _), width in widths.items()}
        fields = config.hf_config | {
            "num_key_value_heads": by_kind["attn"],
            "num_attention_heads": by_kind["attn"] * attn.num_key_value_groups,
            "head_dim": attn.head_dim,
        }
        if "mlp" in by_kind:  # a mixture-of-experts model may have no dense MLP
            fields["intermediate_size"] = by_kind["mlp"]
        return dataclasses.replace(config, hf_config=fields)

    def hidden_dims(self, model: HFDecoderLM) -> dict[str, int]:
        """The embedding's and head's columns, the norms' weights, the projections' input or output features."""
        dims = {name: HIDDEN_DIMS.get(".".join(name.split(".")[-2:])) for name in model.state_dict()}
        return {name: dim for name, dim in dims.items() if dim is not None}

    def hidden_norms(self, model: HFDecoderLM) -> list[str]:
        """Every norm over the residual stream (``x / rms(x) * weight``)."""
        return [name for name, dim in self.hidden_dims(model).items() if dim == 0 and name.endswith("norm.weight")]

    def cut_config(
        self, model: HFDecoderLM, layers: list[int], widths: dict[tuple[str, int], int], hidden: int
    ) -> HFConfig:
        config = self.thinned_config(model, widths)
        assert config.hf_config is not None  # thinned_config's answer is a Hugging Face config as a dict
        fields = config.hf_config | {"num_hidden_layers": len(layers), "hidden_size": hidden}
        if fields.get("layer_types"):
            fields["layer_types"] = [fields["layer_types"][i] for i in layers]
        return dataclasses.replace(config, hf_config=fields)


register_decoder(LlamaFamily())
