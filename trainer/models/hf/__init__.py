"""Hugging Face causal LMs as Stillroom models: a folder read offline, the ``student=hf`` config, the wrapper and
family base the Hugging Face decoder families share (``hf/llama.py``, ``hf/gpt2.py``), and the Hugging Face
folder a dense export of one is.

The wrapper holds transformers' own modules under the names transformers gives them (``model.layers.3.mlp``,
``lm_head``), so its state dict is the Hugging Face checkpoint's, and runs them one decoder layer at a time in the
model protocol's calling convention; its decoder layers are a dict keyed by index, which keeps those names in a
pipeline stage. ``transformers`` (the optional extra ``hf``) is imported only when a Hugging Face model is read or
built, never at import, and never downloads anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from trainer.models.protocol import ConfigFieldError, ModelFamily, UnitSlice, Unsupported, flatten, register

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # whole, or sharded with an index
# What an export carries over from the folder the student came from (the model's own files are written anew).
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
SPEC_OMITS = ("transformers_version", "_name_or_path")  # config entries that say nothing of the architecture
# What a model spec may differ in and still be the same model: where it was read from, the dtype it was loaded in,
# and transformers' run-time switches.
INCIDENTAL = ("path", "config_overrides", "init", "allow_missing", *(f"hf_config.{key}" for key in (
    *SPEC_OMITS, "dtype", "torch_dtype", "architectures", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict",
)))  # fmt: skip


def import_transformers():
    """``transformers``, offline, quiet; ValueError naming the extra when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers imports torchao, which announces CUDA kernels it cannot load on a CPU machine (never used here).
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError as e:
        raise ValueError("a Hugging Face model needs transformers: pip install 'stillroom[hf]'") from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def names_hf_model(folder: Path) -> bool:
    """Whether ``folder/config.json`` is a Hugging Face config (it names ``model_type`` or ``architectures``)."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ("model_type" in meta or "architectures" in meta)


def weight_files(folder: Path) -> list[str]:
    """The Hugging Face weight files (or shard indexes) present in ``folder``."""
    return [name for name in WEIGHT_FILES if (folder / name).is_file()]


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files (one, or the shards its index names); [] for pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    return [folder / name for name in sorted(files) if (folder / name).is_file()]


def read_config(folder: Path):
    """The folder's ``PretrainedConfig``, checked to be a causal LM (ValueError, one line, if not)."""
    transformers = import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: transformers cannot read it ({first_line(e)})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{folder} holds a {config.model_type} model, which transformers does not run as a causal LM")
    return config


def load_decompressed(folder: str | Path, **options: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)``, compressed-tensors weights
    decompressed now (``decompressed``), all by this process: under torch.distributed compressed-tensors splits the
    (de)compression over the ranks, and its broadcasts would wait forever for ranks that load nothing (rank 0 reading
    the export)."""
    transformers = import_transformers()
    with compressed_tensors_in_this_process():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **options)
        return decompressed(model)


@contextlib.contextmanager
def compressed_tensors_in_this_process() -> Iterator[None]:
    """torch.distributed reported not running, so that compressed-tensors (its modules ask
    ``torch.distributed.is_initialized``) loads by this process alone (see ``load_decompressed``)."""
    is_initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: False
    try:
        yield
    finally:
        torch.distributed.is_initialized = is_initialized


def decompressed(model: nn.Module) -> nn.Module:
    """``model``, loaded by transformers, with compressed-tensors weights decompressed now: compressed-tensors does it
    in a hook on the whole model's first forward, which a wrapper running its modules never calls."""
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is not None:
        compressor.decompress_model(model)
    return model


def config_from_dict(fields: dict[str, Any]):
    """The ``PretrainedConfig`` of a config's ``to_dict()`` (its ``model_type`` names the class)."""
    transformers = import_transformers()
    return transformers.AutoConfig.for_model(fields["model_type"]).from_dict(fields)


@dataclass
class HFConfig:
    """A Hugging Face decoder as a student (``student=hf``). The architecture is the ``path`` folder's
    ``config.json`` with ``config_overrides`` applied, and the weights the folder's own when it has them (random
    init otherwise); or, in a checkpoint's or export's model spec, ``hf_config`` (the config as a dict; then
    nothing is read and the weights are random until loaded). The model's vocabulary must be the data's."""

    path: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    block_size: int | None = None  # the training sequence length: at most the model's max_position_embeddings
    vocab_size: int | None = None  # the data's vocabulary (filled in from the data)
    hf_config: dict[str, Any] | None = None
    init: str = "pretrained"  # pretrained (the folder's weights, every one of them) | random (its config only)
    allow_missing: list[str] = field(default_factory=list)  # globs of parameters that may start at random

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ConfigFieldError("block_size", f"must be >= 1 (got {self.block_size})")
        config = self.resolve()
        if config.model_type not in DECODERS:
            self._check_generic(config)
        positions = getattr(config, "max_position_embeddings", None)
        if self.block_size is not None and positions is not None and self.block_size > positions:
            raise ConfigFieldError(
                "block_size", f"{self.block_size} is longer than the model's {positions} positions ({self.path})"
            )
        if self.vocab_size is not None and self.vocab_size != config.vocab_size:
            raise ConfigFieldError(
                "path",
                f"{self.path}: the model's vocabulary of {config.vocab_size} tokens differs from the data's "
                f"{self.vocab_size}: the student reads the data's token ids",
            )
        if self.init not in ("pretrained", "random"):
            raise ConfigFieldError("init", f"must be pretrained or random (got {self.init!r})")
        if self.loads_weights:
            self._check_weights(config)

    @property
    def loads_weights(self) -> bool:
        """Whether the model starts from the folder's weights."""
        stored = self.path is not None and bool(weight_files(Path(self.path)))
        return self.hf_config is None and self.init == "pretrained" and stored

    def _check_generic(self, config) -> None:
        """That a model type without a structure spec can run on the generic path: its decoder layers are one list
        (on a copy built on the meta device)."""
        from trainer.models.hf import generic

        transformers = import_transformers()
        try:
            with torch.device("meta"):
                generic.layers_path(transformers.AutoModelForCausalLM.from_config(config), config.num_hidden_layers)
        except (Unsupported, AttributeError) as e:
            raise ConfigFieldError(
                "path",
                f"{self.path}: a {config.model_type} model cannot be a student: {e} (the model types with a "
                f"structure spec: {structured_model_types()})",
            ) from None

    def _check_weights(self, config) -> None:
        """That the folder's weight files are whole and hold every parameter of ``config`` (overridden) with its
        shape (``weights.check``): transformers would start a missing one at random, and refuse other shapes."""
        from trainer.models.hf import weights

        assert self.path is not None  # loads_weights: the folder has weights
        try:
            weights.check(Path(self.path), config, self.allow_missing)
        except weights.WeightsError as e:
            key = "config_overrides" if e.shapes and self.config_overrides else "path"
            raise ConfigFieldError(
                key, str(e) + (": the folder's weights do not fit" if key != "path" else "")
            ) from None

    def resolve(self):
        """The model's ``PretrainedConfig``; ConfigFieldError naming the field that makes it impossible."""
        if self.hf_config is not None:
            return config_from_dict(self.hf_config)
        if self.path is None:
            raise ConfigFieldError("path", "student=hf needs student.path=DIR, a Hugging Face folder with config.json")
        folder = Path(self.path)
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigFieldError("path", f"{folder} has no {CONFIG_FILE} (not a Hugging Face folder)")
        try:
            config = read_config(folder)
        except ValueError as e:
            raise ConfigFieldError("path", str(e)) from None
        return self._overridden(config)

    def _overridden(self, config):
        fields = config.to_dict()
        for key, value in self.config_overrides.items():
            name = config.attribute_map.get(key, key)  # GPT-2 calls num_hidden_layers n_layer
            if name not in fields:
                raise ConfigFieldError(f"config_overrides.{key}", f"not a field of {type(config).__name__}")
            fields[name] = value
        if fields.get("layer_types") and "layer_types" not in self.config_overrides:
            depth = config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
            if len(fields["layer_types"]) != fields[depth]:
                del fields["layer_types"]  # the config derives it for the new depth
        try:
            return config_from_dict(fields)
        except Exception as e:  # the config's own checks: ValueError, TypeError, or huggingface_hub's wrapping one
            raise ConfigFieldError("config_overrides", first_line(e.__cause__ or e)) from None


class HFDecoderLM(nn.Module):
    """A transformers causal LM's modules under their own names, run one decoder layer at a time (each family's
    ``forward``). ``config`` is its ``PretrainedConfig``; ``source`` the folder it came from, whose tokenizer and
    generation config go with its exports."""

    lm_head: Any  # the output head (None in a pipeline stage without it); each family names its other children

    def __init__(self, hf_model: nn.Module, source: str | None):
        super().__init__()
        self.config: Any = hf_model.config
        self.source = source
        self.base_model_prefix: str = cast(Any, hf_model).base_model_prefix  # what checkpoints may leave off names
        for name, child in hf_model.named_children():
            self.add_module(name, child)


class HFDecoderFamily(ModelFamily[HFDecoderLM]):
    """What every Hugging Face decoder family answers alike; each names its ``model_types``, wraps a transformers
    model (``wrap``) and says how its state dict differs from the Hugging Face checkpoint's (``to_hf_state``)."""

    config_class = HFConfig
    model_types: tuple[str, ...] = ()
    structured_units = pipelines = pretrained_format = fused_head = True

    @abstractmethod
    def wrap(self, hf_model: nn.Module, source: str | None) -> HFDecoderLM:
        """The Stillroom model holding ``hf_model``'s modules (made from a folder ``source``, if any)."""

    def to_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` under the layout of the Hugging Face checkpoint (the same, unless the family changed it)."""
        return state

    def stored_transposed(self, name: str) -> bool:
        """Whether parameter ``name`` is stored transposed in a Hugging Face checkpoint (``to_hf_state``)."""
        return False

    def build(self, config: HFConfig) -> HFDecoderLM:
        """The folder's model with its weights (``config.loads_weights``), else a randomly initialised one; on the
        meta device always the latter (the architecture only)."""
        transformers = import_transformers()
        pretrained = config.resolve()
        if config.loads_weights and torch.get_default_device().type != "meta":
            assert config.path is not None  # loads_weights says there is a folder
            try:
                model = load_decompressed(config.path, config=pretrained, dtype=torch.float32)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"{config.path}: transformers cannot load the model ({first_line(e)})") from None
            return self.wrap(model, config.path)  # fp32 already (a quantized model refuses .float())
        return self.wrap(transformers.AutoModelForCausalLM.from_config(pretrained).float(), config.path)

    def config(self, model: HFDecoderLM) -> HFConfig:
        fields = {key: value for key, value in model.config.to_dict().items() if key not in SPEC_OMITS}
        return HFConfig(path=model.source, hf_config=fields, vocab_size=model.config.vocab_size)

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in flatten(config).items() if key not in INCIDENTAL}

    def depth(self, config: HFConfig) -> int:
        return config.resolve().num_hidden_layers

    def layers(self, model: HFDecoderLM) -> dict[str, nn.Module]:
        return dict(cast(nn.ModuleDict, model.get_submodule(self.layers_attr)).items())

    def width(self, model: HFDecoderLM) -> int:
        return model.config.hidden_size

    def vocab_size(self, model: HFDecoderLM) -> int:
        return model.config.vocab_size

    def head(self, model: HFDecoderLM) -> nn.Module:
        return model.lm_head

    def thinned_widths(self, model: HFDecoderLM, alive: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """One width per kind for every layer, the widest layer's (a Hugging Face config has no per-layer widths)."""
        widest: dict[str, int] = {}
        for (kind, _), width in alive.items():
            widest[kind] = max(widest.get(kind, 0), width)
        return {(kind, layer): widest[kind] for kind, layer in alive}

    def save_pretrained(self, model: HFDecoderLM, folder: Path) -> None:
        """A Hugging Face folder: ``config.json``, ``model.safetensors`` and the generation config, written by
        transformers itself from a copy built on the meta device that takes ``model``'s tensors; the tokenizer and
        generation config of the folder ``model`` came from, when it has them."""
        transformers = import_transformers()
        with torch.device("meta"):
            hf_model = transformers.AutoModelForCausalLM.from_config(model.config)
        state = self.to_hf_state({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()})
        hf_model.load_state_dict(state, assign=True)
        hf_model.tie_weights()
        hf_model.save_pretrained(folder)
        source = Path(model.source) if model.source else None
        for name in COMPANION_FILES:
            if source is not None and (source / name).is_file():
                shutil.copyfile(source / name, folder / name)


def cache_argument(layer: nn.Module) -> str:
    """The keyword transformers' decoder layers take their key/value cache by (``trainer.models.protocol.KVCache``
    stands in for transformers' own): ``cache`` (5.x), before that ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def row_slices(module: str, linear: nn.Linear, **shape) -> tuple[UnitSlice, ...]:
    """The unit slices of an in-projection ``linear`` named ``module``: its weight's rows, and its bias's entries
    when it has one (``shape``: ``UnitSlice``'s unit size, parts and gating run)."""
    params = ["weight"] + (["bias"] if linear.bias is not None else [])
    return tuple(UnitSlice(f"{module}.{p}", module, dim=0, **shape) for p in params)


DECODERS: dict[str, HFDecoderFamily] = {}  # by the transformers model_type they run


def register_decoder(decoder: HFDecoderFamily) -> HFDecoderFamily:
    """Make ``decoder`` a model family and the one that runs its ``model_types``."""
    register(decoder)
    DECODERS.update(dict.fromkeys(decoder.model_types, decoder))
    return decoder


def decoder_for(model_type: str) -> HFDecoderFamily:
    """The family that runs ``model_type``: its structure spec's, else the generic path (``generic.py``)."""
    from trainer.models.hf.generic import GENERIC

    return DECODERS.get(model_type, GENERIC)


def structured_model_types() -> str:
    """The model types with a structure spec: what pipeline stages, head/channel pruning and cuts need."""
    return ", ".join(sorted(DECODERS))


class HFFamily(ModelFamily[HFDecoderLM]):
    """``student.arch=hf``: a Hugging Face folder. The model built is of the decoder family of its ``model_type``,
    which answers for it from then on (checkpoints and exports name that family)."""

    name, model_class, config_class = "hf", HFDecoderLM, HFConfig
    structured_units = pipelines = fused_head = True

    def build(self, config: HFConfig) -> HFDecoderLM:
        return decoder_for(config.resolve().model_type).build(config)

    def depth(self, config: HFConfig) -> int:
        return config.resolve().num_hidden_layers

    def layers(self, model: HFDecoderLM) -> dict[str, nn.Module]:
        return decoder_for(model.config.model_type).layers(model)

    def width(self, model: HFDecoderLM) -> int:
        return model.config.hidden_size

    def vocab_size(self, model: HFDecoderLM) -> int:
        return model.config.vocab_size

    def head(self, model: HFDecoderLM) -> nn.Module:
        return model.lm_head


register(HFFamily())


def load_pretrained(folder: str | Path) -> HFDecoderLM:
    """The Hugging Face folder's model with its weights, in eval mode on CPU (ValueError, one line, if it is not a
    model of a Hugging Face decoder family)."""
    try:
        config = HFConfig(path=str(folder))
    except ConfigFieldError as e:
        raise ValueError(e.message) from None
    return decoder_for(config.resolve().model_type).build(config).eval()


def from_transformers(hf_model: nn.Module, source: str | None) -> HFDecoderLM:
    """A transformers causal LM of a Hugging Face decoder family (one read from a GGUF file) as that family's model,
    sharing its modules (``source``: the folder its tokenizer files are in, if any)."""
    return decoder_for(cast(Any, hf_model).config.model_type).wrap(hf_model, source)


class TransformersLM(nn.Module):
    """A causal LM as transformers alone loads and runs it (``from_pretrained``), called as Stillroom calls a model:
    ``forward(idx)`` returns the logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=idx).logits


def load_transformers(folder: str | Path) -> TransformersLM:
    """The Hugging Face folder's model as ``AutoModelForCausalLM.from_pretrained`` gives it, in eval mode on CPU,
    compressed-tensors weights decompressed as its first forward would (ValueError, one line, if it cannot be)."""
    try:
        model = load_decompressed(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: transformers cannot load the model ({first_line(e)})") from None
    return TransformersLM(model).eval()
