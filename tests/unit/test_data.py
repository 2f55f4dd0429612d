"""Data: nanoGPT's split, and batches that are a pure function of (seed, step, rank, world size)."""

from __future__ import annotations

import torch

from trainer import data
from trainer.config import DataConfig


def test_shakespeare_split_and_vocabulary():
    d = data.build(DataConfig(), block_size=64)
    assert d.vocab_size == 65 == data.vocab_size(DataConfig())
    assert (len(d.train_tokens), len(d.val_tokens)) == (1_003_854, 111_540)
    x, y = d.train_batch(seed=1, step=0, batch_size=4, shard=data.Shard())
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert d.decode(d.train_tokens[:14].tolist()) == "First Citizen:"


def test_batches_are_a_pure_function_of_seed_and_step():
    d = data.build(DataConfig(name="synthetic"), block_size=16)
    a = d.train_batch(seed=3, step=7, batch_size=8, shard=data.Shard())
    b = d.train_batch(seed=3, step=7, batch_size=8, shard=data.Shard())
    c = d.train_batch(seed=3, step=8, batch_size=8, shard=data.Shard())
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_global_batch_does_not_depend_on_world_size_or_accumulation():
    d = data.build(DataConfig(name="synthetic"), block_size=16)
    whole, _ = d.train_batch(seed=0, step=5, batch_size=8, shard=data.Shard())
    for world, accum in [(2, 1), (4, 1), (2, 2), (1, 4)]:
        parts = [
            d.train_batch(seed=0, step=5, batch_size=8, shard=data.Shard(r, world, accum), micro=m)[0]
            for r in range(world)
            for m in range(accum)
        ]
        assert torch.equal(torch.cat(parts), whole), (world, accum)


def test_digits_split_is_fixed_and_stratified():
    a, b = (
        data.build(DataConfig(name="digits", val_fraction=0.2), 0),
        data.build(DataConfig(name="digits", val_fraction=0.2), 0),
    )
    assert a.x_train.shape == (1437, 64) and a.x_val.shape == (360, 64)
    assert torch.equal(a.y_val, b.y_val)
    assert torch.bincount(a.y_val).min() >= 35
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_val_batches_are_fixed():
    d = data.build(DataConfig(name="synthetic", eval_batches=3), block_size=16)
    first = [x for x, _ in d.val_batches(4)]
    second = [x for x, _ in d.val_batches(4)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
