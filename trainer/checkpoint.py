"""Atomic, complete checkpoints with torch.distributed.checkpoint (DCP), also in one process.

Layout: ``<run_dir>/ckpt/step_0000500/`` holds the DCP files (model, optimizer, compression
tensors, RNG), ``trainer_state.json`` (step, LR schedule, data position, plain compression
state) and ``model.json`` (the architecture, so a teacher can be rebuilt from it). Each is
written to ``.tmp-step_*`` and renamed when complete, so a kill at any moment leaves the
previous checkpoint loadable. Nothing is unpickled: DCP tensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.json"
METADATA_FILE = ".metadata"
# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not per
# group: pipeline stages hold different parameters in their groups, and any layout can load any other.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)



@contextlib.contextmanager
def _single_process_is_fine():
    """DCP warns that it works "in a single process" when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / METADATA_FILE).is_file() and (path / STATE_FILE).is_file()


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def split_state(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """Split a nested dict into (flat tensors, JSON-able rest), so tensors go to DCP."""
    tensors, plain = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, dict):
            sub_tensors, sub_plain = split_state(value, f"{name}/")
            tensors.update(sub_tensors)
            if sub_plain:
                plain[key] = sub_plain
        else:
            plain[key] = value
    return tensors, plain


def join_state(tensors: dict, plain: dict, prefix: str = "") -> dict:
    """Inverse of ``split_state`` for the keys under ``prefix``."""
    out = {k: (join_state(tensors, v, f"{prefix}{k}/") if isinstance(v, dict) else v) for k, v in plain.items()}
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = tensor
    return out


def save(root: Path, step: int, *, model, optimizer, extra: dict, model_spec: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the ``keep_last`` newest."""
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    extra_tensors, extra_plain = split_state(extra)
    state = {"model": model_sd, "optim": optim_sd, "extra": extra_tensors}
    with _single_process_is_fine():
        dcp.save(state, checkpoint_id=str(tmp))
    if is_main():
        _write_json(tmp / MODEL_FILE, model_spec)
        _write_json(tmp / STATE_FILE, {"step": step, **extra_plain})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_complete(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, *, model, optimizer, extra_template: dict) -> dict:
    """Load model and optimizer in place; return the extra state (tensors filled like the template)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    extra_tensors, _ = split_state(extra_template)
    state = {"model": model_sd, "optim": optim_sd, "extra": extra_tensors}
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIM_OPTIONS)
    plain = json.loads((path / STATE_FILE).read_text())
    return join_state(state["extra"], plain)


def load_model_weights(path: Path, model) -> None:
    """Load only the model weights of a checkpoint (e.g. a teacher) into ``model``."""
    state = {"model": get_model_state_dict(model)}
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))


def read_model_spec(path: Path) -> dict:
    return json.loads((path / MODEL_FILE).read_text())


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
