"""Files one step writes and another reads back: their manifest (size and SHA-256 of each), checked before use, and
their modes (as the umask says, also for the safetensors files that safetensors writes 0600)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

MANIFEST_FILE = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def with_suffix(folder: Path, suffix: str) -> list[Path]:
    """The files of ``folder`` whose names end with ``suffix``, sorted."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file())


def sha256_split(paths: list[Path], group: dist.ProcessGroup | None) -> dict[str, str]:
    """{name: SHA-256} of ``paths`` on every rank of ``group`` (None: the default group), each rank hashing every
    n-th file; in one process, all of them."""
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    mine = {path.name: sha256(path) for path in paths[rank::size]}
    if size == 1:
        return mine
    everyone: list[dict[str, str] | None] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    return {name: digest for part in everyone if part for name, digest in part.items()}


def describe(folder: Path, hashes: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file directly in ``folder`` but the manifest; ``hashes`` gives the
    SHA-256 of files already hashed elsewhere."""
    known = hashes or {}
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": known.get(path.name) or sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }


def size_problem(file: Path, entry: dict) -> str | None:
    """Why ``file`` does not have the size its manifest ``entry`` says, or None."""
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "garbled"
        return f"{file} is {how}: {size} bytes, {entry['bytes']} when written"
    return None


def garbled(file: Path) -> str:
    return f"{file} is garbled (its SHA-256 differs from the one written)"


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file of ``folder`` (call it once the folder is complete)."""
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": describe(folder)}, indent=1))


def manifest_problem(folder: Path) -> str | None:
    """The first file of ``folder`` that is missing, truncated or garbled against its ``manifest.json`` (None
    when all match, or when the folder has no manifest: written before manifests existed, or by another tool)."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
        assert isinstance(entries, dict) and all(isinstance(e["bytes"], int) for e in entries.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{manifest} is garbled (no list of files, sizes and hashes)"
    for name, entry in entries.items():
        if problem := size_problem(folder / name, entry):
            return problem
    for name, entry in entries.items():
        if "sha256" in entry and sha256(folder / name) != entry["sha256"]:
            return garbled(folder / name)
    return None


def follow_umask(folder: Path) -> None:
    """Give every file of ``folder`` the mode the umask gives a new file (safetensors writes its files 0600)."""
    mode = 0o666 & ~_umask()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, mode)


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, which races with other threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")
