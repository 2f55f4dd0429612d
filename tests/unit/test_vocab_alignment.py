"""Vocabularies that differ only by padding are aligned with one info line, never a flag: a teacher padded from 48
to 64 rows (random extra rows) gives the KD loss of the same teacher cut to 48; tokenizers that differ are refused
with one line naming both sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import save_tokenizer
from trainer.build import load_teacher, teacher_vocab
from trainer.config import ConfigError, RunConfig
from trainer.distill.interface import TeacherOutput
from trainer.distill.losses import logit_losses
from trainer.preflight import validate

transformers = pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")

VOCAB, PADDED = 48, 64
TOKENS = [f"t{i}" for i in range(VOCAB)]


def small_llama(vocab: int):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``t48``: a Llama teacher on 48 tokens with its tokenizer; ``t64``: the same, 16 random rows added to its
    embeddings and head; ``s48``: a Llama student on 48 tokens with the same tokenizer; ``other``: the student with
    another tokenizer of 48 tokens."""
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(small_llama(VOCAB))
    teacher.save_pretrained(root / "t48")
    teacher.resize_token_embeddings(PADDED, mean_resizing=False)  # the new rows: random, as initialisation draws them
    teacher.save_pretrained(root / "t64")
    transformers.LlamaForCausalLM(small_llama(VOCAB)).save_pretrained(root / "s48")
    transformers.LlamaForCausalLM(small_llama(VOCAB)).save_pretrained(root / "other")
    for name in ("t48", "t64", "s48"):
        save_tokenizer(root / name, TOKENS)
    save_tokenizer(root / "other", [*TOKENS[:5], "x", *TOKENS[6:]])
    return {name: root / name for name in ("t48", "t64", "s48", "other")}


def run_config(teacher: Path, student: Path | None = None) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name, cfg.data.synthetic_vocab = "synthetic", VOCAB
    cfg.distill.loss, cfg.distill.alpha, cfg.distill.temperature = "forward_kl", 0.5, 2.0
    cfg.student["block_size"] = 16
    if student is not None:
        cfg.student = {"arch": "hf", "path": str(student), "block_size": 16}
    cfg.teacher.checkpoint = str(teacher)
    return cfg


def test_padded_teacher_gives_the_kd_loss_of_the_unpadded_one(folders, capsys):
    cfg = run_config(folders["t64"], folders["s48"])
    validate(cfg)
    assert capsys.readouterr().err == ""
    padded = load_teacher(cfg, torch.device("cpu"))
    info = capsys.readouterr().err.splitlines()
    assert info == [
        "info: the teacher's 64 logits and the student's 48 are aligned to the tokenizer's 48 tokens "
        "(the rows past them are padding)"
    ]
    cut = load_teacher(run_config(folders["t48"], folders["s48"]), torch.device("cpu"))
    assert capsys.readouterr().err == ""  # nothing to align: no line
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    student = torch.randn(4, 16, VOCAB, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = transformers.LlamaForCausalLM.from_pretrained(folders["t64"])(input_ids=x).logits
        got = logit_losses(student, y, TeacherOutput(logits=padded(x)), cfg.distill)["distill/kd"]
        want = logit_losses(student, y, TeacherOutput(logits=cut(x)), cfg.distill)["distill/kd"]
        unaligned = logit_losses(
            torch.cat([student, full[..., VOCAB:]], -1), y, TeacherOutput(logits=full), cfg.distill
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(unaligned["distill/kd"], want, atol=1e-3)  # the random rows would have moved it


def test_a_student_padded_past_the_teacher_is_aligned_in_the_loss():
    """The student's logits past the teacher's (the real vocabulary) are padding: KD is taken over the rest."""
    student, teacher = torch.randn(2, 8, PADDED), torch.randn(2, 8, VOCAB)
    y = torch.randint(0, VOCAB, (2, 8))
    cfg = RunConfig().distill
    cfg.loss, cfg.alpha = "forward_kl", 0.5
    got = logit_losses(student, y, TeacherOutput(logits=teacher), cfg)["distill/kd"]
    want = logit_losses(student[..., :VOCAB], y, TeacherOutput(logits=teacher), cfg)["distill/kd"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_without_tokenizers_the_students_vocabulary_is_the_real_one(folders, tmp_path, capsys):
    bare = tmp_path / "t64_bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folders["t64"] / name).read_bytes())
    cfg = run_config(bare)  # a Stillroom student: no tokenizer on either side
    validate(cfg)
    assert teacher_vocab(cfg) == VOCAB
    assert capsys.readouterr().err.splitlines() == [
        "info: the teacher's 64 logits and the student's 48 are aligned to the student's 48 tokens "
        "(the rows past them are padding)"
    ]


def test_different_tokenizers_are_refused(folders):
    with pytest.raises(ConfigError) as raised:
        validate(run_config(folders["t64"], folders["other"]))
    assert str(raised.value) == (
        "teacher.checkpoint: the teacher's vocabulary of 64 and the student's of 48 are different tokenizers: "
        "id 5 is 't5' for the teacher and 'x' for the student (data=synthetic)"
    )


def test_a_vocabulary_short_of_the_tokenizer_is_refused(folders):
    cfg = run_config(folders["t64"])
    cfg.data.synthetic_vocab = 40  # the student's 40 ids against the teacher tokenizer's 48
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    assert str(raised.value) == (
        "teacher.checkpoint: the teacher's vocabulary of 64 and the student's of 40 differ beyond padding: "
        "the tokenizer has 48 tokens (data=synthetic)"
    )


def test_a_teacher_short_of_the_students_ids_is_refused(folders, tmp_path):
    """Without tokenizers the student's ids are all real (it reads them in the data): a smaller teacher is refused."""
    bare = tmp_path / "t48_bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folders["t48"] / name).read_bytes())
    cfg = run_config(bare)
    cfg.data.synthetic_vocab = PADDED
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    assert str(raised.value) == (
        "teacher.checkpoint: the teacher's vocabulary of 48 and the student's of 64 differ beyond padding: the teacher "
        "has no logits for ids 48-63 (data=synthetic)"
    )
