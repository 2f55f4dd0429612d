"""A Hugging Face causal LM from a GGUF file (llama.cpp's format), through transformers' GGUF support: the file
a path names, its config read from the file's metadata (no tensors loaded), the model dequantized to fp32 or bf16,
its tokenizer.

transformers marks a model it loaded from a GGUF file as quantized (``config.quantization_config``) and then
refuses to ``save_pretrained`` it; ``load`` returns a ``plain_copy`` of it, an ordinary model holding the same
dequantized tensors, which can be saved, cut or trained like any other. Loading needs the ``gguf`` and
``accelerate`` packages (the ``hf`` extra); nothing is downloaded.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.models.hf import config_from_dict, first_line, import_transformers

SUFFIX = ".gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What transformers' GGUF readers raise on a file that is not a whole GGUF file (bad magic, truncated tables or
# tensor data, bytes that are not the strings they should be).
UNREADABLE = (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError, OSError)


def find(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself (``*.gguf``) or the one ``*.gguf`` in a folder; None when it names
    none. ValueError (one line, naming them) for a folder holding several."""
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    found = sorted(path.glob(f"*{SUFFIX}")) if path.is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): name one of them")
    return found[0] if found else None


def import_gguf_support():
    """``transformers``, after checking that ``gguf`` and ``accelerate`` (which its GGUF loader needs) are
    installed; ValueError naming the extra when one is not."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        missing = f"{e.name} is missing"
        raise ValueError(f"a GGUF model needs gguf and accelerate ({missing}): pip install 'stillroom[hf]'") from e
    return import_transformers()


def check_file(file: Path) -> str:
    """The architecture a GGUF file declares, after reading its header and tensor table with transformers' own
    reader (which skips the tensor data and the tokenizer's arrays: fast) and checking that the tensors it lists
    fit in the file; ValueError (one line) when it is not a whole GGUF file (not one at all, truncated, damaged)."""
    return str(_header(file).architecture)


def _header(file: Path):
    import_gguf_support()
    from transformers.integrations.gguf import GgufHeader

    try:
        header = GgufHeader.from_file(str(file))
    except UNREADABLE as e:
        raise ValueError(f"{file} is not a readable GGUF file: truncated or damaged ({first_line(e)})") from None
    needed = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    size = file.stat().st_size
    if needed > size:
        raise ValueError(
            f"{file} is not a readable GGUF file: truncated or damaged (its tensors need {needed} bytes, it has {size})"
        )
    return header


def check_tensors(file: Path, header: Any, config: Any) -> None:
    """That the GGUF ``file`` (its ``header`` read) stores every parameter of ``config``'s causal LM whose name gguf's
    table for the file's architecture maps (transformers would start a missing one at random, without a word);
    ValueError (one line) naming the first missing ones where not."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == header.architecture), None)
    if arch is None:
        return  # an architecture gguf does not name: transformers refuses it when it reads the config
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    stored = {tensor.name for tensor in header.tensors}
    with torch.device("meta"):
        model = import_transformers().AutoModelForCausalLM.from_config(config)
    missing, mapped = [], 0
    for name, _ in model.named_parameters():  # a tied head once, under the embedding's name
        module, _, leaf = name.rpartition(".")
        gguf_module = name_map.get_name(module)
        if gguf_module is None:
            continue
        mapped += 1
        if f"{gguf_module}.{leaf}" not in stored:
            missing.append(f"{gguf_module}.{leaf}")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"{file}: {len(missing)} of the {mapped} tensors of its {header.architecture} model are not stored "
            f"({shown}); transformers would start them at random"
        )


def read_config(file: Path):
    """The model's ``PretrainedConfig``, from the file's metadata; ValueError (one line) when the file is not
    readable, of an architecture transformers cannot load, or not a causal LM. Remembered for the file as it is
    (path, size, modification time): transformers parses the whole tokenizer to build it, seconds for a real one."""
    import_gguf_support()  # before the cache: a missing package is named on every call
    stat = file.stat()
    return _read_config(file, (file.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read_config(file: Path, _version: tuple):
    header = _header(file)
    architecture = header.architecture
    transformers = import_gguf_support()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except (*UNREADABLE, TypeError) as e:
        raise ValueError(
            f"{file}: transformers cannot load a GGUF model of architecture {architecture!r} ({first_line(e)})"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{file} holds a {config.model_type} model, which transformers does not run as a causal LM")
    fields = config.to_dict()
    fields.pop("quantization_config", None)
    check_tensors(file, header, config_from_dict(fields))
    return config


def load(file: Path, dtype: str = "fp32") -> nn.Module:
    """The file's causal LM dequantized to ``dtype`` (fp32 | bf16) on CPU, in eval mode, as a ``plain_copy``."""
    config = read_config(file)
    transformers = import_gguf_support()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(file.parent), config=config, gguf_file=file.name, dtype=DTYPES[dtype], local_files_only=True
        )
    except (*UNREADABLE, RuntimeError, ImportError) as e:
        raise ValueError(f"{file}: transformers cannot load the model ({first_line(e)})") from None
    return plain_copy(model)


def empty(file: Path) -> nn.Module:
    """The file's model architecture without its weights, built on the default device (the meta device: sizes only),
    as ``plain_copy`` would give it."""
    fields = read_config(file).to_dict()
    fields.pop("quantization_config", None)
    return import_transformers().AutoModelForCausalLM.from_config(config_from_dict(fields))


def plain_copy(model: nn.Module) -> nn.Module:
    """``model`` (loaded from a GGUF file) as an ordinary transformers model that ``save_pretrained`` writes: its
    config without the GGUF ``quantization_config``, built on the meta device, then given ``model``'s own
    (dequantized) tensors, which it shares."""
    transformers = import_transformers()
    loaded: Any = model
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    with torch.device("meta"):
        copy = transformers.AutoModelForCausalLM.from_config(config_from_dict(fields))
    copy.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones (RoPE's frequencies) are not in a state dict
        owner, _, attr = name.rpartition(".")
        if copy.get_buffer(name).is_meta:
            copy.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    copy.tie_weights()
    return copy.train(model.training)


def tokenizer(file: Path):
    """The tokenizer the GGUF file describes (its vocabulary, merges and special tokens), as transformers builds
    it; ValueError (one line) when it cannot."""
    transformers = import_gguf_support()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except (*UNREADABLE, TypeError) as e:
        raise ValueError(f"{file}: transformers cannot build its tokenizer ({first_line(e)})") from None
