"""Launch detection: torchrun's environment, SLURM's (``srun`` one task per rank), or a single process.
Picks backend and device."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Under srun the port is derived from the job id, so two jobs sharing a node do not collide.
SLURM_PORT_BASE = 29500
SLURM_PORT_SPAN = 10000
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | single
    backend: str | None
    device: torch.device
    master_addr: str | None = None  # slurm: where rank 0's store listens (torchrun passes its own)
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``n[1-2],m3`` -> ``n1``, ``gpu[07-09]-r[2,4]`` -> ``gpu07-r2``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end].strip())


def slurm_rendezvous(environ: Mapping[str, str]) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of an srun job: the ones set by the user, else the first node of the step
    and SLURM_PORT_BASE + job id mod SLURM_PORT_SPAN."""
    nodelist = next((environ[k] for k in NODELIST_VARS if environ.get(k)), "localhost")
    addr = environ.get("MASTER_ADDR") or first_host(nodelist)
    port = environ.get("MASTER_PORT") or SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN
    return addr, int(port)


def launched_by(environ: Mapping[str, str]) -> str:
    """``torchrun`` (its variables win), ``slurm`` (an srun step of more than one task), or ``single``.

    The batch script itself, and a one-task step (a Hydra/submitit job), are single processes."""
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ):
        return "torchrun"
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "single"


def detect(backend: str = "auto", environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (``environ``, default os.environ) without starting anything."""
    environ = os.environ if environ is None else environ
    launcher = launched_by(environ)
    addr = port = None
    if launcher == "torchrun":
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    elif launcher == "slurm":
        rank, world, local = (int(environ[k]) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        addr, port = slurm_rendezvous(environ)
    else:
        rank, world, local = 0, 1, 0
    cuda = torch.cuda.is_available()
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    device = torch.device("cuda", local) if chosen == "nccl" else torch.device("cpu")
    return DistEnv(rank, world, local, launcher, chosen if launcher != "single" else None, device, addr, port)


def init(backend: str = "auto") -> DistEnv:
    """Start the process group under torchrun or srun; a single process needs none."""
    env = detect(backend)
    if env.backend and not dist.is_initialized():
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        if env.launcher == "slurm":
            dist.init_process_group(
                backend=env.backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
            )
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(
                backend=env.backend, store=restart_store(env.world_size), rank=env.rank, world_size=env.world_size
            )
        else:
            dist.init_process_group(backend=env.backend)
    return env


def restart_store(world_size: int) -> dist.Store:
    """torchrun's shared rendezvous store under a prefix of this restart, so that workers restarted by
    ``--max-restarts`` never read the addresses the dead workers left there (pytorch issue 135712)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"stillroom/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def wait_for_all() -> None:
    """Every rank reaches this before any goes on (at the end of a run: a gloo rank that destroys its group
    and exits while another still works was seen to abort, "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
