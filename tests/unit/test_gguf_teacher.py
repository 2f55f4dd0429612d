"""A GGUF file as a teacher: a small Llama written by the test with the ``gguf`` package loads (dequantized, in
fp32 or bf16) to the logits of the same weights loaded from a Hugging Face folder; its tokenizer loads; a plain
copy of the GGUF-loaded model saves; config validation reads its vocabulary and context; bad files and missing
packages are one line."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.gguf_files import TOKENS, VOCAB, q8_rounded, save_llama_pair, tiny_llama, write_gguf
from trainer.build import build_student, student_spec
from trainer.config import ConfigError, RunConfig
from trainer.distill import shard_load
from trainer.distill import teacher as teacher_io
from trainer.models.hf import causal_lm, gguf
from trainer.models.protocol import family_of
from trainer.preflight import validate

transformers = pytest.importorskip("transformers", reason="GGUF teachers need the `hf` extra")
pytest.importorskip("gguf", reason="GGUF teachers need the `hf` extra")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """The same random Llama as a Hugging Face folder and as a GGUF file (in a folder of its own)."""
    return save_llama_pair(tmp_path_factory.mktemp("llama"), tied=request.param)


def test_logits_equal_the_hf_folders(pair):
    hf_folder, gguf_file = pair
    x = torch.randint(0, VOCAB, (3, 16))
    from_gguf, from_hf = teacher_io.load(gguf_file), teacher_io.load(hf_folder)
    with torch.no_grad():
        got, hidden = from_gguf(x, hidden_layers=(0, 2))
        want, want_hidden = from_hf(x, hidden_layers=(0, 2))
    assert got.shape == (3, 16, VOCAB) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for layer in (0, 2):
        torch.testing.assert_close(hidden[layer], want_hidden[layer], rtol=0, atol=1e-5)
    family = family_of(from_gguf)
    assert family.width(from_gguf) == 64 and len(family.layers(from_gguf)) == 2 and family.vocab_size(from_gguf) == 32
    assert not from_gguf.training and not any(p.requires_grad for p in from_gguf.parameters())


def test_q8_0_file_is_dequantized(tmp_path):
    """Matrices stored in Q8_0 blocks load as the model whose matrices went through Q8_0 and back."""
    model = tiny_llama()
    file = write_gguf(model, tmp_path / "q8.gguf", quantized=True)
    assert file.stat().st_size < 0.4 * sum(4 * p.numel() for p in model.parameters())
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        got, want = teacher_io.load(file)(x), q8_rounded(model)(input_ids=x).logits
        assert not torch.allclose(want, tiny_llama()(input_ids=x).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_filled_row_by_row_from_the_file_it_equals_the_loaded_teacher(pair, tmp_path, quantized):
    """What ``teacher.placement=shard`` does with a GGUF file, on one rank (no sharding): built on the meta device,
    each parameter read from the mapped file by rows (transformers' names, Llama's query/key row order undone, Q8_0
    blocks dequantized), bit for bit the teacher transformers loads; any rows alone read as the same rows."""
    hf_folder, gguf_file = pair
    if quantized:
        gguf_file = write_gguf(
            transformers.AutoModelForCausalLM.from_pretrained(hf_folder), tmp_path / "q8.gguf", quantized=True
        )
    skeleton = causal_lm.empty_gguf(gguf_file)
    assert all(p.is_meta for p in skeleton.parameters())
    tensors = shard_load.gguf_index(gguf_file, gguf.check_file(gguf_file), skeleton.model)
    assert tensors is not None and tensors["model.layers.0.self_attn.q_proj.weight"].order is not None
    filled = shard_load.load_sharded(
        skeleton, tensors, gguf_file, causal_lm.stored_as(skeleton), lambda m: m, CPU
    ).eval()
    loaded = teacher_io.load(gguf_file)
    for (name, got), (_, want) in zip(filled.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    q_proj = loaded.get_parameter("model.model.layers.1.self_attn.q_proj.weight")
    rows = torch.empty(24, q_proj.shape[1])
    tensors["model.layers.1.self_attn.q_proj.weight"].read_rows(5, rows)
    assert torch.equal(rows, q_proj[5:29])


def test_bf16_is_the_fp32_model_rounded(pair):
    _, gguf_file = pair
    fp32, bf16 = teacher_io.load(gguf_file), teacher_io.load(gguf_file, dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for (name, full), (_, half) in zip(fp32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert torch.equal(full.to(torch.bfloat16), half), name
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(bf16(x).float(), fp32(x), rtol=0, atol=0.05)


def test_resolve_spec_and_folder_of_one(pair):
    hf_folder, gguf_file = pair
    assert teacher_io.resolve(gguf_file) == ("gguf", gguf_file)
    assert teacher_io.resolve(gguf_file.parent) == ("gguf", gguf_file)
    spec = teacher_io.spec(gguf_file)
    assert spec["source"] == "gguf" and spec["model_type"] == "llama"
    expected = {"vocab_size": VOCAB, "n_layer": 2, "n_embd": 64, "block_size": 64}
    assert spec["config"] == teacher_io.spec(hf_folder)["config"] == expected
    teacher_io.verify(gguf_file)


def test_fingerprint_is_the_files_bytes(pair, tmp_path):
    _, gguf_file = pair
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()[:16]
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(gguf_file.read_bytes())
    assert teacher_io.fingerprint(gguf_file) == teacher_io.fingerprint(gguf_file.parent) == digest
    assert teacher_io.fingerprint(renamed) == digest
    changed = bytearray(gguf_file.read_bytes())
    changed[-1] ^= 1
    renamed.write_bytes(bytes(changed))
    assert teacher_io.fingerprint(renamed) != digest


def test_tokenizer_is_the_files(pair):
    _, gguf_file = pair
    tokenizer = gguf.tokenizer(gguf_file)
    assert len(tokenizer) == VOCAB and tokenizer.get_vocab() == {token: i for i, token in enumerate(TOKENS)}
    ids = tokenizer("ab ba", add_special_tokens=False).input_ids
    assert [TOKENS[i] for i in ids] == ["ab", "Ġ", "ba"] and tokenizer.decode(ids) == "ab ba"
    assert tokenizer.eos_token == "<|endoftext|>"


def test_plain_copy_saves_what_transformers_loads(pair, tmp_path):
    _, gguf_file = pair
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    )
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        loaded.save_pretrained(tmp_path / "refused")
    copy = gguf.plain_copy(loaded)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(copy.parameters(), loaded.parameters(), strict=True))
    copy.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", local_files_only=True).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = loaded.eval()(input_ids=x).logits
        torch.testing.assert_close(copy.eval()(input_ids=x).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(input_ids=x).logits, want, rtol=0, atol=0)


def run_config(checkpoint: Path, block_size: int = 32, **teacher) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name = "synthetic"  # VOCAB tokens
    cfg.distill.loss, cfg.distill.alpha = "forward_kl", 0.5
    cfg.student["block_size"] = block_size
    cfg.teacher.checkpoint = str(checkpoint)
    for key, value in teacher.items():
        setattr(cfg.teacher, key, value)
    return cfg


def test_validation_reads_vocabulary_context_and_dtype(pair):
    hf_folder, gguf_file = pair
    validate(run_config(gguf_file))
    validate(run_config(gguf_file.parent, param_dtype="bf16"))
    with pytest.raises(ConfigError, match="student.block_size: 128 is longer than the teacher's context of 64"):
        validate(run_config(gguf_file, block_size=128))
    with pytest.raises(ConfigError, match="teacher.param_dtype: applies to teacher.placement=shard or a GGUF teacher"):
        validate(run_config(hf_folder, param_dtype="bf16"))
    cfg = run_config(gguf_file)
    cfg.data.synthetic_vocab = 40
    with pytest.raises(ConfigError, match="teacher.checkpoint: teacher vocabulary 32 differs from the student's 40"):
        validate(cfg)


@pytest.fixture(scope="module")
def bad_files(pair, tmp_path_factory) -> dict[str, Path]:
    """Files a teacher.checkpoint may wrongly name: unsupported architecture, truncated, garbage, two in a folder,
    tensors left out."""
    _, gguf_file = pair
    root = tmp_path_factory.mktemp("bad")
    whole = gguf_file.read_bytes()
    (root / "truncated.gguf").write_bytes(whole[: len(whole) - 100])
    (root / "garbage.gguf").write_bytes(b"not a gguf file\n" * 64)
    (root / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (root / "two" / name).write_bytes(whole)
    write_gguf(tiny_llama(), root / "unsupported.gguf", architecture="stillroom-unknown")
    left_out = ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")
    write_gguf(tiny_llama(), root / "missing.gguf", left_out=left_out)
    names = ("truncated", "garbage", "missing")
    return {"unsupported": root / "unsupported.gguf", **{n: root / f"{n}.gguf" for n in names}}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("unsupported", "transformers cannot load a GGUF model of architecture 'stillroom-unknown'"),
        ("truncated", "is not a readable GGUF file: truncated or damaged"),
        ("garbage", "is not a readable GGUF file: truncated or damaged"),
        ("two", "holds 2 GGUF files (a.gguf, b.gguf): name one of them"),
        ("missing", "2 of the 21 tensors of its llama model are not stored (blk.1.ffn_down.weight, output_norm"),
    ],
)
def test_bad_files_are_one_config_error_line(bad_files, bad, message):
    path = bad_files.get(bad, bad_files["garbage"].parent / bad)
    with pytest.raises(ConfigError) as raised:
        validate(run_config(path))
    line = str(raised.value)
    assert line.startswith(f"teacher.checkpoint: {path}") and message in line and "\n" not in line


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_packages_name_the_extra(pair, monkeypatch, package):
    _, gguf_file = pair
    monkeypatch.setitem(sys.modules, package, None)  # ``import package`` raises ImportError
    with pytest.raises(ConfigError) as raised:
        validate(run_config(gguf_file))
    assert str(raised.value) == (
        f"teacher.checkpoint: a GGUF model needs gguf and accelerate ({package} is missing): "
        "pip install 'stillroom[hf]'"
    )


def test_a_student_is_cut_from_a_gguf_teacher_as_from_its_hf_folder(pair):
    """``student=from_teacher`` reads a GGUF teacher as a Hugging Face model: the preflight's sizes (meta device)
    and the cut student's logits are those of the same cut of the Hugging Face folder."""
    from trainer import data

    cuts = []
    for checkpoint in pair[::-1]:
        cfg = run_config(checkpoint)
        cfg.student = {"arch": "from_teacher", "layers": 1, "width": 0.5, "block_size": 32, "calib_batches": 1}
        validate(cfg)
        family, config = student_spec(cfg)
        assert family.name == "hf_llama" and family.depth(config) == 1
        cuts.append(build_student(cfg, data.build(cfg.data, cfg.sequence_length)).eval())
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(cuts[0](x), cuts[1](x), rtol=0, atol=1e-5)


def test_an_export_cut_from_a_gguf_teacher_carries_its_tokenizer(pair, tmp_path):
    """A student cut from a GGUF teacher has no tokenizer files of its own: its Hugging Face folder gets the one the
    run's text was tokenized with (the GGUF file's), which transformers then loads alone; its bytes on disk leave
    the tokenizer out."""
    from trainer import data, models, report
    from trainer.config import DataConfig

    cfg = run_config(pair[1])
    cfg.student = {"arch": "from_teacher", "layers": 1, "width": 0.5, "block_size": 32, "calib_batches": 1}
    student = build_student(cfg, data.build(cfg.data, cfg.sequence_length)).eval()
    folder = tmp_path / "final"
    models.save_dense(student, folder)
    weights_only = report.folder_bytes(folder)
    assert not (folder / "tokenizer.json").exists()
    data.save_tokenizer(DataConfig(name="text", tokenizer=str(pair[1])), folder)
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    original = gguf.tokenizer(pair[1])
    assert loaded.get_vocab() == original.get_vocab() and loaded.eos_token == original.eos_token
    assert loaded("ab ba ab").input_ids == original("ab ba ab").input_ids
    assert report.folder_bytes(folder) == weights_only
