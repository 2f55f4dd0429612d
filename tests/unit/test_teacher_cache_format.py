"""The teacher cache's files: shard layout, what a writer stores is what a reader returns, the checksums that
catch a garbled row, and manifests that are refused with one line."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import cache

KEY = cache.CacheKey(
    teacher="t", data="d", val_fraction=0.1, seed=1, batch_size=4, block_size=3, k=5, vocab=11, precision="fp32"
)


def test_steps_split_into_contiguous_shards():
    manifest = cache.new_manifest(KEY, steps=7, positions=3, values_dtype="fp32", n_shards=3)
    assert manifest.shards == ((0, 2), (2, 4), (4, 7))
    assert manifest.indices_dtype == "int16" and manifest.shape(2) == (3, 4, 3, 5)
    assert cache.Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


def write_cache(root: Path, dtype: str = "fp32") -> torch.Tensor:
    """A complete cache of 4 steps in 2 shards in ``root``; the logits written, ``[step, batch, positions, V]``."""
    manifest = cache.new_manifest(KEY, steps=4, positions=3, values_dtype=dtype, n_shards=2)
    cache.write_json_atomic(root / cache.MANIFEST, manifest.to_json())
    logits = torch.randn(4, 4, 3, 11, generator=torch.Generator().manual_seed(0))
    for shard in range(2):
        writer = cache.ShardWriter(root, manifest, shard)
        for step in range(*manifest.shards[shard]):
            writer.write(step, logits[step])
    return logits


def flip_bit(path: Path, byte: int) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype, tol", [("fp32", 0.0), ("bf16", 1e-2), ("fp16", 1e-3)])
def test_reader_returns_what_the_writer_stored(tmp_path, dtype, tol):
    logits = write_cache(tmp_path, dtype)
    manifest = cache.read_manifest(tmp_path)
    assert [cache.steps_done(tmp_path, manifest, s) for s in range(2)] == [2, 2]
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


def test_checksums_are_the_crc32_of_each_rows_bytes(tmp_path):
    """checksums.bin [steps, batch, 3]: zlib.crc32 of each (step, sample)'s bytes in values, indices, lse."""
    write_cache(tmp_path)
    shard = cache.shard_dir(tmp_path, 1)
    files = {name: (shard / name).read_bytes() for name in cache.ROW_FILES}
    sums = np.fromfile(shard / cache.CHECKSUMS, dtype=np.uint32).reshape(2, 4, 3)
    for column, name in enumerate(cache.ROW_FILES):
        row_bytes = len(files[name]) // 8  # 2 steps x 4 samples
        for step in range(2):
            for row in range(4):
                start = (step * 4 + row) * row_bytes
                assert sums[step, row, column] == zlib.crc32(files[name][start : start + row_bytes]), (name, step, row)


@pytest.mark.parametrize("name, itemsize, per_row", [("values.bin", 4, 15), ("indices.bin", 2, 15), ("lse.bin", 4, 3)])
def test_a_flipped_bit_names_the_file_step_and_row(tmp_path, name, itemsize, per_row):
    """Step 3 (shard 1, its second step), row 2: the rows read with it fail; other rows of that step do not."""
    write_cache(tmp_path)
    path = cache.shard_dir(tmp_path, 1) / name
    flip_bit(path, ((1 * 4 + 2) * per_row + 1) * itemsize)
    reader = cache.CacheReader(tmp_path, cache.read_manifest(tmp_path))
    reader.read(3, torch.tensor([0, 1, 3]))
    reader.read(2, torch.arange(4))
    with pytest.raises(cache.CacheError) as raised:
        reader.read(3, torch.tensor([1, 2]))
    assert str(raised.value) == (
        f"{path} is garbled at step 3, row 2 (its CRC32 differs from the one written); rebuild it with "
        "python -m trainer.cache and this run's overrides (it rewrites the garbled steps)"
    )


def test_a_rerun_writes_a_garbled_step_again(tmp_path, capsys):
    """A writer reopening a shard verifies its steps: it resumes at the first garbled one."""
    logits = write_cache(tmp_path)
    shard = cache.shard_dir(tmp_path, 0)
    whole = {name: (shard / name).read_bytes() for name in (*cache.ROW_FILES, cache.CHECKSUMS)}
    flip_bit(shard / "values.bin", (4 * 15 + 7) * 4)  # step 1, row 0
    manifest = cache.read_manifest(tmp_path)
    writer = cache.ShardWriter(tmp_path, manifest, 0)
    assert writer.done == 1 and cache.steps_done(tmp_path, manifest, 0) == 1
    assert "values.bin is garbled at step 1, row 0" in capsys.readouterr().err
    writer.write(1, logits[1])
    assert {name: (shard / name).read_bytes() for name in whole} == whole
    assert cache.ShardWriter(tmp_path, manifest, 0).done == 2


MANIFEST = cache.new_manifest(KEY, steps=4, positions=3, values_dtype="fp32", n_shards=2).to_json()


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"format": "stillroom-teacher', "Unterminated string starting at: line 1 column 12 (char 11)"),
        ("[1, 2]", "[1, 2] is not a JSON object"),
        (json.dumps({**MANIFEST, "steps": "four"}), 'steps is "four", not an integer'),
        (json.dumps({**MANIFEST, "key": {**MANIFEST["key"], "k": None}}), "key.k is null, not an integer"),
        (json.dumps({**MANIFEST, "key": {"k": 5}}), "key.teacher is missing"),
        (
            json.dumps({**MANIFEST, "values_dtype": "fp8"}),
            "values_dtype is 'fp8', not one of fp32, fp16, bf16, compact",
        ),
        (json.dumps({**MANIFEST, "shards": [[0, 2], [3, 4]]}), "shards [[0, 2], [3, 4]] are not [start, stop) pairs"),
        (json.dumps({**MANIFEST, "shards": [[0, 5], [5, 4]]}), "shards [[0, 5], [5, 4]] hold a range that ends"),
    ],
)
def test_a_garbled_manifest_is_named(tmp_path, text, why):
    (tmp_path / cache.MANIFEST).write_text(text)
    with pytest.raises(cache.CacheError) as raised:
        cache.read_manifest(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / cache.MANIFEST} is garbled ({why}")
    assert str(raised.value).endswith("; remove the cache and rebuild it with python -m trainer.cache")


def test_a_manifest_of_format_1_is_refused(tmp_path):
    (tmp_path / cache.MANIFEST).write_text(json.dumps({**MANIFEST, "format": "stillroom-teacher-cache/1"}))
    with pytest.raises(cache.CacheError, match="holds a cache of format 'stillroom-teacher-cache/1', not 'stillroo"):
        cache.read_manifest(tmp_path)


def test_a_manifest_of_format_2_reads_with_its_log_sum_exp_at_temperature_1(tmp_path):
    """Format 2 stored the same files, its log-sum-exp at temperature 1: read as such (top_k_tail at T=1 can use it)."""
    old = {key: value for key, value in MANIFEST.items() if key != "lse_temperature"}
    (tmp_path / cache.MANIFEST).write_text(json.dumps({**old, "format": "stillroom-teacher-cache/2"}))
    assert cache.read_manifest(tmp_path).lse_temperature == 1.0


def test_the_log_sum_exp_is_stored_at_the_manifests_temperature(tmp_path):
    manifest = cache.new_manifest(KEY, steps=1, positions=3, values_dtype="fp32", n_shards=1, lse_temperature=2.0)
    cache.write_json_atomic(tmp_path / cache.MANIFEST, manifest.to_json())
    assert cache.read_manifest(tmp_path) == manifest
    logits = torch.randn(4, 3, 11, generator=torch.Generator().manual_seed(1))
    cache.ShardWriter(tmp_path, manifest, 0).write(0, logits)
    _, _, lse = cache.CacheReader(tmp_path, manifest).read(0, torch.arange(4))
    torch.testing.assert_close(lse, torch.logsumexp(logits / 2.0, dim=-1))


def test_garbled_progress_is_named(tmp_path):
    write_cache(tmp_path)
    progress = cache.shard_dir(tmp_path, 1) / "progress.json"
    progress.write_text('{"done": 7}')
    with pytest.raises(cache.CacheError, match=r"progress.json is garbled \(done is 7, not in 0..2\); remove "):
        cache.steps_done(tmp_path, cache.read_manifest(tmp_path), 1)
