"""The data sets of ``data=text|chat``, read from memory-mapped token shards (``trainer.data.shards``).

``TextData``: windows of ``block_size + 1`` tokens at random starts in the concatenated stream of the training
documents (each ended by the end-of-text token); validation windows from the held-out documents' stream.

``ChatData``: one sample per row (no packing), padded after its end with the end-of-text token; labels are
``IGNORE_INDEX`` on every target that is not assistant output and on the padding. Padding only at the end keeps
causal attention exact without an attention mask: no real token attends to a pad. Rows hold different numbers of
trained tokens, so ``trained_counts`` gives the counts of a rank's slice and of the whole global batch, by which
the losses are weighted to the mean over the global batch's trained tokens (``Batches.loss_scale``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.data.batching import WHOLE, Shard, StreamWindows, local_slice, step_generator
from trainer.data.shards import mapped

IGNORE_INDEX = -100


class ShardData:
    """What both data sets share: the shard files, the tokenizer's vocabulary, the fingerprint."""

    task = "lm"
    masked = False

    def __init__(self, root: Path, manifest: dict, block_size: int, eval_batches: int, tokenizer):
        self.root, self.manifest = root, manifest
        self.block_size, self.eval_batches, self.tokenizer = block_size, eval_batches, tokenizer
        self.vocab_size = manifest["vocab"]
        self.fingerprint = root.name
        self._dtype = np.dtype(manifest["dtype"])

    def _array(self, split: str, name: str) -> np.ndarray:
        dtype = {"tokens": self._dtype, "mask": np.uint8}.get(name, np.int64)
        return mapped(self.root / f"{split}.{name}.bin", np.dtype(dtype))

    def tokens_per_sample(self) -> int:
        return self.block_size

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def shard_files(self) -> dict[str, str]:
        """{path: SHA-256} of the token shards this data set reads."""
        return {str(self.root / name): entry["sha256"] for name, entry in self.manifest["files"].items()}


class TextData(ShardData, StreamWindows):
    def __init__(self, root: Path, manifest: dict, block_size: int, eval_batches: int, tokenizer):
        super().__init__(root, manifest, block_size, eval_batches, tokenizer)
        self.train_tokens, self.val_tokens = self._array("train", "tokens"), self._array("val", "tokens")
        self._window = np.arange(block_size + 1)

    def _windows(self, tokens: np.ndarray, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(tokens[starts.numpy()[:, None] + self._window].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class ChatData(ShardData):
    masked = True

    def __init__(self, root: Path, manifest: dict, block_size: int, eval_batches: int, tokenizer):
        super().__init__(root, manifest, block_size, eval_batches, tokenizer)
        self.pad = manifest["eos"]
        self.splits = {split: self._samples(split) for split in ("train", "val")}

    def _samples(self, split: str) -> dict[str, np.ndarray]:
        lengths = np.asarray(self._array(split, "lengths"))
        starts = np.cumsum(lengths, dtype=np.int64) - lengths
        mask = self._array(split, "mask")
        cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        trained = cumulative[starts + lengths] - cumulative[starts + 1]  # the first token is never a target
        return {"tokens": self._array(split, "tokens"), "mask": mask, "starts": starts, "lengths": lengths,
                "trained": trained}  # fmt: skip

    def rows(self, split: str, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of ``samples`` of ``split``, one per row, padded to ``block_size + 1`` tokens."""
        s = self.splits[split]
        tokens = np.full((len(samples), self.block_size + 1), self.pad, dtype=np.int64)
        labels = np.full_like(tokens, IGNORE_INDEX)
        for row, i in enumerate(samples.tolist()):
            start, length = s["starts"][i], s["lengths"][i]
            tokens[row, :length] = s["tokens"][start : start + length]
            trained = s["mask"][start : start + length].astype(bool)
            labels[row, :length][trained] = tokens[row, :length][trained]
        x, y = torch.from_numpy(tokens), torch.from_numpy(labels)
        return x[:, :-1], y[:, 1:]

    def _train_samples(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        return torch.randint(len(self.splits["train"]["lengths"]), (batch_size,), generator=step_generator(seed, step))

    def train_batch(self, seed: int, step: int, batch_size: int, shard: Shard, micro: int = 0):
        return self.rows("train", local_slice(self._train_samples(seed, step, batch_size), shard, micro))

    def trained_counts(self, seed: int, step: int, batch_size: int, shard: Shard, micro: int) -> tuple[int, int]:
        """Trained tokens in this rank's micro-batch and in the whole global batch of ``step``."""
        samples = self._train_samples(seed, step, batch_size)
        trained = self.splits["train"]["trained"]
        return int(trained[local_slice(samples, shard, micro).numpy()].sum()), int(trained[samples.numpy()].sum())

    def val_batches(self, batch_size: int, shard: Shard = WHOLE):
        """A fixed list of validation batches (the same for every eval and every run)."""
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.eval_batches):
            samples = torch.randint(len(self.splits["val"]["lengths"]), (batch_size,), generator=gen)
            yield self.rows("val", local_slice(samples, shard, 0))
