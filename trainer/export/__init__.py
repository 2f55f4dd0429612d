"""Any export folder Stillroom writes, loaded back: dense (``trainer.models``), a Hugging Face folder (a Hugging Face
student's, ``trainer.models.hf``) or compressed (``trainer.compress.stillroom_format``: int8/int4 codes, sparse
bitmasks, thinned units). ``python -m trainer.export`` (``trainer.cli.export``) writes a quantized one.

An export is written to a staging folder, sealed with a ``manifest.json`` (size and SHA-256 of every file) and
renamed into place (``publish``); ``load`` checks the manifest first, so a damaged file is named, not loaded. A Hugging
Face student's export is a Hugging Face folder, dense or in the compressed-tensors format (``trainer.compress.
compressed_tensors``): ``load`` runs it as that student's family, ``load_served`` as transformers alone does."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError

from trainer import files, models
from trainer.models import hf


class ExportError(ValueError):
    """An export folder that cannot be loaded: the message names the file and why, on one line."""


def staging_dir(final: Path) -> Path:
    """Where the export that becomes ``final`` is written (emptied first)."""
    staging = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def publish(staging: Path, final: Path) -> None:
    """Seal the complete export in ``staging`` (its files' modes as the umask says, its manifest) and put it at
    ``final``, replacing what was there."""
    files.follow_umask(staging)
    files.write_manifest(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def verify(path: str | Path) -> None:
    """ExportError naming the first file of export ``path`` that is missing, truncated or garbled."""
    problem = files.manifest_problem(Path(path))
    if problem:
        raise ExportError(problem)


def load_served(path: str | Path) -> nn.Module:
    """The export as its users run it: a Hugging Face folder through transformers alone (``hf.load_transformers``),
    any other as ``load`` reads it; ExportError (one line) when it cannot be loaded."""
    if not hf.names_hf_model(Path(path)):
        return load(path)
    verify(path)
    try:
        return hf.load_transformers(path)
    except ValueError as e:
        raise ExportError(str(e)) from e


def load(path: str | Path) -> nn.Module:
    """The model in the export folder ``path``, in eval mode on CPU; ExportError (one line) when it cannot be."""
    verify(path)
    try:
        if hf.names_hf_model(Path(path)):
            return hf.load_pretrained(path)
        if models.read_export_config(path)["format"] == models.DENSE_FORMAT:
            return models.load_dense(path)
        from trainer.compress.stillroom_format import load_compressed  # torchao: imported only for a compressed export

        return load_compressed(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = " ".join(lines[:2])[:300]  # torch's first line only says "Error(s) in loading state_dict for GPT:"
        named = str(Path(path)) in why  # Stillroom's own errors name the file already
        raise ExportError(why if named else f"{path} cannot be loaded ({type(e).__name__}: {why})") from e
