"""Data sources. Every batch is a pure function of (seed, step, rank, world size).

A step's global batch (``train.batch_size`` samples) is drawn from the seed and the step alone;
rank ``r`` of ``w`` takes the r-th of w equal slices, and accumulation splits that slice into
micro-batches. So a resumed run sees exactly the batches it would have seen, and 1 and N ranks
see the same global batch.

``data=text|chat`` read subword token shards (``shards``: the build and its manifest; ``packed``: the data sets;
``corpus``, ``chat`` and ``tokenizer``: the files, the conversations and the tokenizer); this module dispatches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TOKENIZED_DATA, DataConfig
from trainer.data import shards, tokenizer
from trainer.data.batching import WHOLE, Shard, StreamWindows, local_slice, step_generator
from trainer.data.errors import DataError
from trainer.data.packed import IGNORE_INDEX, ChatData, ShardData, TextData

__all__ = ["IGNORE_INDEX", "ChatData", "DataError", "Shard", "ShardData", "TextData", "local_slice", "step_generator"]

SHAKESPEARE = Path(__file__).with_name("tinyshakespeare.txt")


@dataclass(frozen=True)
class Batches:
    """The training batches this rank reads, on ``device``: each step's global batch is a function of the seed and
    the step (``train_batch``), of which this rank takes its ``shard``'s slice of micro-batch ``micro``."""

    dataset: TokenData | DigitsData | TextData | ChatData
    shard: Shard
    seed: int
    batch_size: int
    device: torch.device

    @property
    def tokens_per_sample(self) -> int:
        return self.dataset.tokens_per_sample()

    def train(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.train_batch(self.seed, step, self.batch_size, self.shard, micro)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss_scale(self, step: int, micro: int = 0) -> float:
        """The factor that turns micro-batch ``micro``'s mean loss over its own trained tokens into its share of the
        mean over the global batch's (averaged over micro-batches and ranks, as gradients are): 1 where every
        label is trained, so that such data's losses are unchanged."""
        if not self.dataset.masked:
            return 1.0
        assert isinstance(self.dataset, ChatData)  # the data set with masked labels
        local, total = self.dataset.trained_counts(self.seed, step, self.batch_size, self.shard, micro)
        return local * self.shard.world * self.shard.grad_accum / total


class TokenData(StreamWindows):
    """Next-token prediction over a 1-D token stream (character-level text or synthetic)."""

    task = "lm"
    masked = False

    def __init__(
        self,
        tokens: torch.Tensor,
        vocab: list[str] | int,
        val_fraction: float,
        block_size: int,
        eval_batches: int,
        fingerprint: str,
    ):
        n_train = int(len(tokens) * (1 - val_fraction))
        self.train_tokens, self.val_tokens = tokens[:n_train], tokens[n_train:]
        self.vocab = vocab
        self.vocab_size = len(vocab) if isinstance(vocab, list) else vocab
        self.block_size = block_size
        self.eval_batches = eval_batches
        self.fingerprint = fingerprint
        self._window = torch.arange(block_size + 1)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor):
        rows = tokens[starts[:, None] + self._window]
        return rows[:, :-1], rows[:, 1:]

    def tokens_per_sample(self) -> int:
        return self.block_size

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids) if isinstance(self.vocab, list) else str(list(ids))


DIGITS_FEATURES = 64  # 8 x 8 pixels


class DigitsData:
    """scikit-learn's 8x8 digits as 64 features in [0, 1], with a fixed stratified split."""

    task = "classify"
    masked = False

    def __init__(self, val_fraction: float):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        tr, va = train_test_split(range(len(y)), test_size=val_fraction, random_state=0, stratify=digits.target)
        self.x_train, self.y_train = x[tr], y[tr]
        self.x_val, self.y_val = x[va], y[va]
        self.in_dim, self.n_classes = DIGITS_FEATURES, 10
        self.vocab_size = self.n_classes
        self.fingerprint = hashlib.sha256(x.numpy().tobytes() + str(va).encode()).hexdigest()[:16]

    def train_batch(self, seed: int, step: int, batch_size: int, shard: Shard, micro: int = 0):
        rows = torch.randint(len(self.y_train), (batch_size,), generator=step_generator(seed, step))
        rows = local_slice(rows, shard, micro)
        return self.x_train[rows], self.y_train[rows]

    def val_batches(self, batch_size: int, shard: Shard = WHOLE):
        """The whole test split, in one batch per rank."""
        rows = torch.arange(len(self.y_val))
        per_rank = -(-len(rows) // shard.world)
        rows = rows[shard.rank * per_rank : (shard.rank + 1) * per_rank]
        yield self.x_val[rows], self.y_val[rows]

    def tokens_per_sample(self) -> int:
        return 1


def _char_data(cfg: DataConfig, block_size: int) -> TokenData:
    path = Path(cfg.path) if cfg.path else SHAKESPEARE
    text = read_text(path)
    chars = sorted(set(text))
    lookup = torch.full((max(map(ord, chars)) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
    tokens = lookup[torch.tensor([ord(c) for c in text])]
    return TokenData(tokens, chars, cfg.val_fraction, block_size, cfg.eval_batches, fingerprint(cfg))


def _synthetic_data(cfg: DataConfig, block_size: int) -> TokenData:
    """A fixed random first-order Markov chain with peaked transitions: learnable, no files."""
    gen = torch.Generator().manual_seed(0)
    v = cfg.synthetic_vocab
    transition = torch.softmax(3.0 * torch.randn(v, v, generator=gen), dim=1)
    tokens = torch.empty(cfg.synthetic_tokens, dtype=torch.int64)
    tokens[0] = 0
    draws = torch.rand(cfg.synthetic_tokens, generator=gen)
    cumulative = transition.cumsum(1)
    for i in range(1, cfg.synthetic_tokens):
        tokens[i] = torch.searchsorted(cumulative[tokens[i - 1]], draws[i]).clamp(max=v - 1)
    return TokenData(tokens, v, cfg.val_fraction, block_size, cfg.eval_batches, fingerprint(cfg))


def fingerprint(cfg: DataConfig) -> str:
    """The data set's ``fingerprint`` without tokenizing it: the corpus hash, or the generator's settings."""
    if cfg.name == "synthetic":
        return f"synthetic-{cfg.synthetic_vocab}-{cfg.synthetic_tokens}"
    if cfg.name == "digits":
        return DigitsData(cfg.val_fraction).fingerprint
    if cfg.name in TOKENIZED_DATA:
        return shards.folder(cfg, block_size=0).name  # the files, the tokenizer and the settings
    path = Path(cfg.path) if cfg.path else SHAKESPEARE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_tokenizer(cfg: DataConfig, folder: Path) -> None:
    """Give a Hugging Face model folder without a tokenizer the one the data was tokenized with (text and chat)."""
    if cfg.name in TOKENIZED_DATA:
        tokenizer.save_into(folder, cfg.tokenizer)


def vocab_size(cfg: DataConfig) -> int:
    """The data's vocabulary (classes for digits) without building the data set."""
    if cfg.name == "synthetic":
        return cfg.synthetic_vocab
    if cfg.name == "digits":
        return 10
    if cfg.name in TOKENIZED_DATA:
        return tokenizer.vocab_size(cfg.tokenizer)
    path = Path(cfg.path) if cfg.path else SHAKESPEARE
    return len(set(read_text(path)))


def read_text(path: Path) -> str:
    """A corpus file's text; DataError naming the file when it is a folder, binary or not UTF-8."""
    if path.is_dir():
        raise DataError("data.path", f"{path} is a folder, not a text file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError("data.path", f"{path} is not text (it holds NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("data.path", f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check(cfg: DataConfig, block_size: int) -> None:
    """That both splits of the data hold more than one window of ``block_size`` tokens (DataError otherwise)."""
    if cfg.name == "digits":
        return
    if cfg.name in TOKENIZED_DATA:
        _check_tokenized(cfg, block_size)
        return
    if cfg.name == "synthetic":
        tokens, what = cfg.synthetic_tokens, f"data.synthetic_tokens={cfg.synthetic_tokens}"
    else:
        path = Path(cfg.path) if cfg.path else SHAKESPEARE
        tokens = len(read_text(path))
        what = f"{path} has {tokens} characters"
    n_train = int(tokens * (1 - cfg.val_fraction))
    smaller = min(n_train, tokens - n_train)
    if smaller <= block_size + 1:
        raise DataError(
            "student.block_size",
            f"{block_size} tokens do not fit the data: {what}, so one split has "
            f"{smaller} tokens (it needs more than {block_size + 1})",
        )


def _check_tokenized(cfg: DataConfig, block_size: int) -> None:
    """Build (or reuse) the token shards, and check that each split can fill a batch's rows."""
    _, manifest = shards.prepare(cfg, block_size)
    stats = manifest["stats"]
    for split in ("train", "val"):
        if cfg.name == "text" and stats[f"{split}_tokens"] <= block_size + 1:
            raise DataError(
                "student.block_size",
                f"{block_size} tokens do not fit the data: the {split} split of data.files has "
                f"{stats[f'{split}_tokens']} tokens (it needs more than {block_size + 1})",
            )
        if cfg.name == "chat" and stats[f"{split}_documents"] == 0:
            raise DataError(
                "data.files",
                f"the {split} split has no sample ({stats['documents']} rows, {stats['dropped']} dropped as too long "
                "or with no assistant token left; see data.val_fraction and data.overflow)",
            )


def model_fields(cfg: DataConfig) -> dict[str, int]:
    """What the data decides in a model's config (a family's config takes those of these fields it has)."""
    if cfg.name == "digits":
        return {"in_dim": DIGITS_FEATURES, "n_classes": 10, "vocab_size": 10}
    return {"vocab_size": vocab_size(cfg)}


def build(cfg: DataConfig, block_size: int):
    if cfg.name == "shakespeare":
        return _char_data(cfg, block_size)
    if cfg.name == "synthetic":
        return _synthetic_data(cfg, block_size)
    if cfg.name == "digits":
        return DigitsData(cfg.val_fraction)
    if cfg.name in TOKENIZED_DATA:
        root, manifest = shards.prepare(cfg, block_size)
        kind = TextData if cfg.name == "text" else ChatData
        return kind(root, manifest, block_size, cfg.eval_batches, tokenizer.load(cfg.tokenizer))
    raise ValueError(f"data.name: unknown data set {cfg.name!r}")
