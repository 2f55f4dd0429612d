"""Any transformers causal LM whose decoder layers form one list, as a student: the generic path for the model types
no structure spec knows (``DECODERS``). It runs transformers' own forward, so it needs no knowledge of the model's
insides; what does (pipeline stages, head and channel pruning, ``student=from_teacher`` cuts, incremental decoding)
it does not offer, and those checks name the model types that have them (``structured_model_types``).

The decoder layers are found from the model: its one ``nn.ModuleList`` of ``num_hidden_layers`` modules (FSDP2's
units). Hidden states are those layers' outputs (hooks), so ``i`` is the output of layer ``i`` as in every family.
The head is fused with the loss where the logits are the head's plain output; a model that post-processes them
(Gemma's soft-capping, Granite's scaling, Cohere's logit scale) computes them whole."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from trainer.models.hf import HFDecoderFamily, HFDecoderLM, structured_model_types
from trainer.models.protocol import FINAL_HIDDEN, HeadFn, KVCache, Unsupported, register

# Config fields that change the logits after the head, and their values that leave them alone.
LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": (None,),
    "logits_scaling": (None, 1, 1.0),
    "logit_scale": (None, 1, 1.0),
}


def layers_path(model: nn.Module, depth: int) -> str:
    """The dotted name of ``model``'s one list of ``depth`` decoder layers; Unsupported when it has none, or several."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(found) != 1:
        raise Unsupported(f"its decoder layers are not one list of {depth} modules (found {len(found)})")
    return found[0]


class GenericLM(HFDecoderLM):
    """A transformers causal LM run by its own forward. ``forward(idx, hidden_layers=..., head=...)`` returns
    logits, and hidden states if asked (0 = the embeddings, ``i`` = the output of layer ``i``, ``FINAL_HIDDEN`` =
    the decoder's output after its final norm)."""

    def __init__(self, hf_model: nn.Module, source: str | None):
        super().__init__(hf_model, source)
        # transformers' model runs the forward over this module's children: both hold one dict of them, so a child
        # replaced here (QAT's fake-quantized Linear) is the one its forward calls.
        object.__setattr__(self, "_modules", hf_model._modules)
        object.__setattr__(self, "hf_model", hf_model)  # not a child: its children are this module's own
        self.layers_path = layers_path(self, self.config.num_hidden_layers)

    @property
    def plain_head(self) -> bool:
        """Whether the logits are the head's output as it is (no soft-capping or scaling after it)."""
        return all(getattr(self.config, key, None) in plain for key, plain in LOGIT_POSTPROCESSING.items())

    def forward(
        self,
        idx: torch.Tensor,
        hidden_layers: tuple[int, ...] = (),
        head: HeadFn | None = None,
        cache: KVCache | None = None,
    ):
        if cache is not None:
            raise Unsupported("the generic path decodes without a key/value cache")
        hidden: dict[int, torch.Tensor] = {}
        hooks = [
            layer.register_forward_hook(self._keep(hidden, int(name) + 1))
            for name, layer in self.get_submodule(self.layers_path).named_children()
            if int(name) + 1 in hidden_layers
        ]
        try:
            model = cast(Any, self.hf_model)
            if head is None:
                ends = bool({0, FINAL_HIDDEN} & set(hidden_layers))
                out = model(input_ids=idx, use_cache=False, output_hidden_states=ends)
                logits = out.logits
                if ends:  # transformers' last hidden state is the decoder's output after its final norm
                    hidden.update({0: out.hidden_states[0], FINAL_HIDDEN: out.hidden_states[-1]})
            else:
                assert self.plain_head  # fuses_head: a fused loss only where the logits are the head's output
                out = model.get_decoder()(input_ids=idx, use_cache=False, output_hidden_states=0 in hidden_layers)
                if 0 in hidden_layers:
                    hidden[0] = out.hidden_states[0]
                if FINAL_HIDDEN in hidden_layers:
                    hidden[FINAL_HIDDEN] = out.last_hidden_state
                logits = head(out.last_hidden_state, self.lm_head.weight, self.lm_head.bias)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = {i: hidden[i] for i in hidden_layers}
        return (logits, hidden) if hidden_layers else logits

    @staticmethod
    def _keep(hidden: dict[int, torch.Tensor], index: int):
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden[index] = output[0] if isinstance(output, tuple) else output

        return keep


class GenericFamily(HFDecoderFamily):
    """Causal LMs of a model type without a structure spec: everything that needs no knowledge of their insides."""

    name, model_class, layers_attr = "hf_generic", GenericLM, ""
    structured_units = pipelines = False

    def wrap(self, hf_model: nn.Module, source: str | None) -> GenericLM:
        return GenericLM(hf_model, source)

    def layers(self, model: HFDecoderLM) -> dict[str, nn.Module]:
        generic = cast(GenericLM, model)
        return dict(generic.get_submodule(generic.layers_path).named_children())

    def layers_prefix(self, model: HFDecoderLM) -> str:
        return cast(GenericLM, model).layers_path

    def lacks(self, what: str) -> str:
        return (
            f"the generic path (a model type without a structure spec) knows no {what}; the model types with one: "
            f"{structured_model_types()}"
        )

    def plain_head(self, model: HFDecoderLM) -> bool:
        return cast(GenericLM, model).plain_head

    def embeddings(self, model: HFDecoderLM) -> list[str]:
        return [_name_of(model, cast(Any, model).hf_model.get_input_embeddings())]

    def outputs(self, model: HFDecoderLM) -> list[str]:
        return ["lm_head"]

    def tied_weights(self, model: HFDecoderLM) -> list[str]:
        embedding = cast(Any, model).hf_model.get_input_embeddings()
        return [f"{self.embeddings(model)[0]}.weight"] if model.lm_head.weight is embedding.weight else []


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


GENERIC = cast(GenericFamily, register(GenericFamily()))
