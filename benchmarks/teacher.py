"""Teacher placements compared on this machine (gloo, CPU), each figure from real trainer runs' metrics.jsonl.

1. Memory: the teacher parameter bytes rank 0 holds under ``shard`` against ``replicate``, N = 2 and 4 ranks
   (target: at most 1/N + 5%).
2. Speed: a student step with ``cache`` (top-k logits written once by ``python -m trainer.cache``) against a
   live replicated teacher of at least 8x the student's forward FLOPs (target: at least 2x faster).
3. ``remote`` (2 student ranks + 1 teacher rank) against ``replicate`` on 3 ranks: the same total number of
   processes, the same global batch; reported, no target.

The teacher is a random export (its weights do not matter for bytes or speed). Prints a table and writes
benchmarks/results/teacher.json.

    python -m benchmarks.teacher [--steps 60] [--warmup 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, write_json
from benchmarks.readme_section import command_line
from trainer import models

REPO = Path(__file__).resolve().parent.parent
STUDENT = {"n_layer": 2, "n_head": 2, "n_embd": 64}  # student=tiny
TEACHER = {"n_layer": 4, "n_head": 4, "n_embd": 256}
BLOCK, VOCAB, TOP_K = 64, 65, 16
RUN = [
    "data=shakespeare",
    "student=tiny",
    "distill=kd",
    "teacher=path",
    "logger=console",
    "logger.progress=false",
    "train.batch_size=12",
    "train.warmup_steps=5",
]


def forward_flops_per_token(n_layer: int, n_embd: int, vocab: int = VOCAB, block: int = BLOCK, **_) -> int:
    """Multiply-adds x 2 of a GPT forward per token: the block matmuls (12 d^2 per layer), the head (d V), and
    attention's scores and weighted sum over the context (2 T d per layer)."""
    return 2 * (12 * n_layer * n_embd**2 + n_embd * vocab + 2 * n_layer * block * n_embd)


def run(root: Path, name: str, overrides: list[str], nproc: int = 1, module: str = "trainer") -> list[dict]:
    """``python -m module`` (under torchrun when ``nproc`` > 1) into ``root/name``; the run's metrics rows."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", module, *RUN, *overrides, f"hydra.run.dir={name}"]
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    metrics = root / name / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def median_after(rows: list[dict], key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in rows if key in r and r["step"] > warmup)


def memory(root: Path, teacher: Path, nprocs: list[int]) -> list[dict]:
    out = []
    for n in nprocs:
        common = [f"teacher.checkpoint={teacher}", "parallel=ddp", "train.max_steps=2", "logger.log_every=1"]
        held = {
            placement: run(root, f"memory_{placement}_{n}", [*common, f"teacher.placement={placement}"], nproc=n)[-1][
                "distill/teacher_param_bytes"
            ]
            for placement in ("replicate", "shard")
        }
        out.append(
            {
                "ranks": n,
                "replicate_bytes": held["replicate"],
                "shard_bytes": held["shard"],
                "ratio": held["shard"] / held["replicate"],
                "target": 1 / n + 0.05,
            }
        )
    return out


def speed(root: Path, teacher: Path, steps: int, warmup: int) -> dict:
    common = [
        f"teacher.checkpoint={teacher}",
        f"train.max_steps={steps}",
        "logger.log_every=1",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        f"distill.top_k={TOP_K}",
    ]
    live = run(root, "speed_live", common)
    run(root, "speed_cache_build", [*common, "teacher.cache_dir=cache"], module="trainer.cache")
    cached = run(root, "speed_cache", [*common, "teacher.placement=cache", f"teacher.cache_dir={root / 'cache'}"])
    live_ms, cache_ms = median_after(live, "perf/step_ms", warmup), median_after(cached, "perf/step_ms", warmup)
    return {
        "live_step_ms": live_ms,
        "cache_step_ms": cache_ms,
        "speedup": live_ms / cache_ms,
        "target": 2.0,
        "live_teacher_ms": median_after(live, "distill/teacher_ms", warmup),
        "cache_teacher_ms": median_after(cached, "distill/teacher_ms", warmup),
    }


def remote_vs_replicate(root: Path, teacher: Path, steps: int, warmup: int) -> dict:
    common = [
        f"teacher.checkpoint={teacher}",
        "parallel=ddp",
        f"train.max_steps={steps}",
        "logger.log_every=1",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
    ]
    replicate = run(root, "replicate_3", common, nproc=3)
    remote = run(root, "remote_2_1", [*common, "teacher.placement=remote", "parallel.teacher_ranks=1"], nproc=3)
    return {
        "processes": 3,
        "replicate_step_ms": median_after(replicate, "perf/step_ms", warmup),
        "remote_step_ms": median_after(remote, "perf/step_ms", warmup),
        "replicate_teacher_ms": median_after(replicate, "distill/teacher_ms", warmup),
        "remote_teacher_ms": median_after(remote, "distill/teacher_ms", warmup),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    flops = {"student": forward_flops_per_token(**STUDENT), "teacher": forward_flops_per_token(**TEACHER)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher = models.save_dense(
            models.build("gpt", vocab_size=VOCAB, block_size=BLOCK, **TEACHER), root / "teacher"
        )
        result: dict[str, Any] = {
            "teacher": TEACHER,
            "student": STUDENT,
            "forward_flops_per_token": flops,
            "flops_ratio": flops["teacher"] / flops["student"],
            "memory": memory(root, teacher, args.nprocs),
            "speed": speed(root, teacher, args.steps, args.warmup),
            "remote": remote_vs_replicate(root, teacher, args.steps, args.warmup),
            "command": command_line("benchmarks.teacher", sys.argv[1:]),
            "cpus": os.cpu_count(),
        }
    print(f"teacher {TEACHER} vs student {STUDENT}: {result['flops_ratio']:.1f}x the forward FLOPs per token\n")
    print_table(
        ["ranks", "replicate bytes", "shard bytes", "shard / replicate", "target <="],
        [
            [
                m["ranks"],
                f"{m['replicate_bytes']:.0f}",
                f"{m['shard_bytes']:.0f}",
                f"{m['ratio']:.3f}",
                f"{m['target']:.3f}",
            ]
            for m in result["memory"]
        ],
    )
    s, r = result["speed"], result["remote"]
    print()
    print_table(
        ["placement", "step ms", "teacher ms / step"],
        [
            ["replicate (1 process)", f"{s['live_step_ms']:.1f}", f"{s['live_teacher_ms']:.1f}"],
            [f"cache (top-{TOP_K})", f"{s['cache_step_ms']:.1f}", f"{s['cache_teacher_ms']:.1f}"],
            ["replicate (3 ranks, ddp)", f"{r['replicate_step_ms']:.1f}", f"{r['replicate_teacher_ms']:.1f}"],
            ["remote (2 student + 1 teacher)", f"{r['remote_step_ms']:.1f}", f"{r['remote_teacher_ms']:.1f}"],
        ],
    )
    print(f"\ncache speedup over the live teacher: {s['speedup']:.2f}x (target >= {s['target']:.0f}x)")
    print(f"wrote {write_json('teacher', result)}")


if __name__ == "__main__":
    main()
