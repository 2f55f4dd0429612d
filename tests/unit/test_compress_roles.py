"""Compression targets name roles (``layers``, ``embedding``, ``head``) that every family resolves to its own
modules, so every shipped ``conf/compress`` option works on every student as it is: Stillroom's GPT, a Hugging Face
Llama (a structure spec) and a StableLM (the generic path), but channel pruning on the generic path, which needs a
structure spec and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import small_hf_config
from trainer import models
from trainer.compress import build_compressor, resolve_targets
from trainer.config import ConfigError, ModifierConfig

pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")
COMPRESS = Path(__file__).resolve().parents[2] / "conf" / "compress"
OPTIONS = sorted(path.stem for path in COMPRESS.glob("*.yaml") if path.stem != "none")


def student(kind: str):
    if kind == "gpt":
        return models.build("gpt", vocab_size=32, n_layer=2, n_head=2, n_embd=32, block_size=16)
    import transformers

    from trainer.models.hf import from_transformers

    return from_transformers(transformers.AutoModelForCausalLM.from_config(small_hf_config(kind)), None)


# The modules each role stands for, by student.
ROLES = {
    "gpt": {"layers": "blocks.0.attn.qkv", "embedding": ["tok_emb", "pos_emb"], "head": ["head"]},
    "llama": {"layers": "model.layers.0.self_attn.q_proj", "embedding": ["model.embed_tokens"], "head": ["lm_head"]},
    "stablelm": {"layers": "model.layers.0.self_attn.q_proj", "embedding": ["model.embed_tokens"], "head": ["lm_head"]},
}


@pytest.mark.parametrize("kind", list(ROLES))
def test_each_role_resolves_to_the_familys_own_modules(kind):
    model = student(kind)
    expected = ROLES[kind]
    layers = resolve_targets(model, ["layers"], "targets")
    assert expected["layers"] in layers and all(".0." in name or ".1." in name or ".2." in name or ".3." in name
                                                for name in layers)  # fmt: skip
    assert resolve_targets(model, ["embedding"], "targets") == expected["embedding"]
    assert resolve_targets(model, ["head"], "targets") == expected["head"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", list(ROLES))
def test_every_shipped_compress_option_works_on_every_student(kind, option):
    node = OmegaConf.load(COMPRESS / f"{option}.yaml")
    modifiers = [ModifierConfig(**OmegaConf.to_container(m)) for m in node.modifiers]  # type: ignore[arg-type]
    model = student(kind)
    if kind == "stablelm" and option == "prune_channel":
        with pytest.raises(ConfigError, match="the generic path .* knows no heads and MLP channels; the model types"):
            build_compressor(model, modifiers)
        return
    compressor = build_compressor(model, modifiers)
    pruned = {name.rpartition(".")[0] for pruner in compressor.pruners for name in pruner.weight_names}
    quantized = set(compressor.qat.modules) if compressor.qat is not None else set()
    assert pruned | quantized, option
    layers = {name for name in resolve_targets(model, ["layers"], "targets")}
    assert (pruned | quantized) & layers  # every option compresses the decoder layers' Linears
