"""The GPU tier's one condition: ``requires_cuda(n)`` skips a test, with its reason printed, where fewer than ``n``
CUDA devices are visible (``python -m pytest -q -m gpu tests/gpu -rs`` shows each reason)."""

from __future__ import annotations

import pytest
import torch


def requires_cuda(n: int = 1) -> pytest.MarkDecorator:
    """Skip unless ``n`` CUDA devices are visible: "needs 2 CUDA devices, found 0". Counting devices does not
    start CUDA in the test process (the runs are subprocesses, which start their own)."""
    found = torch.cuda.device_count()
    return pytest.mark.skipif(found < n, reason=f"needs {n} CUDA device{'s' if n != 1 else ''}, found {found}")


# A run's ``memory/rank0/peak_bytes`` is torch.cuda.max_memory_allocated when it trains on CUDA: the tier's small
# models (under 4 MiB of weights) and cuBLAS's workspaces (drawn from the same allocator: up to 32 MiB a stream on
# Hopper), well under 256 MiB. On CPU it is the process's peak resident set, which importing the trainer alone puts
# above 300 MiB (the tier's runs measured 350 to 490 MiB on CPU).
CUDA_PEAK_AT_MOST = 256 * 2**20


def trained_on_cuda(row: dict) -> bool:
    """Whether a metrics row of a single-process run says it trained on CUDA (its device is no setting: the trainer
    takes ``cuda:0`` whenever CUDA is available, ``parallel.env.detect``)."""
    return 0 < row["memory/rank0/peak_bytes"] <= CUDA_PEAK_AT_MOST
