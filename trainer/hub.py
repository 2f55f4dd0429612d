"""Hugging Face Hub ids where a config names a model or tokenizer folder: ``teacher.checkpoint``, ``student.path``
(``student=hf``) and ``data.tokenizer`` take ``owner/name`` or ``owner/name@revision`` as well as a path.

A value is a hub id when it is not an existing path and has that shape. ``local`` turns one into its snapshot folder
in the hub cache with ``huggingface_hub.snapshot_download``: downloaded when online, read from the cache alone with
``HF_HUB_OFFLINE=1``. ``huggingface_hub`` reads its environment when it is imported, so the cache folder and offline
mode are read here at each call and passed to it. The preflight replaces a run config's ids by their folders
(``localize``) before any other check reads them, so the rest of Stillroom only ever sees folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import TOKENIZED_DATA, ConfigError

if TYPE_CHECKING:
    from trainer.config import DataConfig, TeacherConfig

# owner/name[@revision]: each part a letter or digit, then letters, digits, "_", "-" or "." (the Hub's own rules).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# What Stillroom reads of a model's repository: its configs, tokenizer and safetensors weights (not the ONNX, GGUF or
# pytorch_model.bin copies many repositories also hold).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_resolved: dict[tuple[str, str, bool], str] = {}  # (id, cache folder, offline): its snapshot folder, once per process


class HubError(ValueError):
    """A hub id that cannot be read here (one line naming it and how to get it); ``reason`` says why, briefly."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def is_hub_id(value: str) -> bool:
    """Whether ``value`` names a Hugging Face Hub repository rather than a path: not an existing path, and
    ``owner/name`` or ``owner/name@revision``."""
    return not Path(value).exists() and HUB_ID.fullmatch(value) is not None and ".." not in value


def cache_dir() -> Path:
    """The hub cache folder the environment names now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (``huggingface_hub``'s own order, read at each call rather than at its import)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def offline() -> bool:
    """Whether the environment says now that the Hub is out of reach (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``)."""
    values = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return values in ("1", "ON", "YES", "TRUE")


def local(value: str) -> str:
    """``value`` itself when it is not a hub id (an existing path, or a path that is missing: left to the caller's
    own check); else the folder of its snapshot in the hub cache, downloaded first when online. HubError (one line)
    when it cannot be had."""
    if not is_hub_id(value):
        return value
    match = HUB_ID.fullmatch(value)
    assert match is not None  # is_hub_id
    repo, revision = match["repo"], match["revision"]
    cache, is_offline = cache_dir(), offline()
    key = (value, str(cache), is_offline)
    if key not in _resolved:
        _resolved[key] = _snapshot(value, repo, revision, cache, is_offline)
    return _resolved[key]


def _snapshot(value: str, repo: str, revision: str | None, cache: Path, is_offline: bool) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise HubError(
            f"{value} is not a local path, and reading it from the Hugging Face Hub needs huggingface_hub: "
            "pip install 'stillroom[llm]'",
            "huggingface_hub is not installed",
        ) from None
    download = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=is_offline, allow_patterns=ALLOW_PATTERNS
        )
    except errors.RevisionNotFoundError:
        reason = f"the Hugging Face Hub has no revision {revision} of {repo}"
        raise HubError(f"{value} is not a local path, and {reason}", reason) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        reason = f"the Hugging Face Hub has no model {repo} that this machine may read (gated ones: hf auth login)"
        raise HubError(f"{value} is not a local path, and {reason}", reason) from None
    except errors.IncompleteSnapshotError:
        reason = f"its snapshot in the hub cache {cache} is incomplete"
        message = f"{value} is not a local path, and {reason}: finish it with network access ({download})"
        raise HubError(message, reason) from None
    except errors.LocalEntryNotFoundError as e:
        if is_offline:
            reason = f"it is not in the Hugging Face hub cache {cache} (HF_HUB_OFFLINE=1)"
        else:
            reason = f"it is not in the Hugging Face hub cache {cache} and the Hub cannot be reached ({_cause(e)})"
        message = f"{value} is not a local path, and {reason}: download it with network access ({download})"
        raise HubError(message, reason) from None
    except (OSError, ValueError) as e:  # the Hub's other HTTP errors, an id it refuses (HFValidationError)
        reason = f"the Hugging Face Hub cannot give it ({_first_line(e)})"
        raise HubError(f"{value} is not a local path, and {reason}", reason) from None


def _cause(error: BaseException) -> str:
    """The first line of what made ``error`` (huggingface_hub raises LocalEntryNotFoundError from the network's)."""
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def localize(teacher: TeacherConfig, student: dict, data: DataConfig) -> None:
    """Replace the hub ids of ``teacher.checkpoint``, ``student.path`` (of ``student=hf``) and ``data.tokenizer`` (of
    tokenized data) by their snapshot folders, in place; a tokenizer that is the teacher's follows it. ConfigError
    naming the key. A teacher with a ``recipe`` is left alone: the recipe makes it."""
    checkpoint = teacher.checkpoint
    if checkpoint is not None and not teacher.recipe:
        teacher.checkpoint = _local_at("teacher.checkpoint", checkpoint)
        if data.tokenizer == checkpoint:  # the teacher's own tokenizer (RunConfig's `teacher`)
            data.tokenizer = teacher.checkpoint
    if student.get("arch") == "hf" and isinstance(student.get("path"), str):
        student["path"] = _local_at("student.path", student["path"])
    if data.name in TOKENIZED_DATA:  # other data sets read no tokenizer
        data.tokenizer = _local_at("data.tokenizer", data.tokenizer)


def _local_at(key: str, value: str) -> str:
    try:
        return local(value)
    except HubError as e:
        raise ConfigError(key, str(e)) from None
