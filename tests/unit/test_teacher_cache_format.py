"""The teacher cache's files: shard layout, and what a writer stores is what a reader returns."""

from __future__ import annotations

import pytest
import torch

from trainer.distill import cache

KEY = cache.CacheKey(
    teacher="t", data="d", val_fraction=0.1, seed=1, batch_size=4, block_size=3, k=5, vocab=11, precision="fp32"
)


def test_steps_split_into_contiguous_shards():
    manifest = cache.new_manifest(KEY, steps=7, positions=3, values_dtype="fp32", n_shards=3)
    assert manifest.shards == ((0, 2), (2, 4), (4, 7))
    assert manifest.indices_dtype == "int16" and manifest.shape(2) == (3, 4, 3, 5)
    assert cache.Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("dtype, tol", [("fp32", 0.0), ("bf16", 1e-2), ("fp16", 1e-3)])
def test_reader_returns_what_the_writer_stored(tmp_path, dtype, tol):
    manifest = cache.new_manifest(KEY, steps=4, positions=3, values_dtype=dtype, n_shards=2)
    cache.write_json_atomic(tmp_path / cache.MANIFEST, manifest.to_json())
    logits = torch.randn(4, 4, 3, 11, generator=torch.Generator().manual_seed(0))
    for shard in range(2):
        writer = cache.ShardWriter(tmp_path, manifest, shard)
        for step in range(*manifest.shards[shard]):
            writer.write(step, logits[step])
    assert [cache.steps_done(tmp_path, s) for s in range(2)] == [2, 2]
    reader = cache.CacheReader(tmp_path, cache.read_manifest(tmp_path))
    rows = torch.tensor([1, 3])
    values, indices, lse = reader.read(3, rows)
    want_values, want_indices = logits[3, rows].topk(5, dim=-1)  # topk copies values: exact for any batch shape
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=tol, atol=tol)  # tol: one rounding to bf16 / fp16
    # Bit for bit: the writer's own computation (logsumexp of the whole [4, 3, 11] step, then the rows picked), so
    # same op, same shape; logsumexp of only the picked rows could round differently on another kernel path.
    torch.testing.assert_close(lse, logits[3].logsumexp(-1)[rows], rtol=0, atol=0)


def test_steps_are_written_in_order(tmp_path):
    manifest = cache.new_manifest(KEY, steps=2, positions=3, values_dtype="fp32", n_shards=1)
    with pytest.raises(AssertionError, match="out of order"):
        cache.ShardWriter(tmp_path, manifest, 0).write(1, torch.zeros(4, 3, 11))
