"""Model registry: build a model from its config, save a dense export, ``load(path)`` any export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save_file

from trainer.models.gpt import GPT, GPTConfig
from trainer.models.mlp import MLP, MLPConfig

ARCHES = {"gpt": (GPT, GPTConfig), "mlp": (MLP, MLPConfig)}
DENSE_FORMAT = "stillroom-dense"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def build(arch: str, **fields) -> nn.Module:
    """Build a freshly initialised model of ``arch`` from its config fields."""
    model_cls, cfg_cls = ARCHES[arch]
    return model_cls(cfg_cls(**fields))


def arch_of(model: nn.Module) -> str:
    return next(name for name, (cls, _) in ARCHES.items() if isinstance(model, cls))


def model_spec(model: nn.Module) -> dict:
    """The JSON-able description that rebuilds ``model``'s architecture."""
    return {"arch": arch_of(model), "config": dataclasses.asdict(model.cfg)}


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
    """Write ``config.json`` and ``model.safetensors`` (fp32, dense) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    if "format" not in meta or "arch" not in meta:
        raise ValueError(f"{cfg_file}: not a Stillroom export config (no 'format'/'arch')")
    return meta


def load(path: str | Path) -> nn.Module:
    """Rebuild a model from an export folder written by Stillroom, in eval mode on CPU."""
    meta = read_export_config(path)
    if meta["format"] != DENSE_FORMAT:
        from trainer.compress.export import load_compressed

        return load_compressed(path)
    model = build_from_spec(meta)
    load_weights(model, load_file(str(Path(path) / WEIGHTS_FILE)))
    return model.eval()


def load_weights(model: nn.Module, state: dict) -> None:
    """Load ``state`` strictly, except for tied weights that ``unique_state_dict`` dropped."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not fit the model: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")


def _is_tied(model: nn.Module, name: str) -> bool:
    tensor = model.get_parameter(name) if name in dict(model.named_parameters(remove_duplicate=False)) else None
    return tensor is not None and any(
        p is tensor and other != name for other, p in model.named_parameters(remove_duplicate=False)
    )
