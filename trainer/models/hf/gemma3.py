"""Gemma 3's text decoder (transformers' ``Gemma3ForCausalLM``, model type ``gemma3_text``): the Llama layout with
four norms a layer (before and after attention and the MLP), per-head query and key norms, embeddings scaled by
the square root of the width (inside ``embed_tokens``), sliding-window and global layers (``config.layer_types``)
with rotary embeddings of their own for each kind, and, where the config sets ``final_logit_softcapping``, logits
soft-capped at ``c * tanh(z / c)`` (the fused loss caps them too)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.models.hf import HFDecoderLM, register_decoder
from trainer.models.hf.llama import LlamaFamily, LlamaLM


class Gemma3LM(LlamaLM):
    """A Gemma 3 causal LM: the Llama family's forward with one rotary embedding per attention kind."""

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, kind: str) -> Any:
        return self.model.rotary_emb(x, positions, kind)


class Gemma3Family(LlamaFamily):
    """Gemma 3 text causal LMs through the model protocol."""

    name, model_class = "hf_gemma3", Gemma3LM
    model_types = ("gemma3_text",)

    def hidden_norms(self, model: HFDecoderLM) -> list[str]:
        """None: its norms multiply by ``1 + weight`` and its embeddings by sqrt(width), which a cut of the width
        moves with its tied head; its width is cut as Minitron does, norms as they are."""
        return []


register_decoder(Gemma3Family())
