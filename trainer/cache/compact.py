"""The compact row codec of the teacher cache (``teacher.cache_dtype=compact``): a position's top-k in a fixed
number of bytes, so shards stay memory-mapped arrays.

- **Indices**, sorted ascending, in Elias-Fano code: each id's low ``l = floor(log2(V / k))`` bits as they are,
  its high bits as a unary bitmap of ``k + (V >> l)`` bits (the i-th set bit sits at ``high_i + i``). About
  ``2 + log2(V / k)`` bits an id: 92 bytes for k = 64 of 49,152 tokens, where int32 takes 256.
- **Values**, in the same (ascending id) order, as 6-bit codes of ``sqrt(max - value)`` on a step of
  ``sqrt(max - min) / 63`` (the square root spends the codes where the probabilities are: near the maximum), after
  a header holding the maximum (fp32) and the step (fp16): 54 bytes for k = 64, where fp32 takes 256.

The codes round to the nearest, so the decoded top-k may hold a little more or less mass than the row did: a
compact cache's lse.bin therefore stores the log-mass of the tail itself (the logits off the top-k), which the
reader adds to the decoded top-k's to give the log-sum-exp, and the tail bucket of ``distill.top_k_tail`` is the
teacher's own however small (:func:`lse_of`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from parallel.remote import Wire

CODE_BITS = 6
CODE_MAX = (1 << CODE_BITS) - 1
HEADER_BYTES = 6  # the row's maximum (fp32) and the step of its codes (fp16)


def low_bits(k: int, vocab: int) -> int:
    """Bits of each id stored as they are: ``floor(log2(vocab / k))``, at least 0."""
    return max(0, int(math.floor(math.log2(vocab / k)))) if vocab > k else 0


def index_bytes(k: int, vocab: int) -> int:
    """Bytes of a position's ``k`` ids of ``vocab`` in Elias-Fano code."""
    low = low_bits(k, vocab)
    return -(-(k * low + k + ((vocab - 1) >> low) + 1) // 8)


def value_bytes(k: int) -> int:
    """Bytes of a position's ``k`` values: the header and ``k`` codes."""
    return HEADER_BYTES + -(-(k * CODE_BITS) // 8)


def _bits(numbers: np.ndarray, width: int) -> np.ndarray:
    """``[..., n]`` non-negative integers as ``[..., n * width]`` bits, most significant first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((numbers[..., None].astype(np.int64) >> shifts) & 1).astype(np.uint8).reshape(*numbers.shape[:-1], -1)


def _numbers(bits: np.ndarray, width: int, n: int) -> np.ndarray:
    """The inverse of :func:`_bits`: ``[..., n * width]`` bits as ``[..., n]`` int64."""
    if width == 0:
        return np.zeros((*bits.shape[:-1], n), dtype=np.int64)
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return bits[..., : n * width].reshape(*bits.shape[:-1], n, width).astype(np.int64) @ weights


def encode(values: np.ndarray, indices: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``[..., k]`` fp32 values and their distinct ids (any order) as uint8 ``[..., value_bytes(k)]`` and
    ``[..., index_bytes(k, vocab)]``."""
    *lead, k = indices.shape
    order = np.argsort(indices, axis=-1)
    ids = np.take_along_axis(indices.astype(np.int64), order, -1).reshape(-1, k)
    vals = np.take_along_axis(values.astype(np.float32), order, -1).reshape(-1, k)
    low = low_bits(k, vocab)
    bitmap = np.zeros((len(ids), index_bytes(k, vocab) * 8 - k * low), dtype=np.uint8)
    np.put_along_axis(bitmap, (ids >> low) + np.arange(k), 1, -1)
    id_bits = np.concatenate([_bits(ids & ((1 << low) - 1), low), bitmap], -1)

    top = vals.max(-1, keepdims=True)
    spread = np.sqrt(np.maximum(top - vals, 0.0))
    step = (spread.max(-1, keepdims=True) / CODE_MAX).astype(np.float16)
    step[step == 0] = np.float16(1.0)  # all values equal: every code 0
    codes = np.clip(np.rint(spread / step.astype(np.float32)), 0, CODE_MAX).astype(np.int64)
    code_bits = _bits(codes, CODE_BITS)
    code_bits = np.pad(code_bits, ((0, 0), (0, (value_bytes(k) - HEADER_BYTES) * 8 - code_bits.shape[-1])))
    header = np.concatenate([top.view(np.uint8), step.view(np.uint8)], -1)
    value_rows = np.concatenate([header, np.packbits(code_bits, -1)], -1)
    return value_rows.reshape(*lead, -1), np.packbits(id_bits, -1).reshape(*lead, -1)


def decode(value_rows: np.ndarray, index_rows: np.ndarray, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`encode`: fp32 values ``[..., k]`` (within the codes' rounding) and int64 ids, in
    ascending id order."""
    lead = value_rows.shape[:-1]
    value_rows, index_rows = value_rows.reshape(-1, value_rows.shape[-1]), index_rows.reshape(-1, index_rows.shape[-1])
    low = low_bits(k, vocab)
    id_bits = np.unpackbits(index_rows, -1)
    set_bits = np.nonzero(id_bits[:, k * low :])[1].reshape(-1, k)
    ids = ((set_bits - np.arange(k)) << low) | _numbers(id_bits, low, k)

    header = np.ascontiguousarray(value_rows[:, :HEADER_BYTES])
    top = header[:, :4].copy().view(np.float32)
    step = header[:, 4:].copy().view(np.float16).astype(np.float32)
    codes = _numbers(np.unpackbits(value_rows[:, HEADER_BYTES:], -1), CODE_BITS, k)
    values = top - np.square(codes * step)
    return values.astype(np.float32).reshape(*lead, k), ids.reshape(*lead, k)


def unpack(
    value_rows: np.ndarray, index_rows: np.ndarray, tail: torch.Tensor, k: int, vocab: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values fp32 (descending, as ``topk`` gives them), their ids int64 and the rows' log-sum-exp at ``temperature``
    from encoded rows and the stored ``tail``."""
    decoded, ids = decode(value_rows, index_rows, k, vocab)
    values, order = torch.from_numpy(decoded).sort(dim=-1, descending=True, stable=True)
    return values, torch.from_numpy(ids).gather(-1, order), lse_of(values, tail, temperature)


def wire(k: int, vocab: int, temperature: float) -> Wire:
    """A remote teacher's reply as these rows (``teacher.wire=compact``): value rows, id rows and the tail's
    log-mass at ``temperature``, ``value_bytes(k) + index_bytes(k, vocab) + 4`` bytes a token."""

    def pack(logits: torch.Tensor) -> list[torch.Tensor]:
        values, indices = logits.float().topk(k, dim=-1)
        tail = tail_of(logits.float(), indices, temperature)
        value_rows, index_rows = encode(values.cpu().numpy(), indices.cpu().numpy(), vocab)
        return [torch.from_numpy(value_rows), torch.from_numpy(index_rows), tail.cpu()]

    parts = (((value_bytes(k),), torch.uint8), ((index_bytes(k, vocab),), torch.uint8), ((), torch.float32))
    return Wire(pack, parts)


def tail_of(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[...]`` log of the mass of ``logits / temperature`` off ``indices`` (-inf when they are all of them)."""
    return (logits / temperature).scatter(-1, indices, float("-inf")).logsumexp(-1)


def lse_of(values: torch.Tensor, tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """The row's log-sum-exp at ``temperature`` from its decoded top-k ``values`` and stored ``tail``."""
    return torch.logaddexp((values / temperature).logsumexp(-1), tail)
