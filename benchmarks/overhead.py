"""Trainer overhead: median step time of ``python -m trainer`` (KD, one process, logging on) over a bare
PyTorch loop doing the same work (same models, batches, losses, optimizer, LR schedule, clipping).

Both are timed as the mean over windows of ``--window`` steps (the trainer's metrics.jsonl reports
``perf/step_ms`` per log interval), after ``--warmup`` steps, alternating trainer and bare rounds so
machine noise hits both. Prints a table and writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import compose_config, print_table, random_teacher, timing_parser, trainer_windows, write_json
from trainer import data, export
from trainer.build import build_student, param_groups
from trainer.distill.losses import kd_loss
from trainer.lr_schedule import lr_at


def bare_windows(overrides: list[str], teacher_dir: Path, steps: int, window: int, warmup: int) -> list[float]:
    cfg, _ = compose_config(overrides)
    t, d = cfg.train, cfg.distill
    torch.manual_seed(t.seed)
    dataset = data.build(cfg.data, cfg.sequence_length)
    student = build_student(cfg, dataset)
    teacher = export.load(teacher_dir).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(student, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    shard = data.Shard()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=steps)
        x, y = dataset.train_batch(t.seed, step, t.batch_size, shard)
        with torch.no_grad():
            t_logits = teacher(x)
        logits = student(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        kd = kd_loss(logits, t_logits, kind=d.loss, temperature=d.temperature, labels=y)
        loss = (1 - d.alpha) * ce + d.alpha * kd
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    ms = [1000 * s for s in times]
    return [statistics.fmean(ms[i : i + window]) for i in range(warmup, steps - window + 1, window)]


def main() -> None:
    parser = timing_parser(__doc__)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teacher_dir = random_teacher(tmp / "teacher")
        overrides = [
            "distill=kd",
            "teacher=path",
            f"teacher.checkpoint={teacher_dir}",
            "logger=wandb",
            "logger.wandb.mode=offline",
        ]
        trainer_ms, bare_ms = [], []
        for r in range(args.rounds):
            trainer_ms += trainer_windows(overrides, tmp / f"run{r}", args.steps, args.window, args.warmup)
            bare_ms += bare_windows(overrides, teacher_dir, args.steps, args.window, args.warmup)
    trainer_median, bare_median = statistics.median(trainer_ms), statistics.median(bare_ms)
    ratio = trainer_median / bare_median
    rows: list[list[Any]] = [
        ["bare PyTorch loop", f"{bare_median:.2f}", len(bare_ms)],
        ["stillroom trainer", f"{trainer_median:.2f}", len(trainer_ms)],
        ["ratio (trainer / bare)", f"{ratio:.3f}", ""],
    ]
    print_table(["loop", f"median step ms ({args.window}-step windows)", "windows"], rows)
    path = write_json(
        "overhead",
        {
            "bare_ms": bare_median,
            "trainer_ms": trainer_median,
            "ratio": ratio,
            "target_ratio": 1.05,
            "steps": args.steps,
            "window": args.window,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "setup": "KD forward_kl T=2, student tiny (2/2/64), teacher 4/4/128, batch 12x64, "
            "AdamW, clip 1.0, progress bar + metrics.jsonl + W&B offline",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
