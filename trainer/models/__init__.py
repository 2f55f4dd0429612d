"""Models: build one from its family's config, save and load a dense export (``trainer.export.load`` reads any).

A family (``trainer/models/protocol.py``) registers itself when its module is imported; the built-in
ones are imported here (the Hugging Face ones import transformers only when they build a model)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file

from trainer.models import gpt, hf, mlp  # noqa: F401  (registers the built-in families)
from trainer.models.hf import gemma3, generic, gpt2, llama, moe, olmo2, phi3  # noqa: F401
from trainer.models.protocol import FAMILIES, ConfigFieldError, ModelFamily, family, family_of

DENSE_FORMAT = "stillroom-dense"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def resolve_family(arch: str) -> ModelFamily:
    """The family named ``arch``; ``package.module:name`` first imports the module that registers it (a family
    defined outside Stillroom). Raises ConfigFieldError("arch", ...)."""
    module = arch.rpartition(":")[0]
    try:
        if module and arch not in FAMILIES:
            importlib.import_module(module)
        return family(arch)
    except KeyError as e:
        raise ConfigFieldError("arch", e.args[0]) from None
    except ImportError as e:
        raise ConfigFieldError("arch", f"cannot import {module} ({e})") from None


def student_config(fields: dict[str, Any], data_fields: dict[str, Any]) -> tuple[ModelFamily, Any]:
    """The family of ``fields["arch"]`` and its config dataclass from the other ``fields`` (types checked, unknown
    keys refused) plus those of ``data_fields`` (what the data decides: vocabulary, input size) it has.
    Raises ConfigFieldError naming the field."""
    spec = resolve_family(str(fields.get("arch", "")))
    if spec.config_class is None:
        raise ConfigFieldError("arch", f"{spec.name} models cannot be built as students")
    return spec, typed_config(spec.config_class, fields, data_fields)


def typed_config(config_class: type, fields: dict[str, Any], data_fields: dict[str, Any]) -> Any:
    """``config_class`` (a dataclass) from ``fields`` but ``arch`` (types checked, unknown keys refused) plus those
    of ``data_fields`` it has. Raises ConfigFieldError naming the field."""
    known = {f.name for f in dataclasses.fields(config_class)}
    given = {key: value for key, value in fields.items() if key != "arch"}
    try:
        node = OmegaConf.merge(
            OmegaConf.structured(config_class), {k: v for k, v in data_fields.items() if k in known}, given
        )
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or next(iter(set(given) - known), "arch")
        raise ConfigFieldError(str(key), str(getattr(e, "msg", e)).splitlines()[0]) from None


def build(arch: str, **fields) -> nn.Module:
    """Build a freshly initialised model of ``arch`` from its config fields."""
    spec = resolve_family(arch)
    assert spec.config_class is not None  # only student families (they have a config class) are built by name
    return spec.build(spec.config_class(**fields))


def model_spec(model: nn.Module) -> dict:
    """The JSON-able description that rebuilds ``model``'s architecture."""
    spec = family_of(model)
    return {"arch": spec.name, "config": dataclasses.asdict(spec.config(model))}


def build_from_spec(spec: dict) -> nn.Module:
    return build(spec["arch"], **spec["config"])


def unique_state_dict(model: nn.Module) -> dict:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def save_dense(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp32, dense) to ``out_dir``: the family's own folder where it
    has one (a Hugging Face folder), else Stillroom's dense export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = family_of(model)
    if family.pretrained_format:
        family.save_pretrained(model, out)
        return out
    save_file(unique_state_dict(model), str(out / WEIGHTS_FILE))
    meta = {"format": DENSE_FORMAT, **model_spec(model), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_export_config(path: str | Path) -> dict:
    """The ``config.json`` of an export folder (raises FileNotFoundError / ValueError)."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a Stillroom export)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "format" not in meta or "arch" not in meta:
        raise ValueError(f"{cfg_file}: not a Stillroom export config (no 'format'/'arch')")
    try:
        config_class = resolve_family(str(meta["arch"])).config_class
        if config_class is not None:
            config_class(**meta.get("config", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: its config does not make a {meta['arch']} model ({e})") from None
    return meta


def load_dense(path: str | Path) -> nn.Module:
    """Rebuild a model from a dense export folder (``save_dense``), in eval mode on CPU; ``trainer.export.load``
    reads any export."""
    meta = read_export_config(path)
    if meta["format"] != DENSE_FORMAT:
        raise ValueError(f"{path}: a {meta['format']} export, not {DENSE_FORMAT}")
    model = build_from_spec(meta)
    load_weights(model, load_file(str(Path(path) / WEIGHTS_FILE)))
    return model.eval()


def load_weights(model: nn.Module, state: dict) -> None:
    """Load ``state`` strictly, except for tied weights that ``unique_state_dict`` dropped."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"weights do not fit the model: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )


def _is_tied(model: nn.Module, name: str) -> bool:
    tensor = model.get_parameter(name) if name in dict(model.named_parameters(remove_duplicate=False)) else None
    return tensor is not None and any(
        p is tensor and other != name for other, p in model.named_parameters(remove_duplicate=False)
    )
