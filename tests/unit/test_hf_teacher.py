"""A Hugging Face causal LM as a teacher: a model of a Stillroom family (GPT-2, the Llama family) loads as that
family's model and any other as the teacher-only wrapper, both reproducing the model's own outputs, also when built
on the meta device and filled from the file as ``teacher.placement=shard`` does; a padded vocabulary is cut, and
folders that are not a usable model are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import save_hf_student
from trainer.build import teacher_vocab
from trainer.config import ConfigError, RunConfig
from trainer.distill import shard_load
from trainer.distill import teacher as teacher_io
from trainer.models.hf import causal_lm, safetensors_files
from trainer.models.protocol import family_of
from trainer.preflight import validate

transformers = pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")


def save_tiny_gpt2(folder: Path, vocab_size: int = 65, seed: int = 0) -> Path:
    """A 2-layer GPT-2 saved with ``save_pretrained`` (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf65(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf65"))


@pytest.fixture(scope="module")
def hf80(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf80"), vocab_size=80)


def reference(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model


def test_logits_equal_the_hf_models_own(hf65):
    x = torch.randint(0, 65, (3, 16))
    teacher = teacher_io.load(hf65)
    with torch.no_grad():
        got, want = teacher(x), reference(hf65)(input_ids=x).logits
    assert got.shape == (3, 16, 65)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    spec = family_of(teacher)
    assert spec.width(teacher) == 32 and len(spec.layers(teacher)) == 2
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture(scope="module")
def opt(tmp_path_factory) -> Path:
    """A 2-layer OPT: a causal LM of no Stillroom family."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=65, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("opt")
    transformers.OPTForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_hf_student(tmp_path_factory.mktemp("llama"), "qwen2")  # the Llama family: q/k/v biases, untied head


def test_family_teachers_are_the_familys_models_and_others_the_wrapper(hf65, llama, opt):
    """GPT-2 and Qwen2 are Stillroom families (their layers, structured units), OPT the teacher-only wrapper; each
    gives the logits and hidden states of transformers' own model."""
    for folder, family, layers in ((hf65, "hf_gpt2", 2), (llama, "hf_llama", 4), (opt, "hf_teacher", 2)):
        teacher = teacher_io.load(folder)
        spec = family_of(teacher)
        assert spec.name == teacher_io.spec(folder)["arch"] == family and len(spec.layers(teacher)) == layers
        assert bool(spec.unit_groups(teacher)) == (family != "hf_teacher")
        x = torch.randint(0, spec.vocab_size(teacher), (2, 12))
        with torch.no_grad():
            logits, hidden = teacher(x, hidden_layers=(0, 1))
            out = reference(folder)(input_ids=x, output_hidden_states=True)
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
        for layer in (0, 1):
            torch.testing.assert_close(hidden[layer], out.hidden_states[layer], rtol=0, atol=1e-5)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_built_on_meta_and_filled_from_the_file_equals_the_loaded_one(hf65, llama, opt):
    """What ``teacher.placement=shard`` does, on one rank (no sharding): the names in the file (GPT-2's transposed
    ``Conv1D`` weights, the wrapper's prefix, a tied head) and the computed buffers (Llama's rotary frequencies)."""
    for folder in (hf65, llama, opt):
        skeleton = causal_lm.empty(folder)
        assert all(p.is_meta for p in skeleton.parameters())
        tensors = shard_load.index(safetensors_files(folder))
        filled = shard_load.load_sharded(
            skeleton, tensors, folder, causal_lm.stored_as(skeleton), lambda m: m, torch.device("cpu")
        ).eval()
        loaded = teacher_io.load(folder)
        assert type(filled) is type(loaded)
        x = torch.randint(0, 65 if folder != llama else 32, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(filled(x), loaded(x), rtol=0, atol=0)


def test_hidden_layers_match_output_hidden_states(hf65):
    """Layers 0..n-1 equal HF's hidden states; layer n is the last block's output before the final norm, as in
    Stillroom's GPT (HF's last hidden state is after ``ln_f``)."""
    x = torch.randint(0, 65, (2, 12))
    model = reference(hf65)
    with torch.no_grad():
        logits, hidden = teacher_io.load(hf65)(x, hidden_layers=(0, 1, 2))
        out = model(input_ids=x, output_hidden_states=True)
    assert sorted(hidden) == [0, 1, 2]
    for layer in (0, 1):
        torch.testing.assert_close(hidden[layer], out.hidden_states[layer], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.transformer.ln_f(hidden[2]), out.hidden_states[2])
    assert not torch.allclose(hidden[2], out.hidden_states[2])
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)


def test_padded_vocabulary_is_sliced(hf80):
    x = torch.randint(0, 65, (2, 8))
    full = teacher_io.load(hf80)
    sliced = teacher_io.load(hf80, vocab_size=65)
    with torch.no_grad():
        whole = full(x)
        cut, hidden = sliced(x, hidden_layers=(1,))
    assert whole.shape[-1] == 80 and cut.shape[-1] == 65
    torch.testing.assert_close(cut, whole[..., :65], rtol=0, atol=0)
    spec = family_of(sliced)
    assert spec.width(sliced) == family_of(full).width(full) and len(spec.layers(sliced)) == 2 and list(hidden) == [1]


def test_resolve_and_spec(hf65):
    assert teacher_io.resolve(hf65) == ("hf", hf65)
    spec = teacher_io.spec(hf65)
    assert spec["arch"] == "hf_gpt2"
    assert spec["config"] == {"vocab_size": 65, "n_layer": 2, "n_embd": 32, "block_size": 64}


def copy_without(src: Path, dst: Path, *missing: str) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if file.name not in missing:
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.parametrize(
    "broken, message",
    [
        ("no_weights", "has a Hugging Face config.json but no weights"),
        ("no_config", "has weights (model.safetensors) but no config.json"),
        ("unknown_model_type", "transformers cannot read it"),
        ("not_json", "not valid JSON"),
        ("not_causal_lm", "which transformers does not run as a causal LM"),
        ("empty", "is not a Stillroom export, run folder or checkpoint, nor a Hugging Face causal-LM folder"),
    ],
)
def test_broken_folders_are_refused_with_one_line(hf65, tmp_path, broken, message):
    folder = copy_without(
        hf65,
        tmp_path / broken,
        *{
            "no_weights": ["model.safetensors"],
            "no_config": ["config.json"],
            "empty": [f.name for f in hf65.iterdir()],
        }.get(broken, []),
    )
    config = folder / "config.json"
    if broken == "unknown_model_type":
        config.write_text(json.dumps({"model_type": "no_such_model", "architectures": ["NoSuchForCausalLM"]}))
    if broken == "not_json":
        config.write_text("{this is not json")
    if broken == "not_causal_lm":
        config.write_text(json.dumps(transformers.DistilBertConfig(dim=32, n_layers=2).to_dict()))
    with pytest.raises(teacher_io.TeacherPathError) as raised:
        teacher_io.spec(folder)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def run_config(checkpoint: Path, **teacher) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name = "shakespeare"  # 65 characters
    cfg.distill.loss, cfg.distill.alpha = "forward_kl", 0.5
    cfg.student["block_size"] = 32
    cfg.teacher.checkpoint = str(checkpoint)
    for key, value in teacher.items():
        setattr(cfg.teacher, key, value)
    return cfg


def test_validation_of_vocabularies_and_context(hf65, hf80, capsys):
    """A padded teacher vocabulary is aligned by itself (``tests/unit/test_vocab_alignment.py``): no flag."""
    validate(run_config(hf65))
    validate(run_config(hf80))
    assert teacher_vocab(run_config(hf80)) == 65
    assert "aligned to the student's 65 tokens" in capsys.readouterr().err
    cfg = run_config(hf65)
    cfg.student["block_size"] = 128
    with pytest.raises(ConfigError, match="student.block_size: 128 is longer than the teacher's context of 64"):
        validate(cfg)
