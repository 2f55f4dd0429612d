"""``trainer.distill.align``: between identical tokenizers ``span`` KD is exact KD (values and gradients); ``span`` and
``uld`` against float64 formulas on hand-built tokenizations (tokens that split differently, a character only one
vocabulary has); two real tokenizers of other merges align where their tokens end together."""

from __future__ import annotations

import math

import pytest
import torch

from tests.data_files import documents, save_tokenizer
from trainer.distill.align import Aligner, Alignment, SharedVocab, aligned_kd, aligned_pairs, char_ends
from trainer.distill.losses import kd_loss

transformers = pytest.importorskip("transformers", reason="tokenizers come from the `hf` extra")
KINDS = ["forward_kl", "reverse_kl", "jsd"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    load = transformers.AutoTokenizer.from_pretrained
    return load(save_tokenizer(root / "t300", 300)), load(save_tokenizer(root / "t420", 420))


def whole_texts(tokenizer, n: int = 2, length: int = 24) -> torch.Tensor:
    """Rows of ``length`` ids, each the whole tokenization of a text (re-tokenizing its decoded text gives it back)."""
    rows = []
    for text in documents(n, seed=5):
        ids = tokenizer.encode(text, add_special_tokens=False)[:length]
        while tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) != ids:
            ids = ids[:-1]
        rows.append(ids[: length - 4])
    width = min(len(row) for row in rows)
    return torch.tensor([row[:width] for row in rows])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_between_identical_tokenizers_is_exact_kd(tokenizers, kind, temperature):
    tokenizer = tokenizers[0]
    aligner = Aligner(tokenizer, tokenizer)
    x = whole_texts(tokenizer)
    alignment = aligner(x)
    assert torch.equal(alignment.teacher_ids, x) and alignment.student_rows.tolist() == list(range(x.numel()))
    assert len(aligner.shared.student) == len(tokenizer)  # every token, the ones of part of a character included
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    student = torch.randn(*x.shape, vocab, generator=g).requires_grad_()
    teacher = torch.randn(*x.shape, vocab, generator=g)
    labels = torch.randint(0, vocab, x.shape, generator=g)
    labels[0, :3] = -100
    got = aligned_kd(
        student, teacher, alignment, aligner.shared, labels, how="span", kind=kind, temperature=temperature, beta=0.5
    )
    (got_grad,) = torch.autograd.grad(got.kd, student)
    want = kd_loss(student, teacher, kind=kind, temperature=temperature, beta=0.5, labels=labels)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got.kd, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    assert got.aligned_fraction.item() == 1.0 and got.shared_mass.item() == pytest.approx(1.0, abs=1e-6)


# Hand-built: the text "abcd" read as student tokens [ab][c][d] and teacher tokens [a][bc][d]; the student's
# vocabulary is {ab, c, d, z} and the teacher's {a, bc, d, c, y}: shared are c and d; "z" and "y" are characters only
# one vocabulary has. The student's tokens end at characters 2, 3, 4, the teacher's at 1, 3, 4: aligned at 3 and 4.
STUDENT_KEYS = ["ab", "c", "d", "z"]
TEACHER_KEYS = ["a", "bc", "d", "c", "y"]


def reference(student: torch.Tensor, teacher: torch.Tensor, how: str, kind: str, temperature: float) -> float:
    """Float64 formulas at the aligned pairs (student position 1 with teacher 1, student 2 with teacher 2)."""
    total = 0.0
    for i, j in [(1, 1), (2, 2)]:
        p_s = torch.softmax(student[i].double() / temperature, -1)
        p_t = torch.softmax(teacher[j].double() / temperature, -1)
        if how == "uld":
            a, b = p_s.sort(descending=True).values, p_t.sort(descending=True).values
            a = torch.cat([a, a.new_zeros(len(b) - len(a))])
            total += float((a - b).abs().sum())
            continue
        s = torch.stack([p_s[1], p_s[2], 1 - p_s[1] - p_s[2]])  # c, d, the rest (ab, z)
        t = torch.stack([p_t[3], p_t[2], 1 - p_t[3] - p_t[2]])  # c, d, the rest (a, bc, y)
        m = 0.5 * s + 0.5 * t
        kl = {
            "forward_kl": float((t * (t / s).log()).sum()),
            "reverse_kl": float((s * (s / t).log()).sum()),
            "jsd": 0.5 * float((t * (t / m).log()).sum()) + 0.5 * float((s * (s / m).log()).sum()),
        }
        total += kl[kind]
    return total / 2 * temperature**2


@pytest.mark.parametrize("how, kind", [("span", kind) for kind in KINDS] + [("uld", "forward_kl")])
def test_span_and_uld_match_float64_formulas_on_a_hand_built_tokenization(how, kind):
    assert aligned_pairs([2, 3, 4], [1, 3, 4]) == [(1, 1), (2, 2)]
    shared = SharedVocab.of(STUDENT_KEYS, TEACHER_KEYS)
    assert shared.student.tolist() == [1, 2] and shared.teacher.tolist() == [3, 2]  # c, d
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 3, 4, generator=g) * 2, torch.randn(1, 3, 5, generator=g) * 2
    alignment = Alignment(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1, 2]), torch.tensor([1, 2]))
    labels = torch.zeros(1, 3, dtype=torch.long)
    got = aligned_kd(student, teacher, alignment, shared, labels, how=how, kind=kind, temperature=1.5, beta=0.5)
    assert got.kd.item() == pytest.approx(reference(student[0], teacher[0], how, kind, 1.5), rel=1e-5)
    assert got.aligned_fraction.item() == pytest.approx(2 / 3)
    on_shared = torch.softmax(teacher[0, 1:].double(), -1)[:, [3, 2]].sum(-1).mean()
    assert got.shared_mass.item() == pytest.approx(float(on_shared), rel=1e-6)
    labels[0, 2] = -100  # a position whose label does not count is left out of both
    fewer = aligned_kd(student, teacher, alignment, shared, labels, how=how, kind=kind, temperature=1.5, beta=0.5)
    assert fewer.aligned_fraction.item() == pytest.approx(1 / 2) and math.isfinite(fewer.kd.item())


def test_tokenizers_of_other_merges_align_where_their_tokens_end_together(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    aligner = Aligner(student_tokenizer, teacher_tokenizer)
    x = whole_texts(student_tokenizer, n=3)
    alignment = aligner(x)
    width = alignment.teacher_ids.shape[1]
    for b, ids in enumerate(x.tolist()):
        text, student_ends = char_ends(student_tokenizer, ids, aligner.student_strings)
        teacher_ids = alignment.teacher_ids[b].tolist()
        encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert teacher_ids[: len(encoded["input_ids"])] == encoded["input_ids"]
        teacher_ends = [end for _, end in encoded["offset_mapping"]]
        pairs = zip(alignment.student_rows.tolist(), alignment.teacher_rows.tolist(), strict=True)
        rows = [(s - b * x.shape[1], t - b * width) for s, t in pairs if s // x.shape[1] == b]
        assert rows and all(student_ends[i] == teacher_ends[j] for i, j in rows)
        assert len(rows) < len(ids)  # the larger vocabulary merges some of the smaller's tokens
    shared = aligner.shared
    assert 280 <= len(shared.student) <= 300  # most of the smaller vocabulary is in the larger
    names = student_tokenizer.convert_ids_to_tokens(shared.student.tolist())
    assert names == teacher_tokenizer.convert_ids_to_tokens(shared.teacher.tolist())
