"""data=text|chat: token counts are the tokenizer's own, chat trains exactly the assistant's tokens, the split is
by document, the shards are reused, rebuilt on change and finished after an interruption, the losses of masked
labels are the global batch's mean, and bad inputs stop in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import preflight_in_process
from tests.data_files import conversations, documents, save_tokenizer, write_jsonl
from trainer import data
from trainer.config import DataConfig
from trainer.data import shards

pytest.importorskip("transformers", reason="subword tokenizers need the `hf` extra")
BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def corpus(root: Path, n: int = 30) -> list[Path]:
    root.mkdir(exist_ok=True)
    paths = [root / f"{i:03d}.py" for i in range(n)]
    for path, text in zip(paths, documents(n)):
        path.write_text(text)
    return paths


def text_config(tmp_path: Path, tokenizer_dir: Path, **overrides) -> DataConfig:
    fields = dict(name="text", files=[str(tmp_path / "corpus" / "*.py")], tokenizer=str(tokenizer_dir))
    return DataConfig(**{**fields, "cache_dir": str(tmp_path / "cache"), **overrides})


def read(root: Path, split: str, name: str, dtype) -> np.ndarray:
    return np.fromfile(root / f"{split}.{name}.bin", dtype=dtype)


def test_token_counts_are_the_tokenizers_own_and_the_split_is_by_document(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_ROWS", 7)  # several chunks
    paths = corpus(tmp_path / "corpus")
    dataset = data.build(text_config(tmp_path, tokenizer_dir), BLOCK)
    tok = data.tokenizer.load(str(tokenizer_dir))
    own = [tok(p.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in paths]
    ids = {split: read(dataset.root, split, "ids", np.int64) for split in ("train", "val")}
    assert not set(ids["train"]) & set(ids["val"]) and sorted([*ids["train"], *ids["val"]]) == list(range(len(paths)))
    assert 0 < len(ids["val"]) < len(ids["train"])
    for split, tokens in (("train", dataset.train_tokens), ("val", dataset.val_tokens)):
        assert tokens.tolist() == [t for i in ids[split] for t in own[i]]
    stats = dataset.manifest["stats"]
    assert stats["train_tokens"] + stats["val_tokens"] == sum(map(len, own)) == sum(len(t) + 1 for t in own) - 30
    assert dataset.train_tokens.dtype == np.uint16 and dataset.vocab_size == len(tok)
    x, y = dataset.train_batch(1, 3, 4, data.Shard())
    assert x.shape == y.shape == (4, BLOCK) and torch.equal(x[:, 1:], y[:, :-1])


def test_shards_are_reused_rebuilt_on_change_and_finished_after_an_interruption(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_ROWS", 4)
    paths = corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path, tokenizer_dir)
    root, manifest = shards.prepare(cfg, BLOCK, progress=False)
    assert shards.prepare(cfg, BLOCK, progress=False) == (root, manifest)  # reused, not rebuilt
    paths[3].write_text("changed")
    other, _ = shards.prepare(cfg, BLOCK, progress=False)
    assert other != root
    paths[3].write_text(documents(30)[3])
    (root / shards.MANIFEST).unlink()
    for f in root.glob("*.bin"):
        f.unlink()
    tokenize, calls = shards.tokenize_chunk, []

    def stops_at_chunk_3(cfg, block_size, first, items):
        calls.append(first)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return tokenize(cfg, block_size, first, items)

    monkeypatch.setattr(shards, "tokenize_chunk", stops_at_chunk_3)
    with pytest.raises(KeyboardInterrupt):
        shards.prepare(cfg, BLOCK, progress=False)
    assert not (root / shards.MANIFEST).exists() and len(list((root / "parts").glob("*.json"))) == 3
    calls.clear()
    monkeypatch.setattr(shards, "tokenize_chunk", tokenize)
    again, resumed = shards.prepare(cfg, BLOCK, progress=False)
    assert again == root and resumed["files"] == manifest["files"]  # the same shards, byte for byte


def test_a_shard_with_a_flipped_bit_is_named_and_tokenized_again(tmp_path, tokenizer_dir, capsys):
    """The manifest's SHA-256s are checked, not only the sizes: a flipped bit in a token shard used to train on
    garbled tokens. Each file is hashed once per change (its size and time recorded beside the folder)."""
    corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path, tokenizer_dir)
    root, manifest = shards.prepare(cfg, BLOCK, progress=False)
    tokens = root / "train.tokens.bin"
    original = tokens.read_bytes()
    record = root.with_name(root.name + ".verified.json")
    assert json.loads(record.read_text()).keys() == manifest["files"].keys()  # hashed once, at the first read
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    tokens.write_bytes(bytes(flipped))
    capsys.readouterr()
    again, rebuilt = shards.prepare(cfg, BLOCK, progress=False)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tokens} is garbled (its SHA-256 differs from the one written): tokenizing the data again"
    ]
    assert again == root and tokens.read_bytes() == original and rebuilt["files"] == manifest["files"]
    hashed = []
    sha256 = shards.file_hashes.sha256
    shards.file_hashes.sha256 = lambda path: hashed.append(path) or sha256(path)
    try:
        shards.prepare(cfg, BLOCK, progress=False)
    finally:
        shards.file_hashes.sha256 = sha256
    assert hashed == []  # unchanged since checked: not hashed again


def assistant_tokens(tok, messages: list[dict]) -> int:
    """The assistant's tokens counted from the tokenizer's own rendering of the conversation's prefixes."""
    count = 0
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: k + 1], tokenize=False)
            count += len(tok(through, add_special_tokens=False)["input_ids"])
            count -= len(tok(before, add_special_tokens=False)["input_ids"])
    return count


def test_chat_trains_the_assistant_tokens_alone(tmp_path, tokenizer_dir):
    rows = conversations(40)
    cfg = DataConfig(
        name="chat",
        files=[str(write_jsonl(tmp_path / "chat.jsonl", rows))],
        tokenizer=str(tokenizer_dir),
        cache_dir=str(tmp_path / "cache"),
    )
    dataset = data.build(cfg, 128)  # longer than every conversation: none is cut
    tok = data.tokenizer.load(str(tokenizer_dir))
    stats = dataset.manifest["stats"]
    expected = [assistant_tokens(tok, data.chat.conversation(Path("x"), i, row)) for i, row in enumerate(rows)]
    assert stats["dropped"] == 0 and stats["train_trained_tokens"] + stats["val_trained_tokens"] == sum(expected)
    train_ids = read(dataset.root, "train", "ids", np.int64)
    x, y = dataset.rows("train", torch.arange(len(train_ids)))
    assert [int((row != data.IGNORE_INDEX).sum()) for row in y] == [expected[i] for i in train_ids]
    trained = y != data.IGNORE_INDEX
    assert torch.equal(y[trained], torch.cat([x[:, 1:], x[:, -1:]], 1)[trained])  # labels are the next tokens
    assert tok.decode(y[0][trained[0]]).endswith("<|im_end|>\n")


def test_chat_overflow_truncates_or_drops(tmp_path, tokenizer_dir):
    files = [str(write_jsonl(tmp_path / "chat.jsonl", conversations(12)))]
    kept = data.build(DataConfig(name="chat", files=files, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path)), 64)
    dropped = data.build(
        DataConfig(name="chat", files=files, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path), overflow="drop"), 64
    )
    assert dropped.manifest["stats"]["dropped"] > kept.manifest["stats"]["dropped"]
    assert max(read(kept.root, "train", "lengths", np.int64)) == 65


def test_masked_losses_are_the_global_batchs_mean_on_any_layout(tmp_path, tokenizer_dir):
    """Each micro-batch's mean CE times ``loss_scale``, averaged over micro-batches and ranks (as gradients are), is
    the mean over the global batch's trained tokens: the same on 1 rank, 2 ranks and with accumulation."""
    files = [str(write_jsonl(tmp_path / "chat.jsonl", conversations(40)))]
    dataset = data.build(
        DataConfig(name="chat", files=files, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path)), 64
    )
    logits = torch.randn(dataset.vocab_size, generator=torch.Generator().manual_seed(0))

    def mean_ce(y):
        return F.cross_entropy(logits.expand(*y.shape, -1).reshape(-1, len(logits)), y.reshape(-1))

    x, y = dataset.train_batch(5, 2, 8, data.Shard())
    for world, accum in ((1, 1), (2, 1), (2, 2), (1, 4)):
        total = 0.0
        for rank in range(world):
            batches = data.Batches(dataset, data.Shard(rank, world, accum), 5, 8, torch.device("cpu"))
            for micro in range(accum):
                total += mean_ce(batches.train(2, micro)[1]) * batches.loss_scale(2, micro) / (world * accum)
        torch.testing.assert_close(total, mean_ce(y), rtol=1e-6, atol=0)


def text_args(tmp_path: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["data=text", f"data.tokenizer={tokenizer_dir}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parametrize(
    "files, extra, expected",
    [
        ("missing/*.txt", (), "data.files: missing/*.txt matches no file"),
        ("nowhere.txt", (), "data.files: nowhere.txt does not exist"),
        ("bad.jsonl", (), "bad.jsonl:2 is not JSON"),
        ("fields.jsonl", (), "data.text_field:"),
        ("empty.jsonl", (), "data.files: the corpus is empty"),
        ("chat.jsonl", ("data=chat",), "has no `messages`"),
        ("roles.jsonl", ("data=chat",), "unknown role 'robot'"),
        ("fields.jsonl", ("data=chat", "data.tokenizer=plain"), "data.tokenizer: plain has no chat template"),
        ("ok.txt", ("data.tokenizer=nowhere",), "data.tokenizer: nowhere is neither a tokenizer folder"),
    ],
)
def test_bad_inputs_stop_in_one_line(tmp_path, tokenizer_dir, monkeypatch, files, extra, expected):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])
    with open(tmp_path / "bad.jsonl", "a") as f:
        f.write("{not json\n")
    write_jsonl(tmp_path / "fields.jsonl", [{"body": "a"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "robot", "content": "a"}]}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "ok.txt").write_text("some text")
    if "data.tokenizer=plain" in extra:
        save_tokenizer(tmp_path / "plain", template=False)
    args = text_args(tmp_path, tokenizer_dir, f"data.files=[{files}]", *extra)
    args = [a for a in args if not (a == "data=text" and "data=chat" in extra)]
    code, lines = preflight_in_process(tmp_path, monkeypatch, *args)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing left as valid


def test_sequence_longer_than_the_data_stops_in_one_line(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "ok.txt").write_text("some text")
    code, lines = preflight_in_process(
        tmp_path, monkeypatch, *text_args(tmp_path, tokenizer_dir, "data.files=[ok.txt]")
    )
    assert code == 2 and "student.block_size: 64 tokens do not fit the data" in lines[0], lines


def test_trainer_data_prints_what_the_model_learns_from(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import sys

    from trainer.cli.data import main

    corpus(tmp_path / "corpus", n=60)
    monkeypatch.chdir(tmp_path)
    args = text_args(tmp_path, tokenizer_dir, "data.files=[corpus/*.py]", "student.block_size=16")
    monkeypatch.setattr(sys, "argv", ["trainer.data", *args])
    main()
    line = json.loads(capsys.readouterr().out.strip())
    assert line["documents"] == 60 and line["tokens"]["train"] == line["trained_tokens"]["train"] > 0
    assert Path(line["cache"]).is_dir() and line["tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["text", "chat"])
def test_ranks_read_disjoint_slices_of_the_same_global_batch(tmp_path, tokenizer_dir, name):
    corpus(tmp_path / "corpus")
    files = (
        [str(tmp_path / "corpus" / "*.py")]
        if name == "text"
        else [str(write_jsonl(tmp_path / "c.jsonl", conversations(20)))]
    )
    dataset = data.build(
        DataConfig(name=name, files=files, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path)),
        128 if name == "chat" else BLOCK,
    )
    whole = dataset.train_batch(7, 4, 8, data.Shard())
    for world, accum in ((2, 1), (4, 2)):
        slices = [
            dataset.train_batch(7, 4, 8, data.Shard(rank, world, accum), micro)
            for rank in range(world)
            for micro in range(accum)
        ]
        for part in (0, 1):
            assert torch.equal(torch.cat([s[part] for s in slices]), whole[part])
    assert not torch.equal(dataset.train_batch(7, 5, 8, data.Shard())[0], whole[0])


def test_a_tokenizer_other_than_the_teachers_is_refused_under_exact_alignment(tmp_path, tokenizer_dir, monkeypatch):
    """With ``distill.align=exact``; ``auto`` distills across the two (tests/e2e/test_cross_tokenizer.py)."""
    from tests.data_files import save_llama

    save_llama(tmp_path / "llama_teacher", 300, tokenizer=tokenizer_dir)
    save_llama(tmp_path / "student", 300)
    corpus(tmp_path / "corpus")
    other = save_tokenizer(tmp_path / "other", other=True)
    args = text_args(tmp_path, other, "data.files=[corpus/*.py]", "student=hf", "student.path=student")
    args += ["student.block_size=16", "distill=kd", "teacher=hf", "teacher.checkpoint=llama_teacher"]
    code, lines = preflight_in_process(tmp_path, monkeypatch, *args, "distill.align=exact")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: data.tokenizer: {other} (300 tokens) is not the teacher's"), lines


def test_a_gguf_files_tokenizer_reads_a_corpus(tmp_path):
    """``data.tokenizer`` naming a GGUF file: its embedded tokenizer (here 32 byte-level BPE tokens)."""
    pytest.importorskip("gguf", reason="GGUF files need the `hf` extra")
    from tests.gguf_files import VOCAB, tiny_llama, write_gguf

    gguf = write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("ab ba abba " * 40)
    (tmp_path / "corpus" / "b.txt").write_text("baab a b " * 40)
    cfg = DataConfig(name="text", files=[str(tmp_path / "corpus" / "*")], tokenizer=str(gguf), cache_dir=str(tmp_path))
    dataset = data.build(cfg, BLOCK)
    tok = data.tokenizer.load(str(gguf))
    assert dataset.vocab_size == data.vocab_size(cfg) == VOCAB
    assert dataset.val_tokens.tolist() == tok("ab ba abba " * 40, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


def test_a_sequence_longer_than_the_students_positions_stops_in_one_line(tmp_path, tokenizer_dir, monkeypatch):
    from tests.data_files import save_llama

    save_llama(tmp_path / "student", 300)
    corpus(tmp_path / "corpus", n=80)
    args = text_args(tmp_path, tokenizer_dir, "data.files=[corpus/*.py]", "student=hf", "student.path=student")
    code, lines = preflight_in_process(tmp_path, monkeypatch, *args, "student.block_size=128")
    assert code == 2 and len(lines) == 1, lines
    assert "student.block_size: 128 is longer than the model's 64 positions" in lines[0], lines
