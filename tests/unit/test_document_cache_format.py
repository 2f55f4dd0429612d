"""The teacher cache kept by document (``trainer/cache/documents.py``) and the loss that reads it
(``align.topk_span_kd``): the loss against float64 formulas, and exact KD where every token is shared and k is the
whole vocabulary; the rows written are the live teacher's over each window, looked up by (document, character end);
a flipped byte is named and written again; the student's token ends (``trainer/data/spans.py``) are where its tokens
end in the document's text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_files import documents as corpus_documents
from tests.data_files import save_llama, save_tokenizer
from trainer.cache import CacheError, compact
from trainer.cache import documents as doc_cache
from trainer.distill.align import AlignedTopK, token_keys, token_strings, topk_span_kd
from trainer.distill.losses import kd_loss

transformers = pytest.importorskip("transformers", reason="tokenizers come from the `hf` extra")
KINDS = ["forward_kl", "reverse_kl", "jsd"]
KEY = doc_cache.DocumentKey(teacher="t", corpus="c", k=8, temperature=2.0)


def reference(student: torch.Tensor, values, ids, lse, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Float64, position by position: the probabilities of the shared top-k tokens and of everything else on each
    side, and the divergence between them, times T**2, averaged."""
    total = student.new_zeros((), dtype=torch.float64)
    for s, v, i, z in zip(student.double(), values.double(), ids, lse.double(), strict=True):
        p_s = torch.softmax(s / temperature, -1)
        p_t_shared = torch.exp(v[i >= 0] / temperature - z)
        q_shared = p_s[i[i >= 0]]
        p = torch.cat([p_t_shared, (1 - p_t_shared.sum()).reshape(1)])
        q = torch.cat([q_shared, (1 - q_shared.sum()).reshape(1)])
        if kind == "forward_kl":
            term = (p * (p / q).log()).nansum()
        elif kind == "reverse_kl":
            term = (q * (q / p).log()).nansum()
        else:
            m = beta * p + (1 - beta) * q
            term = beta * (p * (p / m).log()).nansum() + (1 - beta) * (q * (q / m).log()).nansum()
        total = total + term
    return total / len(student) * temperature**2


def teacher_rows(n: int, k: int, teacher_vocab: int, student_vocab: int, seed: int = 0):
    """Raw top-k logits (descending), their ids in the student's vocabulary (a third not shared, one row none) and
    the log-sum-exp of a whole teacher row of ``teacher_vocab`` logits at T = 2."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, teacher_vocab, generator=gen)
    values, _ = logits.topk(k, dim=-1)
    ids = torch.stack([torch.randperm(student_vocab, generator=gen)[:k] for _ in range(n)])
    ids[torch.rand(n, k, generator=gen) < 1 / 3] = -1
    ids[0] = -1
    return values, ids, torch.logsumexp(logits / 2.0, dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_against_a_float64_reference_values_and_gradients(kind):
    n, k, v_s = 6, 8, 40
    values, ids, lse = teacher_rows(n, k, 64, v_s)
    student = torch.randn(2, 4, v_s + 3, dtype=torch.float64)  # 3 rows of padding past the tokenizer
    rows = torch.tensor([0, 1, 3, 4, 6, 7])
    labels = torch.zeros(2, 4, dtype=torch.long)
    labels[1, 3] = -100  # row 7's label is ignored: its position does not count
    leaf = student.clone().requires_grad_()
    got = topk_span_kd(leaf.float(), AlignedTopK(rows, values, ids, lse, v_s), labels, kind=kind, temperature=2.0,
                       beta=0.3)  # fmt: skip
    got.kd.backward()
    ref_leaf = student.clone().requires_grad_()
    want = reference(ref_leaf.flatten(0, 1)[rows[:-1], :v_s], values[:-1], ids[:-1], lse[:-1], kind, 2.0, 0.3)
    want.backward()
    assert got.kd.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-7)
    assert got.aligned_fraction.item() == pytest.approx(5 / 7)  # 5 aligned of the 7 counted positions
    shared_mass = [torch.exp(v[i >= 0] / 2 - z).sum() for v, i, z in zip(values[:-1], ids[:-1], lse[:-1], strict=True)]
    assert got.shared_mass.item() == pytest.approx(torch.stack(shared_mass).mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_token_shared_at_k_equal_to_the_vocabulary_is_exact_kd(kind):
    """The buckets are then the whole vocabulary and an empty tail: KD on the full distributions."""
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 5, 16, generator=gen), 2 * torch.randn(1, 5, 16, generator=gen)
    values, ids = teacher[0].topk(16, dim=-1)
    aligned = AlignedTopK(torch.arange(5), values, ids, torch.logsumexp(teacher[0] / 2.0, -1), 16)
    leaf, ref_leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
    got = topk_span_kd(leaf, aligned, torch.zeros(1, 5, dtype=torch.long), kind=kind, temperature=2.0, beta=0.5)
    want = kd_loss(ref_leaf, teacher, kind=kind, temperature=2.0, beta=0.5)
    got.kd.backward()
    want.backward()
    assert got.kd.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("document_teacher")
    tokenizer_dir = save_tokenizer(root / "tok420", 420)
    folder = save_llama(root / "teacher", 420, seed=1, tokenizer=tokenizer_dir)
    from trainer.distill import teacher as teacher_io

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return teacher_io.load(folder, vocab_size=len(tokenizer)), tokenizer


def written(root: Path, teacher, texts: list[str], window: int = 12) -> doc_cache.DocumentManifest:
    model, tokenizer = teacher
    planned = doc_cache.plan(iter(texts), tokenizer, window)
    manifest = doc_cache.write_plan(root, KEY, planned, token_keys(tokenizer, token_strings(tokenizer)), window)
    doc_cache.build(root, manifest, model, tokenizer.eos_token_id, batch=3, device=torch.device("cpu"))
    return manifest


def test_the_rows_are_the_live_teachers_over_each_window_found_by_where_tokens_end(tmp_path, teacher):
    model, tokenizer = teacher
    # characters of several bytes are several tokens ending at the same character; an empty document has no tokens
    texts = [*corpus_documents(2, seed=7), "the naïve café: 日本語 text", ""]
    manifest = written(tmp_path, teacher, texts)
    reader = doc_cache.DocumentCache(tmp_path, doc_cache.check(tmp_path, KEY))
    assert manifest.documents == 4 and manifest.vocab == len(tokenizer) == 380
    assert reader.teacher_keys == token_keys(tokenizer, token_strings(tokenizer))
    first = 0
    for number, text in enumerate(texts[:3]):
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        ends = torch.tensor([end for _, end in encoding.offsets])
        positions = reader.find(torch.full_like(ends, number), ends)
        last_of_equal_ends = torch.cat([ends[1:] != ends[:-1], torch.tensor([True])])
        assert number < 2 or (~last_of_equal_ends).sum() >= 5
        assert torch.equal(positions[last_of_equal_ends], torch.arange(first, first + len(ends))[last_of_equal_ends])
        assert reader.find(torch.tensor([number]), torch.tensor([len(text) + 1])).item() == -1  # no token ends there
        ids = torch.tensor(encoding.ids)
        for start in range(0, len(ids), 11):  # windows of 11 tokens (12 with the end-of-text token of the last)
            window = ids[start : start + 11]
            last = start + 11 >= len(ids)
            inputs = torch.cat([window, torch.tensor([tokenizer.eos_token_id])]) if last else window
            with torch.no_grad():
                live = model(inputs[None])[0, : len(window)].float()
            values, picked, lse = reader.read(torch.arange(first + start, first + start + len(window)))
            want_values, want_ids = live.topk(8, dim=-1)
            assert torch.equal(picked.sort(-1).values, want_ids.sort(-1).values)
            # a value is coded as sqrt(max - value) on steps of sqrt(max - min) / 63 (the step itself in fp16)
            step = (want_values[:, :1] - want_values[:, -1:]).sqrt() / compact.CODE_MAX
            root = (want_values[:, :1] - want_values).sqrt()
            assert ((values - want_values).abs() <= 2 * root * step + step**2 + 1e-3).all()
            assert torch.allclose(lse, torch.logsumexp(live / 2.0, -1), atol=2e-3)
        first += len(ids)
    assert first == manifest.positions


def test_a_flipped_byte_is_named_and_the_writer_starts_again_at_its_window(tmp_path, teacher, capsys):
    manifest = written(tmp_path, teacher, corpus_documents(2, seed=7))
    windows = np.fromfile(tmp_path / "windows.bin", dtype=np.int64).reshape(-1, 2)
    position = int(windows[2, 0]) + 1
    with open(tmp_path / "indices.bin", "r+b") as handle:
        handle.seek(position * compact.index_bytes(8, 380) + 1)
        byte = handle.read(1)[0]
        handle.seek(-1, 1)
        handle.write(bytes([byte ^ 0x10]))
    reader = doc_cache.DocumentCache(tmp_path, manifest)
    with pytest.raises(CacheError) as error:
        reader.read(torch.tensor([0, position]))
    assert str(error.value).startswith(f"{(tmp_path / 'indices.bin').absolute()} is garbled at teacher position "
                                       f"{position} (document 0; its CRC32 differs from the one written)")  # fmt: skip
    model, tokenizer = teacher
    rewritten = doc_cache.build(tmp_path, manifest, model, tokenizer.eos_token_id, batch=3, device=torch.device("cpu"))
    assert rewritten == manifest.windows - 2 and "writing the cache again from window 2" in capsys.readouterr().err
    assert doc_cache.DocumentCache(tmp_path, manifest).read(torch.tensor([position]))[0].shape == (1, 8)


def test_an_unfinished_cache_and_another_key_are_refused_in_one_line(tmp_path, teacher):
    model, tokenizer = teacher
    planned = doc_cache.plan(iter(corpus_documents(2, seed=7)), tokenizer, 12)
    doc_cache.write_plan(tmp_path, KEY, planned, token_keys(tokenizer, token_strings(tokenizer)), 12)
    with pytest.raises(CacheError, match=r" is incomplete: 0 of \d+ windows written \(run python -m trainer.cache "):
        doc_cache.check(tmp_path, KEY)
    assert doc_cache.check(tmp_path, KEY, complete=False).positions == len(planned.keys)
    other = doc_cache.DocumentKey(teacher="t", corpus="d", k=8, temperature=2.0)
    with pytest.raises(CacheError, match=r"was written for another teacher, corpus, k or temperature \(cache vs this "
                                         r"run: corpus 'c' != 'd'\)"):  # fmt: skip
        doc_cache.check(tmp_path, other)


def test_a_students_token_ends_are_where_its_tokens_end_in_the_document(tmp_path):
    """``train.ends.bin``, built on first use: each training token's end in its document, -1 for the end-of-text
    token; a rebuilt data set of the same files reuses it."""
    from trainer import data
    from trainer.config import DataConfig
    from trainer.data import spans

    tokenizer_dir = save_tokenizer(tmp_path / "tok300", 300)
    texts = corpus_documents(12, seed=4)
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02d}.md").write_text(text)
    cfg = DataConfig(name="text", files=[str(tmp_path / "*.md")], tokenizer=str(tokenizer_dir), val_fraction=0.2,
                     cache_dir=str(tmp_path / "data_cache"))  # fmt: skip
    dataset = data.build(cfg, 16)
    token_spans = spans.load(cfg, dataset.root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    train = [i for i in range(len(texts)) if not data.shards.is_val(i, 0.2)]
    stream_documents, ends = token_spans.of(torch.tensor([0]), int(token_spans.ends.shape[0]))
    at = 0
    for number in train:
        ids = tokenizer.encode(texts[number], add_special_tokens=False)
        assert (stream_documents[0, at : at + len(ids) + 1] == number).all()
        prefix_lengths = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
        assert ends[0, at : at + len(ids)].tolist() == prefix_lengths and ends[0, at + len(ids)].item() == -1
        at += len(ids) + 1
    assert at == len(token_spans.ends) and 8 <= len(train) < 12
    modified = (dataset.root / spans.ENDS).stat().st_mtime_ns
    spans.load(cfg, dataset.root)
    assert (dataset.root / spans.ENDS).stat().st_mtime_ns == modified


def test_a_cache_of_the_other_layout_says_which_layout_it_is(tmp_path):
    from trainer import cache

    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / "manifest.json").write_text('{"format": "stillroom-teacher-cache/3"}')
    with pytest.raises(CacheError, match=r"not 'stillroom-document-cache/1' \(a cache of batches: set "
                                         r"teacher.cache_layout=batches, or build one kept by document"):  # fmt: skip
        doc_cache.read_manifest(tmp_path / "batches")
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "manifest.json").write_text('{"format": "stillroom-document-cache/1"}')
    with pytest.raises(CacheError, match=r"\(kept by document: set teacher.cache_layout=documents\)"):
        cache.read_manifest(tmp_path / "documents")
