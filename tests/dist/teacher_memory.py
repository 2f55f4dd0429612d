"""Run by torchrun (gloo): build the teacher at ARGV[1] (a Hugging Face folder or a GGUF file) with
``teacher.placement=ARGV[2]`` on every rank and write ``ARGV[3]/rank<r>.json`` (how much this process's peak resident
set, ``ru_maxrss``, grew while the teacher was built and every byte of its parameters on this rank read, and after
one forward) and ``ARGV[3]/rank<r>.pt`` (the teacher's logits of a fixed batch).

What the build imports or sets up once (transformers and the model's code, accelerate, FSDP2; the model built on
the meta device, which holds no parameter bytes) is done before the first reading, so the growth is the teacher's
own: its parameters, whatever is read to fill them, its Python objects, its process group."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  (imported before the first reading)
from torch.distributed.tensor import DTensor

from parallel.mesh import ParallelDims
from trainer.build import teacher_vocab
from trainer.config import RunConfig
from trainer.distill import teacher as teacher_io
from trainer.distill.placement import build_teacher
from trainer.models.hf import causal_lm


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(folder: str, placement: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(folder)  # the model on the meta device: imports its code, a one-time cost, before the reading
    causal_lm.empty_gguf(path) if path.suffix == ".gguf" else causal_lm.empty(path)
    cfg = RunConfig()
    cfg.teacher.checkpoint, cfg.teacher.placement = folder, placement
    cfg.data.name, cfg.data.synthetic_vocab = "synthetic", teacher_io.spec(folder)["config"]["vocab_size"]
    dims = ParallelDims(dp_replicate=1, dp_shard=world, world_size=world)
    real_vocab = teacher_vocab(cfg)  # as the build asks it, before the teacher is loaded
    dist.barrier()
    before = peak_bytes()
    teacher = build_teacher(
        cfg.teacher,
        cfg.distill,
        dims,
        torch.device("cpu"),
        shard=None,
        vocab=0,
        real_vocab=real_vocab,  # type: ignore[arg-type]
        next_input=lambda _: None,
    )
    assert teacher.module is not None
    for param in teacher.module.parameters():  # every byte this rank holds, resident (a mapped file's pages too)
        (param.to_local() if isinstance(param, DTensor) else param).sum()
    held = peak_bytes() - before
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = teacher(x, 0, 0).logits
    forward = peak_bytes() - before
    assert logits is not None
    torch.save(logits, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"held": held, "forward": forward}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
