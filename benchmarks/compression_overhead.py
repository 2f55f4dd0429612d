"""Compression overhead: median step time of a KD run with pruning masks and int8 fake-quant active
over the same run without compression (compress=none). Target ratio <= 1.25.

Both use the real trainer (nanoGPT-CPU-sized teacher, batch 12x64), for each student in
``--students`` (default: the quickstart's ``tiny``, 2/2/64, and ``nano_cpu``, 4/4/128). The compressed
run prunes from step 0 (AGP to 50% by step 20, masks then held and re-applied every step) and
fake-quantizes from step 0, so every timed step pays for masks and fake-quant. Windows of
``--window`` steps after ``--warmup``; rounds alternate. Writes benchmarks/results/compression_overhead.json.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import print_table, random_teacher, timing_parser, trainer_windows, write_json

COMPRESSED = [
    "compress=prune_qat",
    "compress.modifiers.0.start_step=0",
    "compress.modifiers.0.end_step=20",
    "compress.modifiers.0.every=10",
    "compress.modifiers.1.start_step=0",
]


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--students", default="tiny,nano_cpu")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teacher = random_teacher(tmp / "teacher")
        for student in args.students.split(","):
            base = [
                f"student={student}",
                "distill=kd",
                "teacher=path",
                f"teacher.checkpoint={teacher}",
                "logger=console",
                "logger.progress=false",
            ]
            plain_ms, compressed_ms = [], []
            for r in range(args.rounds):
                plain_ms += trainer_windows(base, tmp / f"{student}-plain{r}", args.steps, args.window, args.warmup)
                compressed_ms += trainer_windows(
                    [*base, *COMPRESSED], tmp / f"{student}-compressed{r}", args.steps, args.window, args.warmup
                )
            plain, compressed = statistics.median(plain_ms), statistics.median(compressed_ms)
            results[student] = {
                "plain_ms": plain,
                "compressed_ms": compressed,
                "ratio": compressed / plain,
                "windows": len(plain_ms),
            }
            rows.append([student, f"{plain:.2f}", f"{compressed:.2f}", f"{compressed / plain:.3f}"])
    print_table(["student", "compress=none ms", "prune_qat ms (masks + int8 fake-quant)", "ratio"], rows)
    path = write_json(
        "compression_overhead",
        {
            "students": results,
            "target_ratio": 1.25,
            "steps": args.steps,
            "window": args.window,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "compressed_overrides": COMPRESSED,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
