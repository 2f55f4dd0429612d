"""A frozen teacher sharded by FSDP2 and never whole on any rank: built with its parameters on the meta device,
sharded, then each parameter's local rows read from the safetensors file(s) or the GGUF file.

Safetensors files are read with plain reads of the bytes a rank keeps, not mapped: the pages of a mapped file that
a process touches count in its resident memory, and with safetensors' ``safe_open`` + ``get_slice`` a process
reading half the rows of every tensor peaked at about 1.5 times the file (measured); here it peaks at its rows.
A GGUF file is read the same way: the ``gguf`` package's reader gives each tensor's offset (its mapping of the file
is never touched), and a rank reads and dequantizes only its rows (a GGUF row is a whole number of quantization
blocks). Tensor names are mapped as transformers maps them (``get_gguf_hf_weights_map``: gguf's ``TensorNameMap``),
and Llama's query and key rows, which llama.cpp stores permuted within each head, are read in the order transformers'
``LlamaTensorProcessor`` puts them back in. Architectures whose tensors transformers reshapes otherwise on load
(GPT-2's fused QKV, Bloom, Gemma2, mixtures of experts...) are loaded whole, then sharded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from parallel.frozen import local_row_offset

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


class Rows(Protocol):
    """A stored tensor whose rows can be read alone."""

    @property
    def shape(self) -> tuple[int, ...]:
        """As the model's parameter has it (or its transpose)."""

    def read_rows(self, start: int, out: torch.Tensor, transposed: bool = False) -> None:
        """Rows ``start:start + len(out)`` (of the transpose, when ``transposed``) into ``out``."""


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte

    def read_rows(self, start: int, out: torch.Tensor, transposed: bool = False) -> None:
        read_rows(self, start, out, transposed)


@dataclass(frozen=True)
class GGUFRows:
    """A tensor of a GGUF file: stored rows (values, or quantization blocks) of ``row_bytes`` each from ``offset``,
    each read as a ``row_dtype`` array of ``row_shape`` as gguf's reader maps it; the model's tensor has ``shape``
    and its row ``r`` is stored row ``order[r]`` (None: ``r``)."""

    file: Path
    offset: int
    row_bytes: int
    row_dtype: np.dtype
    row_shape: tuple[int, ...]
    quant_type: Any  # gguf.GGMLQuantizationType (gguf is imported only to read a GGUF file)
    shape: tuple[int, ...]
    order: np.ndarray | None

    def read_rows(self, start: int, out: torch.Tensor, transposed: bool = False) -> None:
        from gguf import dequantize

        assert not transposed  # transformers stores no GGUF tensor of these families transposed
        rows = out.shape[0] if out.dim() else 1
        if rows == 0:
            return
        wanted = np.arange(start, start + rows) if self.order is None else self.order[start : start + rows]
        first = int(wanted.min())  # a rank's rows are a run of stored rows, but for the order within a head
        count = int(wanted.max()) - first + 1
        with self.file.open("rb") as handle:
            handle.seek(self.offset + first * self.row_bytes)
            raw = handle.read(count * self.row_bytes)
        if len(raw) != count * self.row_bytes:
            raise ValueError(f"{self.file} ends before its tensor table says")
        stored = np.frombuffer(raw, dtype=self.row_dtype).reshape(count, *self.row_shape)
        values = dequantize(stored[wanted - first], self.quant_type)
        out.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(out.shape))


def gguf_index(file: Path, architecture: str, hf_model: Any) -> dict[str, GGUFRows] | None:
    """Every tensor of the GGUF ``file`` (of ``architecture``) by its name in transformers' ``hf_model`` (a model of
    the file's config); None for an architecture whose tensors transformers reshapes on load in other
    ways than Llama's row order (it must then be loaded whole)."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor

    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor):
        return None
    processor = processor_class(config=hf_model.config.to_dict())
    # transformers' get_gguf_hf_weights_map at the model's top level (it also maps every submodule's names, which
    # these architectures do not need, building gguf's name table anew for each: 12 MiB of passing garbage)
    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = get_tensor_name_map(arch, hf_model.config.num_hidden_layers)
    hf_names = {}
    for hf_name in hf_model.state_dict():
        module, _, leaf = hf_name.rpartition(".")
        gguf_module = name_map.get_name(module)
        if gguf_module is not None:
            hf_names[f"{gguf_module}.{leaf}"] = hf_name
    tensors = {}
    for tensor in GGUFReader(file).tensors:
        if tensor.name not in hf_names:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))
        order = processor.process(weights=np.arange(shape[0]).reshape(-1, 1), name=tensor.name).weights.reshape(-1)
        identity = bool((order == np.arange(shape[0])).all())
        rows = tensor.data.shape[0]  # the reader's view of the file: only its shape and dtype are used
        tensors[hf_names[tensor.name]] = GGUFRows(
            file=file,
            offset=int(tensor.data_offset),
            row_bytes=int(tensor.n_bytes) // rows,
            row_dtype=tensor.data.dtype,
            row_shape=tuple(tensor.data.shape[1:]),
            quant_type=tensor.tensor_type,
            shape=shape,
            order=None if identity else order,
        )
    return tensors


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
    tensors: Mapping[str, Rows],
    where: Path,
    stored_as: StoredAs,
    shard: Callable[[nn.Module], nn.Module],
    device: torch.device,
) -> nn.Module:
    """``skeleton`` (parameters on the meta device; buffers computed, or on the meta device if it has none worth
    keeping) sharded by ``shard``, materialised on ``device`` with each parameter's local rows read from ``tensors``
    (``index`` of safetensors files, ``gguf_index`` of a GGUF file; ``where`` they are). ValueError (one line) when a
    parameter is not in them or has another shape."""
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
    with torch.no_grad():
        for name, param in skeleton.named_parameters():  # a tied weight once, under its first name
            names, transposed = stored_as(name)
            key = next((n for n in names if n in tensors), None)
            if key is None:
                raise ValueError(f"{where}: no tensor {names[0]} in its weights")
            stored = tensors[key].shape
            if tuple(stored[::-1] if transposed else stored) != tuple(param.shape):
                raise ValueError(f"{where}: {key} is {list(stored)} but {name} is {list(param.shape)}")
            local = param.to_local() if isinstance(param, DTensor) else param
            tensors[key].read_rows(local_row_offset(param), local, transposed)
    return skeleton
