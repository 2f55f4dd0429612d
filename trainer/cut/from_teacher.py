"""``student=from_teacher``: the student cut out of the run's teacher by ``trainer.cut``. The teacher is read as
a model of its own family (a Hugging Face folder as a Hugging Face student, a Stillroom export or checkpoint as what
it holds), and calibrated on ``student.calib_batches`` batches of the training data drawn with ``student.calib_seed``
(not ``train.seed``: runs that differ only in their seed train the same student)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer import checkpoint, cut, data, models
from trainer.config import ConfigError, RunConfig
from trainer.distill import teacher as teacher_io
from trainer.models import hf
from trainer.models.hf import gguf
from trainer.models.protocol import ConfigFieldError, ModelFamily, family_of

if TYPE_CHECKING:
    from trainer.data import DigitsData, TokenData

ARCH = "from_teacher"


def config(cfg: RunConfig) -> cut.CutConfig:
    """The checked ``student`` node (ConfigFieldError naming its key)."""
    return models.typed_config(cut.CutConfig, cfg.student, data.model_fields(cfg.data))


def source(cfg: RunConfig) -> nn.Module:
    """The teacher as a model of its family (a GGUF file's: a Hugging Face one), on the default device (on the meta
    device: its architecture only).
    ConfigError naming the key when there is none, or it cannot be cut."""
    if cfg.teacher.checkpoint is None:
        raise ConfigFieldError(
            "arch", "from_teacher cuts the student out of the teacher: name one (teacher=hf or teacher=path, "
            "teacher.checkpoint=PATH)"
        )  # fmt: skip
    try:
        kind, folder = teacher_io.resolve(cfg.teacher.checkpoint)
        if kind == "hf":
            return hf.load_pretrained(folder)
        if kind == "gguf":
            meta = torch.get_default_device().type == "meta"
            return hf.from_transformers(gguf.empty(folder) if meta else gguf.load(folder), None)
        if torch.get_default_device().type == "meta":
            return models.build_from_spec(teacher_io.spec(folder))
        return teacher_io.load(folder)
    except (teacher_io.TeacherPathError, ValueError, checkpoint.CheckpointError) as e:
        raise ConfigError("teacher.checkpoint", f"student=from_teacher cannot read it: {e}") from None


def spec(cfg: RunConfig) -> tuple[ModelFamily, Any]:
    """The cut student's family and config, from the teacher's architecture alone (on the meta device: the sizes do
    not depend on which units are kept). Raises ConfigFieldError or ConfigError."""
    wanted = config(cfg)
    with torch.device("meta"):
        student = cut.cut(check_source(cfg, wanted, source(cfg)), wanted, [])
    family = family_of(student)
    return family, family.config(student)


def check_source(cfg: RunConfig, wanted: cut.CutConfig, model: nn.Module) -> nn.Module:
    """``model`` (the teacher) if the student can be cut from it for this run's data and sequence length."""
    family = family_of(model)
    if not family.structured_units:
        raise ConfigFieldError("arch", f"from_teacher cuts decoder layers and units: {family.name} models have none")
    vocab = family.vocab_size(model)
    if wanted.vocab_size is not None and vocab != wanted.vocab_size:
        raise ConfigError(
            "teacher.checkpoint",
            f"teacher vocabulary {vocab} differs from the data's {wanted.vocab_size} (data={cfg.data.name}): "
            "a student cut from it reads the teacher's token ids",
        )
    context = teacher_io.spec(cfg.teacher.checkpoint or "")["config"].get("block_size")
    if context is not None and wanted.block_size > context:
        raise ConfigFieldError("block_size", f"{wanted.block_size} is longer than the teacher's {context} positions")
    return model


def calibration_batches(cfg: RunConfig, dataset: TokenData | DigitsData, wanted: cut.CutConfig) -> list[torch.Tensor]:
    """The inputs of ``wanted.calib_batches`` global training batches, the first a run seeded ``wanted.calib_seed``
    would draw."""
    size = cfg.train.batch_size
    return [dataset.train_batch(wanted.calib_seed, step, size, data.Shard())[0] for step in range(wanted.calib_batches)]


def build(cfg: RunConfig, dataset: TokenData | DigitsData) -> nn.Module:
    """The student cut out of the teacher, with the teacher's weights (every rank cuts the same one)."""
    wanted = config(cfg)
    teacher = check_source(cfg, wanted, source(cfg))
    batches = calibration_batches(cfg, dataset, wanted) if wanted.calibrates else []
    return cut.cut(teacher, wanted, batches)


def is_cut(cfg: RunConfig) -> bool:
    """Whether the run's student is cut out of its teacher."""
    return cfg.student.get("arch") == ARCH
