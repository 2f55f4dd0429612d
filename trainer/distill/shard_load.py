"""A frozen teacher sharded by FSDP2 and never whole on any rank: built with its parameters on the meta device,
sharded, then each parameter's local rows read from the safetensors file(s).

The files are read with plain reads of the bytes a rank keeps, not mapped: the pages of a mapped file that a
process touches count in its resident memory, and with safetensors' ``safe_open`` + ``get_slice`` a process
reading half the rows of every tensor peaked at about 1.5 times the file (measured); here it peaks at its rows.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from parallel.teacher import local_row_offset

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# A parameter's name -> the names it may be stored by (first found wins) and whether it is stored transposed.
StoredAs = Callable[[str], tuple[tuple[str, ...], bool]]


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte


def index(files: Iterable[Path]) -> dict[str, Stored]:
    """Every tensor of the safetensors ``files`` by name, read from their headers."""
    tensors = {}
    for file in files:
        with file.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                start = 8 + size + entry["data_offsets"][0]
                tensors[name] = Stored(file, DTYPES[entry["dtype"]], tuple(entry["shape"]), start)
    return tensors


def _read_into(handle, position: int, out: torch.Tensor) -> None:
    handle.seek(position)
    view = out.reshape(-1).view(torch.uint8).numpy()
    if handle.readinto(view) != view.nbytes:
        raise ValueError(f"{handle.name} ends before its header says")


def read_rows(stored: Stored, start: int, out: torch.Tensor, transposed: bool = False) -> None:
    """Rows ``start:start + len(out)`` of ``stored`` (of its transpose, when ``transposed``) into ``out``."""
    rows = out.shape[0] if out.dim() else 1
    if rows == 0:
        return
    shape = stored.shape or (1,)
    size = torch.empty((), dtype=stored.dtype).element_size()
    with stored.file.open("rb") as handle:
        if transposed:  # a [n_in, n_out] tensor: columns start:start+rows of every row
            n_in, n_out = shape
            buffer = torch.empty(n_in, rows, dtype=stored.dtype)
            for i in range(n_in):
                _read_into(handle, stored.offset + (i * n_out + start) * size, buffer[i])
            out.copy_(buffer.t())
            return
        direct = out.dtype == stored.dtype and out.is_contiguous()
        buffer = out if direct else torch.empty(rows, *shape[1:], dtype=stored.dtype)
        _read_into(handle, stored.offset + start * math.prod(shape[1:]) * size, buffer)
        if not direct:
            out.copy_(buffer.view(out.shape))


def load_sharded(
    skeleton: nn.Module,
    files: list[Path],
    stored_as: StoredAs,
    shard: Callable[[nn.Module], nn.Module],
    device: torch.device,
) -> nn.Module:
    """``skeleton`` (parameters on the meta device; buffers computed, or on the meta device if it has none worth
    keeping) sharded by ``shard``, materialised on ``device`` with each parameter's local rows read from ``files``.
    ValueError (one line) when a parameter is not in them or has another shape."""
    buffers = {name: buffer for name, buffer in skeleton.named_buffers() if not buffer.is_meta}
    shard(skeleton)
    first: dict[int, str] = {}
    tied = {name: first.setdefault(id(p), name) for name, p in skeleton.named_parameters(remove_duplicate=False)}
    skeleton.to_empty(device=device)  # a plain (unsharded) tied weight comes out as two tensors: tied again below
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        skeleton.get_submodule(owner)._buffers[leaf] = buffer.to(device)
    for name, source in tied.items():
        owner, _, leaf = name.rpartition(".")
        if name != source:
            skeleton.get_submodule(owner)._parameters[leaf] = skeleton.get_parameter(source)
    tensors = index(files)
    with torch.no_grad():
        for name, param in skeleton.named_parameters():  # a tied weight once, under its first name
            names, transposed = stored_as(name)
            key = next((n for n in names if n in tensors), None)
            if key is None:
                raise ValueError(f"{files[0].parent}: no tensor {names[0]} in its weights")
            stored = tensors[key].shape
            if tuple(stored[::-1] if transposed else stored) != tuple(param.shape):
                raise ValueError(f"{files[0].parent}: {key} is {list(stored)} but {name} is {list(param.shape)}")
            local = param.to_local() if isinstance(param, DTensor) else param
            read_rows(tensors[key], local_row_offset(param), local, transposed)
    return skeleton
