"""Training-state memory per rank: parameters, gradients, AdamW state and pruning masks of the student,
under DDP and FSDP2 at N = 2 and 4 ranks (gloo, CPU), against one process.

Each configuration is the real trainer launched with torchrun: it builds the run (nanoGPT's CPU student,
magnitude pruning, int8 QAT), takes one optimizer step (so AdamW's moments exist), then one more
forward/backward (so gradients exist), and counts the bytes of the tensors each rank holds (a DTensor's
local shard). Prints a table and writes benchmarks/results/memory.json.

    python -m benchmarks.memory [--nprocs 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from benchmarks.common import compose_config, print_table, write_json
from parallel import env as dist_env
from trainer.metrics import state_bytes

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "memory-result: "
OVERRIDES = [
    "data=shakespeare",
    "student=nano_cpu",
    "compress=prune_qat",
    "compress.modifiers.0.start_step=0",
    "logger=console",
    "logger.progress=false",
    "train.batch_size=8",
    "train.max_steps=2",
]
STRATEGIES = {"single": ["parallel=single"], "ddp": ["parallel=ddp"], "fsdp": ["parallel=fsdp"]}
PARTS = ("params", "grads", "optimizer", "masks")


def measure(overrides: list[str]) -> dict[str, int]:
    """This rank's training-state bytes for the run ``overrides`` describe (call under torchrun or alone)."""
    from trainer.process import trainer_for
    from trainer.runtime import DataParallelRuntime

    cfg, resolved = compose_config(overrides)
    env = dist_env.init(cfg.parallel.backend)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(cfg, Path(tmp), env, resolved)
        trainer.train_step(0)
        runtime = trainer.runtime
        assert isinstance(runtime, DataParallelRuntime)  # STRATEGIES has no pipeline
        assert runtime.compressor is not None  # OVERRIDES compress the student
        x, y = trainer.parts.batches.train(1)
        runtime.losses(x, y, 1, 0)["train/loss"].backward()
        row = state_bytes(list(runtime.trainable.parameters()), trainer.optimizer, runtime.compressor.masks.values())
        trainer.close()
    return row


def worker(overrides: list[str]) -> None:
    """Measure on every rank; rank 0 prints the per-rank rows as one JSON line."""
    row = measure(overrides)
    rows: list[dict[str, int] | None] = [row]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(RESULT_PREFIX + json.dumps(rows), flush=True)
    dist_env.shutdown()


def launch(strategy: str, nproc: int) -> list[dict[str, int]]:
    """Run the worker for ``strategy`` on ``nproc`` ranks; its per-rank rows."""
    args = ["-m", "benchmarks.memory", "--worker", *OVERRIDES, *STRATEGIES[strategy]]
    if strategy != "single":
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} x{nproc} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        worker(overrides)
        return
    configs = [("single", 1)] + [(s, n) for n in args.nprocs for s in ("ddp", "fsdp")]
    results = []
    for strategy, nproc in configs:
        rows = launch(strategy, nproc)
        worst = {part: max(r[part] for r in rows) for part in PARTS}
        results.append(
            {
                "strategy": strategy,
                "nproc": nproc,
                "per_rank_max": worst,
                "per_rank": rows,
                "total_per_rank": sum(worst.values()),
            }
        )
    single = results[0]["total_per_rank"]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    table = [
        [
            r["strategy"],
            r["nproc"],
            *(mib(r["per_rank_max"][p]) for p in PARTS),
            mib(r["total_per_rank"]),
            f"{r['total_per_rank'] / single:.2f}",
        ]
        for r in results
    ]
    print_table(["strategy", "ranks", *(f"{p} MiB" for p in PARTS), "total MiB/rank", "vs 1 process"], table)
    path = write_json(
        "memory",
        {
            "results": results,
            "overrides": OVERRIDES,
            "setup": "largest rank's bytes of the student's parameters, gradients (after "
            "backward), AdamW state (after one step) and pruning masks; gloo, CPU",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
