"""The Hugging Face families (the Llama family and GPT-2, run on transformers' own modules) answer the model
protocol: their logits and hidden states are transformers' own, their state dict is the Hugging Face checkpoint's,
pipeline stages chained compute the model, each unit group's mask zeroes exactly its unit, thinning keeps the
function, a student's config is checked, and the export is a Hugging Face folder that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel.pipeline import rank_stages
from tests.conftest import HF_VOCAB, save_hf_student, small_hf_config
from trainer import export, models
from trainer.compress import pruning
from trainer.models.hf import HFConfig, decoder_for
from trainer.models.hf.generic import GENERIC
from trainer.models.protocol import FINAL_HIDDEN, ConfigFieldError, family_of

transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

# tied GQA Llama; untied Qwen2 with q/k/v biases; Qwen3 (q/k norms per head); Phi-3 (fused q/k/v and gate/up);
# OLMo 2 (norms after attention and MLP, q/k norms over all heads); Gemma 3 (sliding layers, soft-capped logits);
# Qwen3-MoE (experts, one dense layer) and Mixtral (experts); GPT-2 (fused q/k/v, Conv1D)
KINDS = ("llama", "qwen2", "qwen3", "phi3", "olmo2", "gemma3", "qwen3_moe", "mixtral", "gpt2")
FAMILY = {"llama": "hf_llama", "qwen2": "hf_llama", "qwen3": "hf_llama", "phi3": "hf_phi3", "olmo2": "hf_olmo2",
          "gemma3": "hf_gemma3", "qwen3_moe": "hf_moe", "mixtral": "hf_moe", "gpt2": "hf_gpt2"}  # fmt: skip
# The unit groups masks never prune: OLMo 2's heads (q/k norms over all heads), the experts (the router would still
# choose a masked one)
NOT_MASKED = {"olmo2": ["attn"], "qwen3_moe": ["experts"], "mixtral": ["experts"]}
MODEL_TYPE = {"gemma3": "gemma3_text"}  # Gemma 3's text decoder
TIED = {
    "llama": ["model.embed_tokens.weight"],
    "gemma3": ["model.embed_tokens.weight"],
    "gpt2": ["transformer.wte.weight"],
}
BLOCK = 12


def build(kind: str):
    torch.manual_seed(0)
    return models.build("hf", hf_config=small_hf_config(kind).to_dict()).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))


def transformers_twin(model):
    """The transformers model of ``model``'s config holding its weights (the Hugging Face checkpoint's layout)."""
    twin = transformers.AutoModelForCausalLM.from_config(model.config)
    twin.load_state_dict(family_of(model).to_hf_state(model.state_dict()))
    return twin.eval()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@torch.no_grad()
def test_logits_and_hidden_states_are_transformers_own(kind):
    """Layer 0 is the embeddings, layer i the output of decoder layer i (transformers' hidden state i below the
    last), ``FINAL_HIDDEN`` the final norm's output (transformers' last hidden state)."""
    model, x = build(kind), tokens()
    assert family_of(model).name == FAMILY[kind]
    logits, hidden = model(x, hidden_layers=(0, 1, 3, 4, FINAL_HIDDEN))
    out = transformers_twin(model)(input_ids=x, output_hidden_states=True)
    exact = {"rtol": 1e-6, "atol": 1e-6}  # the same modules; GPT-2's projections as Linear, not Conv1D
    torch.testing.assert_close(logits, out.logits, **exact)
    for layer in (0, 1, 3):
        torch.testing.assert_close(hidden[layer], out.hidden_states[layer], **exact)
    torch.testing.assert_close(hidden[FINAL_HIDDEN], out.hidden_states[4], **exact)
    assert not torch.allclose(hidden[4], hidden[FINAL_HIDDEN])  # layer 4 is before the final norm
    assert all(h.shape == (3, BLOCK, family_of(model).width(model)) for h in hidden.values())


def test_state_dict_is_the_hugging_face_checkpoints(kind):
    model = build(kind)
    family, twin = family_of(model), transformers.AutoModelForCausalLM.from_config(model.config)
    state = family.to_hf_state(model.state_dict())
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    tied = family.tied_weights(model)
    assert tied == TIED.get(kind, [])
    assert family.vocab_size(model) == HF_VOCAB and len(family.layers(model)) == 4


@pytest.mark.parametrize("pp, per_rank", [(2, 1), (4, 1), (2, 2)])
@torch.no_grad()
def test_stages_in_order_compute_the_model_bit_for_bit(kind, pp, per_rank):
    model, x = build(kind), tokens()
    family, n_stages = family_of(model), pp * per_rank
    names = dict(model.named_parameters())
    stages = {
        index: stage for rank in range(pp) for index, stage in zip(*rank_stages(model, family, n_stages, pp, rank)[:2])
    }
    out = x
    for index in range(n_stages):
        out = stages[index](out)
    assert torch.equal(out, model(x))
    assert dict(model.named_parameters()) == names  # deleting from the stages left the model whole
    for stage in stages.values():  # the stages share the model's parameters, under the model's names
        assert all(param is names[name] for name, param in stage.named_parameters())


def out_module_input(model, group, x: torch.Tensor) -> torch.Tensor:
    """What ``group``'s out-projection reads on ``x`` (its input columns are the units')."""
    seen = []
    handle = model.get_submodule(group.out_module).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("gating_only", [False, True], ids=["whole_unit", "gating_run"])
def test_a_units_mask_zeroes_exactly_that_units_output(kind, gating_only):
    """Masking one unit (a key/value head with its query heads, an MLP channel), or only its gating run (v rows,
    gate rows), makes its columns of the out-projection's input zero and leaves every other column as it was."""
    model, x = build(kind), tokens()
    family = family_of(model)
    assert sorted({g.kind for g in family.unit_groups(model) if not g.maskable}) == NOT_MASKED.get(kind, [])
    for group in [g for g in family.unit_groups(model) if g.layer == 1 and g.maskable]:
        before = out_module_input(model, group, x)
        out_weight = next(s.param for s in group.slices if s.module == group.out_module)
        unit = torch.zeros(group.n_units, dtype=torch.bool)
        unit[group.n_units - 1] = True
        gating = next(s.module for s in group.slices if s.gate_part is not None)  # v_proj, gate_proj, c_attn, c_fc
        chosen = [s for s in group.slices if (s.module == gating if gating_only else s.module != group.out_module)]
        masks = {s.param: ~group.expand(s.param, unit, model.get_parameter(s.param).shape) for s in chosen}
        assert group.dead_units(masks).tolist() == unit.tolist()
        saved = {name: model.get_parameter(name).detach().clone() for name in masks}
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_parameter(name).mul_(mask)
        after = out_module_input(model, group, x)
        columns = group.expand(out_weight, unit, model.get_parameter(out_weight).shape).any(0)
        assert bool((after[..., columns] == 0).all()), (group.kind, group.layer)
        assert torch.equal(after[..., ~columns], before[..., ~columns]), (group.kind, group.layer)
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_parameter(name).copy_(weight)


def dead_unit_masks(model, extra_dead_layer: int = 0) -> dict[str, torch.Tensor]:
    """Masks killing unit 0 of every group, and unit 1 of the MLP of layer ``extra_dead_layer`` too."""
    masks = {}
    for group in pruning.unit_groups(model):
        keep = torch.ones(group.n_units, dtype=torch.bool)
        keep[0] = False
        if group.kind == "mlp" and group.layer == extra_dead_layer:
            keep[1] = False
        for name in group.param_names:
            masks[name] = group.expand(name, keep, model.get_parameter(name).shape)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    return masks


@torch.no_grad()
def test_thinning_removes_dead_units_keeps_the_function_and_one_width(kind):
    """A Hugging Face config has one width per kind for all layers: every layer keeps the widest layer's units
    (layer 0's second dead MLP channel stays, masked); GPT-2 keeps every head (its config derives the head size)."""
    model, x = build(kind), tokens()
    small, left = pruning.thin(model, dead_unit_masks(model))
    assert family_of(small) is family_of(model)
    torch.testing.assert_close(small.eval()(x), model(x), rtol=0, atol=1e-5)
    config = small.config
    if kind == "gpt2":
        assert (config.n_head, config.n_inner) == (4, 255)
        assert all(".attn." in name or name.startswith("transformer.h.0.mlp.") for name in left)
    elif kind in ("qwen3_moe", "mixtral"):  # the experts kept; Qwen3-MoE's one dense MLP (layer 1) thinned
        assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (1, 2, 16)
        assert config.intermediate_size == (127 if kind == "qwen3_moe" else 128) and not left
    elif kind == "olmo2":  # every head kept (its heads are not masked)
        assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (2, 4, 16)
        assert config.intermediate_size == 127
    else:
        assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (1, 2, 16)
        assert config.intermediate_size == 127 and sorted({name.split(".")[2] for name in left}) == ["0"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_the_model_spec_rebuilds_the_architecture(kind):
    model, x = build(kind), tokens()
    spec = json.loads(json.dumps(models.model_spec(model)))  # what a checkpoint's model.json holds
    assert spec["arch"] == FAMILY[kind] and spec["config"]["hf_config"]["model_type"] == MODEL_TYPE.get(kind, kind)
    rebuilt = models.build_from_spec(spec).eval()
    models.load_weights(rebuilt, models.unique_state_dict(model))
    assert torch.equal(rebuilt(x), model(x))
    assert models.model_spec(rebuilt) == models.model_spec(model)


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of ``HF_VOCAB`` tokens, as transformers saves one."""
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models

    vocab = {f"t{i}": i for i in range(HF_VOCAB - 1)} | {"<unk>": HF_VOCAB - 1}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


@pytest.mark.parametrize("kind", ["llama", "phi3", "olmo2", "gemma3", "qwen3_moe", "gpt2"])
@torch.no_grad()
def test_the_export_is_a_hugging_face_folder(kind, tmp_path):
    """A student from a folder with weights and a tokenizer, thinned: its export holds the new sizes in
    config.json, the source's tokenizer and generation config, and transformers loads it with the same logits;
    ``trainer.export.load`` reads it back as the family's model."""
    source = save_hf_student(tmp_path / "source", kind)
    save_tokenizer(source)
    model, x = models.build("hf", path=str(source)).eval(), tokens()
    want = transformers.AutoModelForCausalLM.from_pretrained(source).eval()(input_ids=x).logits
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)  # the folder's weights were loaded
    small, _ = pruning.thin(model, dead_unit_masks(model, extra_dead_layer=-1))
    final = models.save_dense(small.eval(), tmp_path / "final")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        f.name for f in final.iterdir()
    }
    config = json.loads((final / "config.json").read_text())
    assert (config["n_inner"], config["n_head"]) == (255, 4) if kind == "gpt2" else config["intermediate_size"] == 127
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, small(x), rtol=0, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(final).convert_tokens_to_ids("t3") == 3
    again = export.load(final)
    assert family_of(again) is family_of(model) and torch.equal(again(x), small(x))


def test_a_config_only_folder_starts_from_random_init_and_overrides_apply(tmp_path):
    """GPT-2 calls the depth ``n_layer``: ``num_hidden_layers`` (transformers' alias) overrides it too."""
    source = save_hf_student(tmp_path / "gpt2", "gpt2", weights=False)
    overrides = {"num_hidden_layers": 2, "n_inner": 96}
    assert not HFConfig(path=str(source), config_overrides=overrides).loads_weights
    model = models.build("hf", path=str(source), config_overrides=overrides)
    assert len(family_of(model).layers(model)) == 2 and model.config.n_inner == 96


@pytest.mark.parametrize(
    "fields, key, message",
    [
        ({"vocab_size": 40}, "path", "the model's vocabulary of 32 tokens differs from the data's 40"),
        ({"block_size": 65}, "block_size", "65 is longer than the model's 64 positions"),
        ({"config_overrides": {"no_such_field": 1}}, "config_overrides.no_such_field", "not a field of LlamaConfig"),
        ({"config_overrides": {"num_attention_heads": 3}}, "config_overrides", "not a multiple of the number"),
        (
            {"config_overrides": {"intermediate_size": 96}},
            "config_overrides",
            "model.layers.0.mlp.gate_proj.weight is [128, 64] in",  # the folder's weights would not load
        ),
        ({"path": None}, "path", "student=hf needs student.path=DIR"),
        ({"path": "/no/such/folder"}, "path", "has no config.json"),
    ],
)
def test_a_bad_student_config_names_its_field(tmp_path, fields, key, message):
    source = save_hf_student(tmp_path / "llama", "llama")
    with pytest.raises(ConfigFieldError) as raised:
        HFConfig(**({"path": str(source), "block_size": 16} | fields))
    assert raised.value.key == key and message in raised.value.message and "\n" not in str(raised.value)


def test_a_causal_lm_of_a_type_without_a_spec_runs_on_the_generic_path(tmp_path):
    """OPT used to be refused ("Hugging Face students are of the model types ..."): its decoder layers, found from
    the model (``model.decoder.layers``), are the generic path's units; its logits are transformers' own."""
    folder = tmp_path / "opt"
    transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, vocab_size=HF_VOCAB
    ).save_pretrained(folder)
    config = HFConfig(path=str(folder), vocab_size=HF_VOCAB)
    assert decoder_for(config.resolve().model_type) is GENERIC
    torch.manual_seed(0)
    model = GENERIC.build(config).eval()  # OPT has dropout
    assert family_of(model) is GENERIC and list(GENERIC.layers(model)) == ["0", "1"]
    assert model.layers_path == "model.decoder.layers"
    x = torch.randint(0, HF_VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.hf_model(input_ids=x).logits, rtol=0, atol=0)
