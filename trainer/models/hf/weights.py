"""A Hugging Face folder's weights, checked before anything loads them. Each safetensors file's header is read (not
its tensors) and must describe the whole file; a ``pytorch_model.bin`` is opened memory-mapped. Every parameter the
config's architecture has must be stored, with its shape and a floating dtype: transformers would otherwise start a
missing one at random without a word (a ``config.json`` of another ``model_type`` than its weights' makes all of
them missing). ``allow_missing`` (globs) names the parameters a user lets start at random. A folder whose weights
are compressed (a ``quantization_config``) stores other names; only its files' headers are checked."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.models.hf import first_line, import_transformers, safetensors_files, weight_files

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
HEADER_LIMIT = 100_000_000  # safetensors' own cap on a header's size
SHOWN = 3  # missing or unexpected names a line shows


class WeightsError(ValueError):
    """A folder's weights cannot be what its config describes; ``shapes`` when only shapes disagree."""

    def __init__(self, message: str, shapes: bool = False):
        super().__init__(message)
        self.shapes = shapes


def safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file by name (``dtype``, ``shape``, ``data_offsets``), checked to describe the
    whole file; WeightsError naming the file when it is garbled or truncated."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, HEADER_LIMIT):
            raise WeightsError(
                f"{file}: not a safetensors file (garbled or truncated: no header fits its {size} bytes)"
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise WeightsError(f"{file}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: not a safetensors file (its header is not a table of tensors)")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = 0
    for name, entry in tensors.items():
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            described = count * DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file}: garbled header (tensor {name})") from None
        if stop - start != described:
            raise WeightsError(f"{file}: garbled header (tensor {name} has {stop - start} bytes for {described})")
        end = max(end, stop)
    if 8 + length + end != size:
        raise WeightsError(f"{file}: truncated or padded ({size} bytes; its header describes {8 + length + end})")
    return tensors


def stored_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Every tensor the folder's weight files hold: name -> (shape, safetensors dtype name, file)."""
    stored: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in safetensors_files(folder):
        for name, entry in safetensors_header(file).items():
            stored[name] = (tuple(int(d) for d in entry["shape"]), str(entry["dtype"]), file)
    if stored or "pytorch_model.bin" not in weight_files(folder):
        return stored
    file = folder / "pytorch_model.bin"
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise WeightsError(f"{file}: not a PyTorch weights file ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{file}: holds no table of tensors")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            dtype = "F32" if tensor.is_floating_point() else "I64"
            stored[name] = (tuple(tensor.shape), dtype, file)
    return stored


def check(folder: Path, config: Any, allow_missing: Sequence[str] = ()) -> None:
    """That ``folder``'s weight files are whole and hold every parameter of ``config``'s causal LM (a transformers
    config) with its shape; WeightsError (one line) where not. Parameters matching ``allow_missing`` may be absent."""
    stored = stored_tensors(folder)
    if getattr(config, "quantization_config", None) is not None:
        return
    transformers = import_transformers()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    prefix = f"{model.base_model_prefix}."
    by_parameter: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_parameter.setdefault(id(parameter), []).append(name)  # tied weights: one entry, any of its names
    missing, wrong = [], []
    merged, renamings = _converted_on_load(config.model_type)
    for pattern, name in renamings:  # a name transformers renames on load (Mixtral's block_sparse_moe: mlp)
        stored = {re.sub(pattern, name, key): value for key, value in stored.items()}
    for names in by_parameter.values():
        found = next((key for name in names for key in (name, name.removeprefix(prefix)) if key in stored), None)
        if found is None:
            count = model.get_parameter(names[0]).shape[0]
            if not any(fnmatch.fnmatchcase(name, glob) for name in names for glob in allow_missing) and not any(
                _stored_in_parts(key, count, merged, stored)
                for name in names
                for key in (name, name.removeprefix(prefix))
            ):
                missing.append(names[0])
            continue
        shape, dtype, file = stored[found]
        want = tuple(model.get_parameter(names[0]).shape)
        if shape != want:
            wrong.append(f"{found} is {list(shape)} in {file.name} but {list(want)} in the config")
        elif dtype not in FLOATING:
            wrong.append(f"{found} is stored as {dtype} in {file.name}, not as floating point")
    if missing:
        raise WeightsError(_missing_line(folder, config, missing, len(by_parameter), sorted(stored)))
    if wrong:
        raise WeightsError(f"{folder}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""), True)


def _converted_on_load(model_type: str) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """What transformers changes on load for ``model_type``: the parameters it builds from several stored tensors (a
    mixture of experts' stacked experts from each expert's own: the parameter's name ending, the stored names'
    globs), and the parts of stored names it renames (a pattern, its replacement)."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

    merged, renamings = [], []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(rule, WeightConverter):
            merged += [(target, list(rule.source_patterns)) for target in rule.target_patterns]
        elif isinstance(rule, WeightRenaming) and len(rule.target_patterns) == 1:
            renamings += [(source, rule.target_patterns[0]) for source in rule.source_patterns]
    return merged, renamings


def _stored_in_parts(name: str, count: int, merged: list[tuple[str, list[str]]], stored: dict[str, Any]) -> bool:
    """Whether parameter ``name`` (``count`` long in its first dim: the experts) is one transformers merges on load
    from stored tensors, each of which is there once a row (an expert)."""
    for target, sources in merged:
        if name.endswith(target):
            start = name.removesuffix(target)
            if all(sum(fnmatch.fnmatchcase(key, start + source) for key in stored) == count for source in sources):
                return True
    return False


def _missing_line(folder: Path, config: Any, missing: list[str], needed: int, stored: list[str]) -> str:
    shown = ", ".join(missing[:SHOWN]) + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
    if len(missing) == needed:
        return (
            f"{folder}: none of the {needed} weights a {config.model_type} model has are stored (it holds "
            f"{', '.join(stored[:2])}...): does config.json's model_type match the weights?"
        )
    return (
        f"{folder}: {len(missing)} of the {needed} weights of its {config.model_type} config are not stored "
        f"({shown}); transformers would start them at random"
    )
