"""Find, describe and load a frozen teacher: a Stillroom export, run folder or checkpoint, a Hugging Face
causal-LM folder on local disk, or a GGUF file (or a folder holding one)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from trainer import checkpoint, export, models
from trainer.distill import vocab
from trainer.models import hf as hf_folders
from trainer.models.hf import causal_lm, gguf, weights
from trainer.models.protocol import ModelFamily, family_of, register

if TYPE_CHECKING:
    from trainer.config import DataConfig


class TeacherPathError(ValueError):
    """The teacher path does not exist or is not a Stillroom, Hugging Face or GGUF model."""


def resolve(path: str | Path) -> tuple[str, Path]:
    """Return ("export" | "checkpoint" | "hf", folder) for an export, a run folder, a checkpoint, or a Hugging
    Face folder (a config.json naming its model type, and weights; a Hugging Face student's export is one); or
    ("gguf", file) for a GGUF file or a folder holding exactly one."""
    p = Path(path)
    if not p.exists():
        raise TeacherPathError(f"{path} does not exist")
    if hf_folders.names_hf_model(p):
        if not hf_folders.weight_files(p):
            raise TeacherPathError(
                f"{path} has a Hugging Face config.json but no weights (model.safetensors or pytorch_model.bin)"
            )
        return "hf", p
    try:
        gguf_file = gguf.find(p)
    except ValueError as e:
        raise TeacherPathError(str(e)) from None
    if gguf_file is not None:
        return "gguf", gguf_file
    if (p / models.CONFIG_FILE).is_file():
        return "export", p
    if checkpoint.is_complete(p) and (p / checkpoint.MODEL_FILE).is_file():
        return "checkpoint", p
    if (p / "final" / models.CONFIG_FILE).is_file():  # a run folder: its export (a Hugging Face student's is one)
        return ("hf" if hf_folders.names_hf_model(p / "final") else "export"), p / "final"
    newest = checkpoint.latest(p / "ckpt")
    if newest is not None:
        return "checkpoint", newest
    weights = hf_folders.weight_files(p)
    if weights:
        raise TeacherPathError(f"{path} has weights ({weights[0]}) but no {models.CONFIG_FILE}")
    raise TeacherPathError(
        f"{path} is not a Stillroom export, run folder or checkpoint, nor a Hugging Face causal-LM folder or GGUF file"
    )


def spec(path: str | Path) -> dict:
    """The teacher's architecture ({"arch", "config"}) without loading its weights."""
    kind, folder = resolve(path)
    read = {
        "export": models.read_export_config,
        "checkpoint": checkpoint.read_model_spec,
        "hf": causal_lm.spec,
        "gguf": lambda file: causal_lm.config_spec(gguf.read_config(file), "gguf"),
    }[kind]
    try:
        return read(folder)
    except (ValueError, OSError, checkpoint.CheckpointError) as e:
        raise TeacherPathError(str(e)) from e


def checkpoint_model(folder: Path) -> nn.Module:
    """The student of checkpoint ``folder`` (verified first: CorruptCheckpoint names a damaged file)."""
    model = models.build_from_spec(checkpoint.read_model_spec(folder))
    checkpoint.load_model_weights(folder, model)
    return model


def verify(path: str | Path) -> None:
    """TeacherPathError naming the first damaged file of a teacher, checked against its manifest (a Hugging Face
    folder that Stillroom did not write has none); a Hugging Face folder's weights whole and every one its config
    has stored (``weights.check``); a GGUF file's header and tensor table must describe the whole file."""
    kind, folder = resolve(path)
    try:
        if kind in ("export", "hf"):  # a Hugging Face folder Stillroom exported has a manifest; others have none
            export.verify(folder)
        if kind == "hf":  # whole files, every weight of its config stored (not left to random initialisation)
            weights.check(folder, hf_folders.read_config(folder))
        elif kind == "checkpoint":
            checkpoint.verify(folder)
        elif kind == "gguf":
            gguf.check_file(folder)
    except (export.ExportError, checkpoint.CheckpointError, ValueError) as e:
        raise TeacherPathError(str(e)) from None


def fingerprint(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of the teacher's files: every file under the resolved folder, names and bytes; a
    GGUF file's bytes."""
    kind, folder = resolve(path)
    digest = hashlib.sha256()
    files = [folder] if kind == "gguf" else sorted(f for f in folder.rglob("*") if f.is_file())
    for file in files:
        if kind != "gguf":
            digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class VocabSlice(nn.Module):
    """A teacher whose logits keep only the first ``vocab_size`` entries: a padded vocabulary cut to the real one
    (``vocab_alignment``). Hidden states, width and layers are the teacher's own."""

    def __init__(self, teacher: nn.Module, vocab_size: int):
        super().__init__()
        self.teacher, self.vocab_size = teacher, vocab_size

    def forward(self, idx: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        out = self.teacher(idx, hidden_layers=hidden_layers)
        if hidden_layers:
            logits, hidden = out
            return logits[..., : self.vocab_size], hidden
        return out[..., : self.vocab_size]


class VocabSliceFamily(ModelFamily[VocabSlice]):
    """A vocabulary-sliced teacher: the wrapped teacher's layers and width, the student's vocabulary."""

    name, model_class = "vocab_slice", VocabSlice

    def layers(self, model: VocabSlice) -> dict[str, nn.Module]:
        return family_of(model.teacher).layers(model.teacher)

    def width(self, model: VocabSlice) -> int:
        return family_of(model.teacher).width(model.teacher)

    def vocab_size(self, model: VocabSlice) -> int:
        return model.vocab_size


register(VocabSliceFamily())


def load(
    path: str | Path,
    device: torch.device = torch.device("cpu"),
    vocab_size: int | None = None,
    dtype: str = "fp32",
) -> nn.Module:
    """The teacher in eval mode with gradients off (frozen); with ``vocab_size`` smaller than the teacher's
    vocabulary, its logits cut to that many entries. A GGUF teacher is dequantized to ``dtype`` (fp32 | bf16); the
    others load in the dtype they were saved in."""
    kind, folder = resolve(path)
    if kind in ("hf", "gguf"):
        model: nn.Module
        try:
            model = causal_lm.load(folder) if kind == "hf" else causal_lm.HFCausalLM(gguf.load(folder, dtype))
        except ValueError as e:
            raise TeacherPathError(str(e)) from None
    else:
        try:
            model = export.load(folder) if kind == "export" else checkpoint_model(folder)
        except (export.ExportError, checkpoint.CheckpointError) as e:
            raise TeacherPathError(str(e)) from None
    return freeze(slice_vocabulary(model, path, vocab_size), device)


def slice_vocabulary(model: nn.Module, path: str | Path, vocab_size: int | None) -> nn.Module:
    """``model`` (the teacher at ``path``) with its logits cut to ``vocab_size`` when that is smaller than its
    vocabulary; else ``model`` itself."""
    teacher_vocab = spec(path)["config"].get("vocab_size") if vocab_size is not None else None
    if teacher_vocab is None or vocab_size is None or vocab_size >= teacher_vocab:
        return model
    return VocabSlice(model, vocab_size)


def freeze(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``, in eval mode, without gradients."""
    model.requires_grad_(False)
    return model.to(device).eval()


def vocab_alignment(checkpoint: str, data_cfg: DataConfig, student_folder: Path | None) -> vocab.Alignment | None:
    """How the teacher at ``checkpoint`` and the student's vocabularies align (None for classifiers): the student's is
    the data's, its padding that of the Hugging Face student in ``student_folder``. A Hugging Face teacher's padding
    is aligned away (``trainer.distill.vocab``); a Stillroom model has no padding, so its vocabulary must be the
    student's. VocabError (one line) where they do not align."""
    from trainer import data

    kind, folder = resolve(checkpoint)
    teacher = spec(checkpoint)["config"].get("vocab_size")
    if teacher is None:
        return None
    student = data.vocab_size(data_cfg)
    if kind != "hf":
        if teacher != student:
            raise vocab.VocabError(f"teacher vocabulary {teacher} differs from the student's {student}")
        return vocab.Alignment(teacher, student, student, "the data's")
    return vocab.align(teacher, student, folder, student_folder)


def run_vocab_size(checkpoint: str, data_cfg: DataConfig, student_folder: Path | None) -> int | None:
    """The vocabulary the teacher's logits are cut to (None: its own; ``vocab_alignment``); prints the alignment's
    info line on rank 0 where the vocabularies were aligned (once: a run loads its teacher once)."""
    alignment = vocab_alignment(checkpoint, data_cfg, student_folder)
    info = alignment.info() if alignment is not None else None
    if info is not None and os.environ.get("RANK", "0") == "0":
        print(info, file=sys.stderr)
    return alignment.real if alignment is not None else None


def is_dense_export(path: str | Path) -> bool:
    """Whether the teacher at ``path`` is a dense (fp32 safetensors) Stillroom export, of any family."""
    kind, folder = resolve(path)
    return kind == "export" and models.read_export_config(folder).get("format") == models.DENSE_FORMAT
