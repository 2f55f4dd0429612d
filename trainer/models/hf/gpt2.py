"""GPT-2 as transformers defines it (``GPT2LMHeadModel``): learned position embeddings, pre-LayerNorm blocks with a
fused q/k/v projection, a GELU MLP, a tied head.

Module names are transformers' own: ``transformer.{wte, wpe}``, ``transformer.h.<i>.{ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``transformer.ln_f``, ``lm_head``. transformers stores those four
projections as ``Conv1D`` (a Linear whose weight is transposed, ``[in, out]``); here they are ``nn.Linear``, so
that compression (pruning, QAT, quantized export) treats them like every other Linear, and ``to_hf_state``
transposes them back for a Hugging Face checkpoint. ``GPT2Family`` is the only other code that knows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from trainer.models.hf import HFConfig, HFDecoderFamily, HFDecoderLM, cache_argument, register_decoder, row_slices
from trainer.models.protocol import FINAL_HIDDEN, HeadFn, KVCache, UnitGroup, UnitSlice, Unsupported

PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's Conv1D modules in transformers
CONV1D_WEIGHTS = tuple(f".{projection}.weight" for projection in PROJECTIONS)


class GPT2LM(HFDecoderLM):
    """A GPT-2 causal LM. ``forward(idx, hidden_layers=...)`` returns logits, and hidden states if asked (0 = the
    embeddings, ``i`` = the output of block ``i``, ``FINAL_HIDDEN`` = after ``transformer.ln_f``)."""

    transformer: Any  # transformers' GPT2Model, its blocks a dict keyed by index

    def __init__(self, hf_model: nn.Module, source: str | None):
        super().__init__(hf_model, source)
        self.transformer.h = nn.ModuleDict({str(i): block for i, block in enumerate(self.transformer.h)})
        for block in self.transformer.h.values():
            for projection in PROJECTIONS:
                block.set_submodule(projection, _linear(block.get_submodule(projection)))

    def forward(
        self,
        idx: torch.Tensor,
        hidden_layers: tuple[int, ...] = (),
        head: HeadFn | None = None,
        cache: KVCache | None = None,
    ):
        """Logits of token ids ``idx``. In a pipeline stage (``GPT2Family`` deletes what it does not own) a float
        input is the previous stage's output, and a stage without ``lm_head`` returns its last block's output. With
        ``cache`` (incremental decoding: the whole prompt first, then one position at a time), ``idx`` are the
        positions after the cached ones."""
        from transformers.masking_utils import create_causal_mask

        body = self.transformer
        past = 0 if cache is None else cache.length
        if past and idx.shape[1] > 1:
            raise ValueError("incremental decoding reads one position at a time after the prompt")
        positions = torch.arange(past, past + idx.shape[1], device=idx.device).unsqueeze(0)
        x = idx if idx.is_floating_point() else body.drop(body.wte(idx) + body.wpe(positions))
        # one new position attends to every cached one: no mask
        mask = (
            None
            if past
            else create_causal_mask(
                config=self.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions
            )
        )
        extra = {} if cache is None else {cache_argument(body.h["0"]): cache}
        hidden = {0: x} if 0 in hidden_layers else {}
        for name, block in body.h.items():
            x = block(x, attention_mask=mask, **extra)
            if int(name) + 1 in hidden_layers:
                hidden[int(name) + 1] = x
        if cache is not None:
            cache.length += x.shape[1]
        if self.lm_head is None:
            return x
        x = body.ln_f(x)
        if FINAL_HIDDEN in hidden_layers:
            hidden[FINAL_HIDDEN] = x
        logits = self.lm_head(x) if head is None else head(x, self.lm_head.weight, self.lm_head.bias)
        return (logits, hidden) if hidden_layers else logits


def _linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what transformers' ``Conv1D`` ``conv`` does, sharing its bias."""
    weight, bias = cast(torch.Tensor, conv.weight), cast(nn.Parameter | None, conv.bias)  # weight: [in, out]
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t().contiguous())
    if bias is not None:
        linear.bias = bias
    return linear


class GPT2Family(HFDecoderFamily):
    """GPT-2 causal LMs through the model protocol."""

    name, model_class, layers_attr = "hf_gpt2", GPT2LM, "transformer.h"
    model_types = ("gpt2",)
    kv_cache = True

    def wrap(self, hf_model: nn.Module, source: str | None) -> GPT2LM:
        return GPT2LM(hf_model, source)

    def to_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The four projections' weights transposed back to ``Conv1D``'s ``[in, out]``."""
        return {
            name: tensor.t().contiguous() if self.stored_transposed(name) else tensor for name, tensor in state.items()
        }

    def stored_transposed(self, name: str) -> bool:
        """The four projections' weights: ``Conv1D``'s ``[in, out]`` in a checkpoint."""
        return name.startswith("transformer.h.") and name.endswith(CONV1D_WEIGHTS)

    def embeddings(self, model: HFDecoderLM) -> list[str]:
        return ["transformer.wte", "transformer.wpe"]

    def outputs(self, model: HFDecoderLM) -> list[str]:
        return ["transformer.ln_f", "lm_head"]

    def tied_weights(self, model: HFDecoderLM) -> list[str]:
        wte = cast(GPT2LM, model).transformer.wte
        return ["transformer.wte.weight"] if model.lm_head.weight is wte.weight else []

    def unit_groups(self, model: HFDecoderLM) -> list[UnitGroup]:
        """Per block: the attention heads (their q, k and v rows of ``c_attn``, their ``c_proj`` columns; a head
        whose v rows and bias are masked outputs zero) and the MLP channels (a ``c_fc`` row, a ``c_proj`` column;
        zero when the row and its bias are masked: GELU(0) = 0)."""
        groups = []
        for name, block in self.layers(model).items():
            a, m = f"transformer.h.{name}.attn", f"transformer.h.{name}.mlp"
            attn: Any = block.attn
            groups.append(
                UnitGroup(
                    "attn",
                    int(name),
                    attn.num_heads,
                    (
                        *row_slices(f"{a}.c_attn", attn.c_attn, unit_size=attn.head_dim, parts=3, gate_part=2),
                        UnitSlice(f"{a}.c_proj.weight", f"{a}.c_proj", dim=1, unit_size=attn.head_dim),
                    ),
                    out_module=f"{a}.c_proj",
                )
            )
            mlp: Any = block.mlp
            groups.append(
                UnitGroup(
                    "mlp",
                    int(name),
                    mlp.c_fc.out_features,
                    (
                        *row_slices(f"{m}.c_fc", mlp.c_fc, unit_size=1, gate_part=0),
                        UnitSlice(f"{m}.c_proj.weight", f"{m}.c_proj", dim=1, unit_size=1),
                    ),
                    out_module=f"{m}.c_proj",
                )
            )
        return groups

    def thinned_widths(self, model: HFDecoderLM, alive: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """MLP channels as for every Hugging Face family (one width); every attention head, since GPT-2's config
        derives the head size from the model width and the head count (a pruned head stays, computing zero)."""
        widths = super().thinned_widths(model, alive)
        heads = model.config.n_head
        return {(kind, layer): heads if kind == "attn" else width for (kind, layer), width in widths.items()}

    def thinned_config(self, model: HFDecoderLM, widths: dict[tuple[str, int], int]) -> HFConfig:
        config = self.config(model)
        assert config.hf_config is not None  # a model's config is its Hugging Face config as a dict
        return dataclasses.replace(config, hf_config=config.hf_config | {"n_inner": widths["mlp", 0]})

    def hidden_dims(self, model: HFDecoderLM) -> dict[str, int]:
        raise Unsupported("GPT-2 keeps its width: its config derives the head size from the width and the head count")

    def cut_config(
        self, model: HFDecoderLM, layers: list[int], widths: dict[tuple[str, int], int], hidden: int
    ) -> HFConfig:
        """Fewer blocks and MLP channels; every head and the model width kept (see ``hidden_dims``)."""
        config = self.thinned_config(model, widths)
        assert config.hf_config is not None  # thinned_config's answer is a Hugging Face config as a dict
        return dataclasses.replace(config, hf_config=config.hf_config | {"n_layer": len(layers)})


register_decoder(GPT2Family())
