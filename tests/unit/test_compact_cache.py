"""The compact teacher cache (``teacher.cache_dtype=compact``): 6-bit value codes and Elias-Fano ids in fixed-size
rows, at most 150 bytes a position at k = 64 of SmolLM2's 49,152 tokens, and a KD loss read from it within 1e-3 of
the fp32 cache's against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import cache
from trainer.cache import compact
from trainer.distill.losses import kd_loss_topk


@pytest.mark.parametrize("k, vocab", [(64, 49_152), (5, 11), (11, 11), (1, 2), (3, 1000), (8, 65_537)])
def test_ids_come_back_exactly_and_values_within_half_a_code(k, vocab):
    logits = torch.randn(3, 7, vocab, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3
    values, indices = logits.float().topk(k, dim=-1)
    value_rows, index_rows = compact.encode(values.numpy(), indices.numpy(), vocab)
    assert value_rows.shape == (3, 7, compact.value_bytes(k)) and index_rows.shape == (
        3,
        7,
        compact.index_bytes(k, vocab),
    )
    decoded, ids = compact.decode(value_rows, index_rows, k, vocab)
    order = np.argsort(indices.numpy(), axis=-1)
    assert np.array_equal(ids, np.take_along_axis(indices.numpy(), order, -1))
    want = np.take_along_axis(values.numpy(), order, -1)
    top = want.max(-1, keepdims=True)
    step = np.sqrt(top - want).max(-1, keepdims=True) / compact.CODE_MAX
    error = np.abs(np.sqrt(np.maximum(top - decoded, 0)) - np.sqrt(top - want))  # in the codes' own (sqrt) scale
    assert (error <= step * 0.5 * (1 + 2e-3) + 1e-6).all()
    assert np.array_equal(decoded.max(-1), top[..., 0])  # the maximum is stored exactly


def test_a_position_at_k_64_of_49152_tokens_takes_at_most_150_bytes():
    key = cache.CacheKey("t", "d", 0.1, 0, 4, 256, k=64, vocab=49_152, precision="fp32")
    sizes = {
        dtype: cache.bytes_per_position(cache.new_manifest(key, 1, 256, dtype, 1)) for dtype in ("fp32", "compact")
    }
    assert sizes == {"fp32": 516, "compact": 150}  # fp32: 64 x (4 + 4) + 4; compact: 54 + 92 + 4


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_kd_from_the_compact_cache_is_within_1e_3_of_the_exact_top_k(tmp_path, kind, tail, scale):
    """Written by a ShardWriter and read back by a CacheReader: the top-k KD loss (with and without the tail
    bucket) against the float64 loss of the exact top-k, with the student's logits of another draw."""
    vocab, k = 4096, 64
    key = cache.CacheKey("t", "d", 0.1, 0, batch_size=2, block_size=16, k=k, vocab=vocab, precision="fp32")
    manifest = cache.new_manifest(key, steps=1, positions=16, values_dtype="compact", n_shards=1)
    cache.write_json_atomic(tmp_path / cache.MANIFEST, manifest.to_json())
    generator = torch.Generator().manual_seed(int(scale))
    teacher = torch.randn(2, 16, vocab, generator=generator, dtype=torch.float64) * scale
    student = torch.randn(2, 16, vocab, generator=generator, dtype=torch.float64) * scale
    cache.ShardWriter(tmp_path, manifest, 0).write(0, teacher.float())
    values, indices, lse = cache.CacheReader(tmp_path, cache.read_manifest(tmp_path)).read(0, torch.arange(2))
    assert (values[..., :-1] >= values[..., 1:]).all()  # descending, as the other dtypes read
    exact_values, exact_indices = teacher.topk(k, dim=-1)
    want = kd_loss_topk(
        student, exact_values, exact_indices, kind=kind, teacher_lse=teacher.logsumexp(-1) if tail else None
    )
    got = kd_loss_topk(student, values.double(), indices, kind=kind, teacher_lse=lse.double() if tail else None)
    assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item())
    tail = lse.double() + torch.log(-torch.expm1(values.double().logsumexp(-1) - lse.double()))
    want_tail = teacher.scatter(-1, exact_indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(
        tail, want_tail, rtol=1e-4, atol=1e-5
    )  # fp32: the teacher's own tail, whatever the rounding


def test_a_flipped_bit_of_a_compact_row_is_named(tmp_path):
    key = cache.CacheKey("t", "d", 0.1, 0, batch_size=2, block_size=3, k=5, vocab=300, precision="fp32")
    manifest = cache.new_manifest(key, steps=1, positions=3, values_dtype="compact", n_shards=1)
    cache.write_json_atomic(tmp_path / cache.MANIFEST, manifest.to_json())
    cache.ShardWriter(tmp_path, manifest, 0).write(0, torch.randn(2, 3, 300))
    path = cache.shard_dir(tmp_path, 0) / "indices.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 4  # row 1
    path.write_bytes(bytes(data))
    reader = cache.CacheReader(tmp_path, cache.read_manifest(tmp_path))
    reader.read(0, torch.tensor([0]))
    with pytest.raises(cache.CacheError, match=r"indices.bin is garbled at step 0, row 1"):
        reader.read(0, torch.tensor([1]))
