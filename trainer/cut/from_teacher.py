"""``student=from_teacher``: the student cut out of the run's teacher by ``trainer.cut``. The teacher is read as
a model of its own family (a Hugging Face folder as a Hugging Face student, a Stillroom export or checkpoint as what
it holds), and calibrated on ``student.calib_batches`` batches of the training data drawn with ``student.calib_seed``
(not ``train.seed``: runs that differ only in their seed train the same student)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer import checkpoint, cut, data, models
from trainer.config import ConfigError
from trainer.distill import teacher as teacher_io
from trainer.models import hf
from trainer.models.hf import gguf
from trainer.models.protocol import ConfigFieldError, ModelFamily, family_of

if TYPE_CHECKING:
    from trainer.config import DataConfig
    from trainer.data import DigitsData, TokenData

ARCH = "from_teacher"


def config(student: dict, data_cfg: DataConfig) -> cut.CutConfig:
    """The checked ``student`` node, its vocabulary the data's (ConfigFieldError naming its key)."""
    return models.typed_config(cut.CutConfig, student, data.model_fields(data_cfg))


def source(teacher_path: str | None) -> nn.Module:
    """The teacher at ``teacher_path`` as a model of its family (a GGUF file's: a Hugging Face one), on the default
    device (on the meta device: its architecture only).
    ConfigError naming the key when there is none, or it cannot be cut."""
    if teacher_path is None:
        raise ConfigFieldError(
            "arch", "from_teacher cuts the student out of the teacher: name one (teacher=hf or teacher=path, "
            "teacher.checkpoint=PATH)"
        )  # fmt: skip
    try:
        kind, folder = teacher_io.resolve(teacher_path)
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


def spec(student: dict, teacher_path: str | None, data_cfg: DataConfig) -> tuple[ModelFamily, Any]:
    """The family and config of the ``student`` node's cut of the teacher at ``teacher_path``, from the teacher's
    architecture alone (on the meta device: the sizes do not depend on which units are kept). Raises
    ConfigFieldError or ConfigError."""
    wanted = config(student, data_cfg)
    with torch.device("meta"):
        model = cut.cut(check_source(wanted, source(teacher_path), teacher_path, data_cfg.name), wanted, [])
    family = family_of(model)
    return family, family.config(model)


def check_source(wanted: cut.CutConfig, model: nn.Module, teacher_path: str | None, data_name: str) -> nn.Module:
    """``model`` (the teacher at ``teacher_path``) if the student ``wanted`` can be cut from it for data set
    ``data_name`` and the student's sequence length."""
    family = family_of(model)
    if not family.structured_units:
        raise ConfigFieldError("arch", f"from_teacher cuts decoder layers and units: {family.lacks('units to cut')}")
    vocab = family.vocab_size(model)
    if wanted.vocab_size is not None and vocab != wanted.vocab_size:
        raise ConfigError(
            "teacher.checkpoint",
            f"teacher vocabulary {vocab} differs from the data's {wanted.vocab_size} (data={data_name}): "
            "a student cut from it reads the teacher's token ids",
        )
    context = teacher_io.spec(teacher_path or "")["config"].get("block_size")
    if context is not None and wanted.block_size > context:
        raise ConfigFieldError("block_size", f"{wanted.block_size} is longer than the teacher's {context} positions")
    return model


def calibration_batches(wanted: cut.CutConfig, dataset: TokenData | DigitsData, batch_size: int) -> list[torch.Tensor]:
    """The inputs of ``wanted.calib_batches`` global training batches of ``batch_size`` rows, the first a run seeded
    ``wanted.calib_seed`` would draw."""
    steps = range(wanted.calib_batches)
    return [dataset.train_batch(wanted.calib_seed, step, batch_size, data.Shard())[0] for step in steps]


def build(
    student: dict, teacher_path: str | None, data_cfg: DataConfig, dataset: TokenData | DigitsData, batch_size: int
) -> nn.Module:
    """The ``student`` node's cut of the teacher at ``teacher_path``, with the teacher's weights, calibrated on batches
    of ``batch_size`` rows of ``dataset`` (every rank cuts the same one)."""
    wanted = config(student, data_cfg)
    teacher = check_source(wanted, source(teacher_path), teacher_path, data_cfg.name)
    batches = calibration_batches(wanted, dataset, batch_size) if wanted.calibrates else []
    return cut.cut(teacher, wanted, batches)


def is_cut(student: dict) -> bool:
    """Whether the ``student`` node asks for a student cut out of the teacher."""
    return student.get("arch") == ARCH
