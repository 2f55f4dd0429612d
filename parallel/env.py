"""Launch detection: torchrun's environment, or a single process. Picks backend and device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | single
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(backend: str = "auto") -> DistEnv:
    """Read the launcher's variables without starting anything."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        launcher = "torchrun"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
    cuda = torch.cuda.is_available()
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    device = torch.device("cuda", local) if chosen == "nccl" else torch.device("cpu")
    return DistEnv(rank, world, local, launcher, chosen if launcher != "single" else None, device)


def init(backend: str = "auto") -> DistEnv:
    """Start the process group when launched by torchrun; a single process needs none."""
    env = detect(backend)
    if env.backend and not dist.is_initialized():
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        dist.init_process_group(backend=env.backend)
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
