"""Find, describe and load a frozen teacher from a Stillroom export, run folder or checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from trainer import checkpoint, models


class TeacherPathError(ValueError):
    """The teacher path does not exist or is not a Stillroom export or checkpoint."""


def resolve(path: str | Path) -> tuple[str, Path]:
    """Return ("export" | "checkpoint", folder) for an export, a run folder, or a checkpoint."""
    p = Path(path)
    if not p.exists():
        raise TeacherPathError(f"{path} does not exist")
    if (p / models.CONFIG_FILE).is_file():
        return "export", p
    if checkpoint.is_complete(p) and (p / checkpoint.MODEL_FILE).is_file():
        return "checkpoint", p
    if (p / "final" / models.CONFIG_FILE).is_file():
        return "export", p / "final"
    newest = checkpoint.latest(p / "ckpt")
    if newest is not None:
        return "checkpoint", newest
    raise TeacherPathError(f"{path} is not a Stillroom export, run folder or checkpoint")


def spec(path: str | Path) -> dict:
    """The teacher's architecture ({"arch", "config"}) without loading its weights."""
    kind, folder = resolve(path)
    try:
        return models.read_export_config(folder) if kind == "export" else checkpoint.read_model_spec(folder)
    except (ValueError, OSError) as e:
        raise TeacherPathError(str(e)) from e


def fingerprint(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of the teacher's files: every file under the resolved folder, names and bytes."""
    _, folder = resolve(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load(path: str | Path, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The teacher in eval mode with gradients off (frozen)."""
    kind, folder = resolve(path)
    if kind == "export":
        model = models.load(folder)
    else:
        model = models.build_from_spec(checkpoint.read_model_spec(folder))
        checkpoint.load_model_weights(folder, model)
    model.requires_grad_(False)
    return model.to(device).eval()
