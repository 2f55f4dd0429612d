"""Atomic, complete checkpoints with torch.distributed.checkpoint (DCP), also in one process.

Layout: ``<run_dir>/ckpt/step_0000500/`` holds the DCP files (model, optimizer, compression
tensors, RNG), ``trainer_state.json`` (step, LR schedule, data position, plain compression
state), ``model.json`` (the architecture, so a teacher can be rebuilt from it) and
``manifest.json`` (every other file's size and SHA-256). Each is written to ``.tmp-step_*`` and
renamed when complete, so a kill or a disk error at any moment leaves the previous checkpoint
loadable. Nothing is unpickled: DCP tensors and JSON only.

The tensor files are hashed right after they are written (still in the page cache) and again before a
resume reads them; under several ranks each rank hashes every n-th file, so a rank rereads about
1/n of the checkpoint.

Faults: ``load`` checks the manifest before reading a tensor, so a missing, truncated or garbled file
(one flipped bit) is named (``CorruptCheckpoint``) and ``load_newest`` falls back to the checkpoint before it; a
checkpoint of another architecture is refused (``ModelMismatch``); ``save`` turns a write error
on any rank into ``CheckpointWriteError`` on every rank, with the previous checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from parallel import groups
from trainer import files

STUDENT = "student"  # the student's key among a run's trainable modules (and so in its checkpoints)
STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.json"
METADATA_FILE = ".metadata"
MANIFEST_FILE = files.MANIFEST_FILE
TENSOR_SUFFIX = ".distcp"  # DCP's tensor files (the big ones: hashed by all ranks together)
# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not per
# group: pipeline stages hold different parameters in their groups, and any layout can load any other.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names it and says why, on one line."""

    config_key: str | None = None  # the config key to change when the config, not a file, is at fault


class CorruptCheckpoint(CheckpointError):
    """A file of the checkpoint is missing, truncated or garbled."""


class ModelMismatch(CheckpointError):
    """The checkpoint holds another model architecture than the one being trained."""

    config_key = "student"


class RunChanged(CheckpointError):
    """The checkpoint was written by a run with another teacher, data, seed, batch size or LR schedule; the config key
    is the first that differs."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.config_key = key


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); nothing was replaced or deleted."""


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
        dist.barrier(group=groups.trainer_group())


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def step_of(path: Path) -> int:
    """The step a checkpoint folder (``step_dir``) holds."""
    match = STEP_DIR.match(path.name)
    assert match is not None, path  # a checkpoint folder's name
    return int(match.group(1))


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
        parts = name[len(prefix) :].split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = tensor
    return out


def save(root: Path, step: int, *, model, optimizer, extra: dict, model_spec: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the ``keep_last`` newest.

    Raises CheckpointWriteError on every rank when any rank fails to write; the temporary folder is removed
    and the existing checkpoints are left as they were.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    try:
        _on_main(lambda: _fresh_dir(tmp))
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_OPTIONS)
        extra_tensors, extra_plain = split_state(extra)
        state = {"model": model_sd, "optim": optim_sd, "extra": extra_tensors}
        with _single_process_is_fine():
            dcp.save(state, checkpoint_id=str(tmp), process_group=groups.trainer_group())
        hashes = files.sha256_split(files.with_suffix(tmp, TENSOR_SUFFIX), groups.trainer_group())
        _on_main(lambda: _publish(tmp, final, model_spec, {"step": step, **extra_plain}, hashes))
    except (OSError, CheckpointException, KeyboardInterrupt) as e:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if _interrupted(e):  # a second Ctrl-C inside the write (DCP wraps it like a write error)
            raise KeyboardInterrupt from None
        previous = latest(root)
        kept = f"the newest checkpoint is still {previous}" if previous else "no earlier checkpoint exists"
        why = f"{_reason(e)}{_free_space(root)}"
        raise CheckpointWriteError(f"could not write checkpoint {final} ({why}); {kept}") from e
    if is_main():
        for old in list_complete(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _publish(tmp: Path, final: Path, model_spec: dict, trainer_state: dict, tensor_hashes: dict[str, str]) -> None:
    """Complete the temporary folder (JSON files, manifest last) and rename it to ``final``."""
    _write_json(tmp / MODEL_FILE, model_spec)
    _write_json(tmp / STATE_FILE, trainer_state)
    _write_json(tmp / MANIFEST_FILE, {"files": files.describe(tmp, tensor_hashes)})
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _on_main(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 only; its OSError is raised on every rank, so no rank waits on a failed one."""
    error = None
    if is_main():
        try:
            action()
        except OSError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0, group=groups.trainer_group())
        error = box[0]
    if error is not None:
        raise OSError(error)


def _free_space(path: Path) -> str:
    """``"; N MiB free there"`` for the file system of ``path`` (a full disk's errors rarely say so), or ""."""
    try:
        return f"; {shutil.disk_usage(path).free / 2**20:.0f} MiB free there"
    except OSError:
        return ""


def _causes(error: BaseException) -> list[BaseException]:
    """``error``, the exception of each failing rank inside a DCP CheckpointException, and their causes."""
    found, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e in found:
            continue
        found.append(e)
        if isinstance(e, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        todo += [link for link in (e.__cause__, e.__context__) if link is not None]
    return found


def _interrupted(error: BaseException) -> bool:
    return any(isinstance(e, KeyboardInterrupt) for e in _causes(error))


def _reason(error: BaseException) -> str:
    """One line saying what went wrong: the first failing rank's exception inside a DCP CheckpointException, or
    the OSError behind it (a full disk surfaces from torch.save as "unexpected pos", the OSError as its context)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    chain = [error]
    while (link := chain[-1].__cause__ or chain[-1].__context__) is not None and link not in chain:
        chain.append(link)
    error = next((e for e in chain if isinstance(e, OSError)), error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def verify(path: Path, *, shared: bool = False) -> None:
    """Raise CorruptCheckpoint naming the first file of checkpoint ``path`` that is missing, truncated or garbled.

    Checked against ``manifest.json``: sizes, then SHA-256. With ``shared`` (a collective of the trainer's group)
    the ranks split the hashing of the tensor files. A checkpoint written before manifests existed only has its
    JSON files parsed, and one whose manifest has no hashes of tensor files only their sizes checked.
    """
    manifest = path / MANIFEST_FILE
    problems: list[str] = []
    if manifest.exists():
        entries = _read_json(manifest).get("files")
        if not isinstance(entries, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) for entry in entries.values()
        ):
            raise CorruptCheckpoint(f"{manifest} is garbled (no list of files and sizes)")
        problems = [problem for name, entry in entries.items() if (problem := files.size_problem(path / name, entry))]
        hashed = sorted(path / name for name, entry in entries.items() if "sha256" in entry)
        if not problems:  # the same on every rank: all ranks hash, or none
            hashes = (
                files.sha256_split(hashed, groups.trainer_group())
                if shared
                else {file.name: files.sha256(file) for file in hashed}
            )
            problems = [
                files.garbled(path / name)
                for name, entry in entries.items()
                if "sha256" in entry and hashes[name] != entry["sha256"]
            ]
    if problems:
        raise CorruptCheckpoint(problems[0])
    for name in (STATE_FILE, MODEL_FILE):
        _read_json(path / name)


def check_model(path: Path, model_spec: dict) -> None:
    """Raise ModelMismatch when checkpoint ``path`` was written for another model than ``model_spec``: another
    family, or other values of the fields that say what the model is (``ModelFamily.identity``: not where it was
    read from, nor the dtype it was loaded in). The line names at most three differences, each value cut short."""
    from trainer.models.protocol import family

    saved, wanted = read_model_spec(path), json.loads(json.dumps(model_spec))
    if saved.get("arch") != wanted.get("arch"):
        differences = [f"arch {saved.get('arch')} there, {wanted.get('arch')} here"]
    else:
        kind = family(str(wanted.get("arch")))
        there, here = kind.identity(saved.get("config", {})), kind.identity(wanted.get("config", {}))
        differences = [
            f"{key} {_short(there.get(key))} there, {_short(here.get(key))} here"
            for key in sorted(set(there) | set(here))
            if there.get(key) != here.get(key)
        ]
    if not differences:
        return
    shown = ", ".join(differences[:3]) + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")
    raise ModelMismatch(
        f"checkpoint {path.parent.name}/{path.name} holds another model than this config ({shown}): resume with "
        "the same model, or train in another hydra.run.dir"
    )


def _short(value: Any, limit: int = 24) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else "..." + text[3 - limit :]  # a path's end says the most


def check_run(path: Path, identity: dict) -> None:
    """Raise RunChanged when checkpoint ``path`` was written with other values of ``identity``'s keys (config keys:
    what a resume must keep, see ``trainer.build.run_identity`` and ``TrainConfig.resume_must_keep``). A
    checkpoint that recorded none of them passes. The line names at most three differences, each value cut short."""
    saved = _read_json(path / STATE_FILE).get("run")
    if not isinstance(saved, dict):
        return
    differ = [key for key, value in identity.items() if saved.get(key, value) != value]
    if differ:
        shown = ", ".join(f"{key} {_short(saved[key])} there, {_short(identity[key])} here" for key in differ[:3])
        raise RunChanged(
            f"checkpoint {path.name} differs ({shown}); train.allow_resume_changes=[{','.join(differ)}] resumes it",
            differ[0],
        )


def load(
    path: Path,
    *,
    model,
    optimizer,
    extra_template: dict,
    model_spec: dict | None = None,
    run_identity: dict | None = None,
) -> dict:
    """Load model and optimizer in place; return the extra state (tensors filled like the template).

    Raises CorruptCheckpoint (naming the file or the error) when the checkpoint cannot be read: the model may
    then hold some of its tensors, so load another checkpoint or stop. With ``model_spec`` (``run_identity``),
    raises ModelMismatch (RunChanged) before reading any tensor when the checkpoint holds another architecture
    (was written with other settings).
    """
    verify(path, shared=True)
    if model_spec is not None:
        check_model(path, model_spec)
    if run_identity is not None:
        check_run(path, run_identity)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    extra_tensors, _ = split_state(extra_template)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "extra": extra_tensors}
    try:
        with _single_process_is_fine():
            dcp.load(state, checkpoint_id=str(path), process_group=groups.trainer_group())
    except (Exception, CheckpointException) as e:
        raise CorruptCheckpoint(f"{path} could not be read ({_reason(e)})") from e
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIM_OPTIONS
    )
    return join_state(state["extra"], _read_json(path / STATE_FILE))


def load_newest(
    candidates: list[Path],
    *,
    model,
    optimizer,
    extra_template: dict,
    model_spec: dict,
    run_identity: dict | None = None,
) -> tuple[Path, dict, list[str]]:
    """Load the newest usable of ``candidates`` (oldest first): (its path, its extra state, why each newer one
    was skipped). A corrupt checkpoint is skipped for the one before it; ModelMismatch (RunChanged) is raised at
    once for one of another model (other settings), CheckpointError when none is usable. Nothing is deleted.
    """
    skipped: list[str] = []
    for path in reversed(candidates):
        try:
            state = load(
                path,
                model=model,
                optimizer=optimizer,
                extra_template=extra_template,
                model_spec=model_spec,
                run_identity=run_identity,
            )
            return path, state, skipped
        except CorruptCheckpoint as e:
            skipped.append(str(e))
    raise CheckpointError(
        f"no usable checkpoint: {'; '.join(skipped)}. Nothing was deleted: move them away, "
        "or start over with train.resume=never"
    )


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the student's weights of a checkpoint into ``model`` (e.g. a teacher, or a model to export), in
    this process alone (no collective: a teacher rank loads its teacher while the student ranks do other work).
    A checkpoint holds the run's trainable modules, the student under ``STUDENT``. Raises CorruptCheckpoint."""
    verify(path)
    holder = nn.ModuleDict({STUDENT: model})
    state = {"model": get_model_state_dict(holder)}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CorruptCheckpoint(f"{path} could not be read ({_reason(e)})") from e
    set_model_state_dict(holder, state["model"], options=StateDictOptions(strict=True))


def read_model_spec(path: Path) -> dict:
    """The architecture checkpoint ``path`` holds; CorruptCheckpoint when its ``model.json`` is missing or garbled."""
    return _read_json(path / MODEL_FILE)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; CorruptCheckpoint naming the file when it is missing or not one."""
    if not path.is_file():
        raise CorruptCheckpoint(f"{path} is missing")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"{path} is garbled (not a JSON object)")
    return value


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
