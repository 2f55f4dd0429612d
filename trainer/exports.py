"""Any export folder Stillroom writes, loaded back: dense (``trainer.models``), a Hugging Face folder (a Hugging Face
student's, ``trainer.models.hf``) or compressed (``trainer.compress.export``: int8/int4 codes, sparse bitmasks,
thinned units)."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from trainer import models
from trainer.models import hf


def load(path: str | Path) -> nn.Module:
    """The model in the export folder ``path``, in eval mode on CPU."""
    if hf.names_hf_model(Path(path)):
        return hf.load_pretrained(path)
    if models.read_export_config(path)["format"] == models.DENSE_FORMAT:
        return models.load_dense(path)
    from trainer.compress.export import load_compressed  # torchao: imported only for a compressed export

    return load_compressed(path)
