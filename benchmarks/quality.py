"""Distillation and compression quality on real data, at equal step budgets, with the whole pipeline.

Tiny Shakespeare (character level): the quickstart's teacher (nanoGPT's CPU config, trained once
by its recipe and reused) and the quickstart's `tiny` student trained ``--steps`` steps per seed
from scratch; distilled with forward KL, reverse KL and JSD; with feature distillation added;
distilled + 50% AGP pruning; distilled + pruning + int8 QAT; and that run's export. scikit-learn
digits in the manner of Hinton et al. 2015: teacher, small net from scratch, distilled small net,
as test-set errors.

Every run is ``python -m trainer ...`` in a subprocess (cwd = the repository), its run folder pinned
under ``--out``; the figures are read back from its ``report.json`` and ``metrics.jsonl``. Writes
``benchmarks/results/quality.json``, two PNG plots beside it, its section of docs/results.md and README.md's
headline table (``benchmarks.readme_results``). ``--quick`` is a smoke run: a few steps, one seed, a short-trained
teacher, and everything (JSON, plots, results fragment) written under ``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import readme_results
from benchmarks.common import RESULTS, compose_config, machine, print_table
from benchmarks.quality_plots import plot_compression, plot_val_loss
from benchmarks.readme_section import command_line, portable
from trainer import data

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "outputs" / "benchmarks" / "quality"
SEEDS = (1337, 1338, 1339)
STUDENT_BASE = ["experiment=quickstart"]  # the tiny student, the shakespeare_cpu teacher, the quickstart's LR schedule
DIGITS_BASE = ["data=digits", "train.batch_size=64", "train.warmup_steps=10", "train.lr=5e-3", "train.min_lr=5e-4"]
HINTON_MNIST_ERRORS = {"teacher": 67, "scratch": 146, "distilled": 74}  # Hinton, Vinyals & Dean 2015, section 3
QUICK = {"steps": 30, "digits_steps": 30, "teacher_steps": 30, "seeds": 1}
VAL_CURVE_POINTS = 20
COMPRESS_KEYS = ("sparsity", "weight_bits", "model_bytes", "qat_active")  # compress_curve rows: [step, *these]


@dataclass(frozen=True)
class Variant:
    """One row of a table: a name, what it shows, and the overrides that make it."""

    key: str
    label: str
    overrides: tuple[str, ...]


def pruning_schedule(steps: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The quickstart's pruning/QAT timing (200-1200 of 2,000 steps) scaled to ``steps``: (prune_agp, prune_qat)."""
    start, end, every = steps // 10, steps * 6 // 10, max(1, steps // 40)
    prune = (
        f"compress.modifiers.0.start_step={start}",
        f"compress.modifiers.0.end_step={end}",
        f"compress.modifiers.0.every={every}",
    )
    return prune, (*prune, f"compress.modifiers.1.start_step={end}")


def shakespeare_variants(steps: int) -> list[Variant]:
    prune, prune_qat = pruning_schedule(steps)
    return [
        Variant("scratch", "student from scratch", ("distill=none",)),
        Variant("forward_kl", "distilled, forward KL", ("distill=kd", "distill.loss=forward_kl")),
        Variant("reverse_kl", "distilled, reverse KL", ("distill=kd", "distill.loss=reverse_kl")),
        Variant("jsd", "distilled, JSD", ("distill=kd", "distill.loss=jsd")),
        Variant("features", "distilled, forward KL + features", ("distill=kd_features",)),
        Variant("prune", "distilled + 50% AGP pruning", ("distill=kd", "compress=prune_agp", *prune)),
        Variant("prune_qat", "distilled + pruning + int8 QAT", ("distill=kd", "compress=prune_qat", *prune_qat)),
    ]


DIGITS_VARIANTS = [
    Variant("teacher", "teacher", ("student=mlp_teacher",)),
    Variant("scratch", "small net from scratch", ("student=mlp_small",)),
    Variant("distilled", "small net distilled", ("student=mlp_small", "distill=kd", "teacher=path")),
]


# ----------------------------------------------------------------------------- running and reading runs


def stat(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) over seeds."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def display_path(path: Path) -> str:
    """``path`` relative to the repository (the JSON is committed; the runs' cwd is the repository)."""
    return portable(str(path))


def read_run(run_dir: Path) -> dict:
    """A finished run's figures: report.json's models and time, and its curves from metrics.jsonl."""
    report = json.loads((run_dir / "report.json").read_text())
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "table" not in r]
    run = {
        "run_dir": display_path(run_dir),
        "steps": report["steps"],
        "train_seconds": report["train_seconds"],
        "models": {m["model"]: m for m in report["models"]},
        "val_curve": [[r["step"], r["eval/val_loss"]] for r in rows if "eval/val_loss" in r],
    }
    if any("eval/errors" in r for r in rows):
        run["errors_curve"] = [[r["step"], r["eval/errors"]] for r in rows if "eval/errors" in r]
    if any("compress/sparsity" in r for r in rows):
        run["compress_curve"] = [
            [r["step"], *(r[f"compress/{k}"] for k in COMPRESS_KEYS)] for r in rows if "compress/sparsity" in r
        ]
    return run


class Runner:
    """Runs ``python -m trainer`` jobs one after another, keeping each one's output in ``out/logs``."""

    def __init__(self, out: Path, total: int, threads: int | None):
        self.out, self.total, self.done = out, total, 0
        self.env = {
            **os.environ,
            "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def train(self, name: str, overrides: list[str], run_dir: Path | None = None) -> dict:
        """Train one run into ``run_dir`` (default ``out/name``; any earlier run there is removed first); its
        figures and wall time."""
        run_dir = run_dir or self.out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "trainer",
            *overrides,
            "logger=console",
            "logger.progress=false",
            f"hydra.run.dir={run_dir}",
        ]
        start = time.perf_counter()
        proc = subprocess.run(command, check=False, cwd=REPO, env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        log = self.out / "logs" / f"{name.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(command[1:])}\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed (exit {proc.returncode}), log {log}:\n{proc.stderr[-2000:]}")
        self.done += 1
        run = {**read_run(run_dir), "wall_seconds": round(wall, 1), "overrides": overrides}
        print(
            f"[{self.done}/{self.total}] {name}: val loss {run['val_curve'][-1][1]:.4f}, "
            f"{run['train_seconds']:.1f} s training, {wall:.0f} s wall",
            flush=True,
        )
        return run


# ----------------------------------------------------------------------------- the two tables


def ensure_teacher(runner: Runner, quick: bool) -> tuple[Path, bool]:
    """The Shakespeare teacher's run folder, trained by its recipe if missing; and whether it was trained now.

    The full benchmark uses the quickstart's teacher (``conf/teacher/shakespeare_cpu.yaml``, under the
    repository); ``--quick`` trains the same recipe for a few steps under ``--out``.
    """
    cfg, _ = compose_config(STUDENT_BASE)
    recipe = [o for o in cfg.teacher.recipe if not o.startswith("hydra.")]  # the run folder is pinned below
    assert cfg.teacher.checkpoint is not None  # the student's teacher config names its checkpoint
    run_dir = (REPO / cfg.teacher.checkpoint).parent
    if quick:
        run_dir = runner.out / "shakespeare" / "teacher"
        recipe.append(f"train.max_steps={QUICK['teacher_steps']}")
    if (run_dir / "report.json").is_file():
        return run_dir, False
    runner.total += 1
    runner.train("shakespeare/teacher", recipe, run_dir)
    return run_dir, True


def shakespeare_table(runner: Runner, teacher_dir: Path, steps: int, seeds: list[int]) -> dict:
    cfg, _ = compose_config([*STUDENT_BASE, "distill=kd"])
    base = [
        *STUDENT_BASE,
        f"teacher.checkpoint={display_path(teacher_dir / 'final')}",
        f"train.max_steps={steps}",
        f"train.eval_every={max(1, steps // VAL_CURVE_POINTS)}",
        f"train.ckpt_every={steps}",
    ]
    variants = []
    for v in shakespeare_variants(steps):
        runs = [
            {"seed": s, **runner.train(f"shakespeare/{v.key}/seed{s}", [*base, *v.overrides, f"train.seed={s}"])}
            for s in seeds
        ]
        variants.append(
            {
                "key": v.key,
                "label": v.label,
                "overrides": list(v.overrides),
                "runs": runs,
                "student": model_stats(runs, "student (fp32 dense)"),
            }
        )
        if v.key == "prune_qat":
            variants[-1]["export"] = model_stats(runs, "student (export)")
    # The teacher's figures from its own run; its latency as the distilled runs measured it, beside their students.
    teacher_report = json.loads((teacher_dir / "report.json").read_text())
    own = next(m for m in teacher_report["models"] if m["model"] == "student (fp32 dense)")
    teacher_rows = [run["models"]["teacher"] for v in variants for run in v["runs"] if "teacher" in run["models"]]
    teacher = {
        "run_dir": display_path(teacher_dir),
        "recipe": list(cfg.teacher.recipe),
        "steps": teacher_report["steps"],
        "train_seconds": stat([teacher_report["train_seconds"]]),
        **{k: stat([own[k]]) for k in ("val_loss", "params", "bytes")},
        "latency_ms": stat([r["latency_ms"] for r in teacher_rows]),
    }
    return {
        "steps": steps,
        "seeds": seeds,
        "base_overrides": base,
        "teacher": teacher,
        "variants": variants,
        "student_arch": _arch(cfg.student),
        "teacher_arch": _teacher_arch(teacher_dir),
        "distill": {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature, "beta": cfg.distill.beta},
        "latency_batch": [cfg.train.batch_size, cfg.sequence_length],
    }


def model_stats(runs: list[dict], model: str) -> dict:
    """Mean and std over seeds of one report row's figures, and of the training time."""
    rows = [run["models"][model] for run in runs]
    return {
        **{k: stat([r[k] for r in rows]) for k in ("val_loss", "params", "bytes", "latency_ms")},
        "train_seconds": stat([run["train_seconds"] for run in runs]),
    }


def digits_table(runner: Runner, steps: int, seeds: list[int]) -> dict:
    base = [
        *DIGITS_BASE,
        f"train.max_steps={steps}",
        f"train.eval_every={max(1, steps // 10)}",
        f"train.ckpt_every={steps}",
    ]
    runs: dict[str, list[dict]] = {v.key: [] for v in DIGITS_VARIANTS}
    for s in seeds:
        for v in DIGITS_VARIANTS:
            extra = (
                [f"teacher.checkpoint={display_path(runner.out / f'digits/teacher/seed{s}' / 'final')}"]
                if v.key == "distilled"
                else []
            )
            runs[v.key].append(
                {"seed": s, **runner.train(f"digits/{v.key}/seed{s}", [*base, *v.overrides, *extra, f"train.seed={s}"])}
            )
    cfg, _ = compose_config([*DIGITS_BASE, "distill=kd"])
    rows = []
    for v in DIGITS_VARIANTS:
        student = compose_config([*DIGITS_BASE, *v.overrides[:1]])[0].student
        rows.append(
            {
                "key": v.key,
                "label": v.label,
                "arch": _arch(student),
                "overrides": list(v.overrides),
                "runs": runs[v.key],
                "errors": stat([r["errors_curve"][-1][1] for r in runs[v.key]]),
                "hinton_mnist_errors": HINTON_MNIST_ERRORS[v.key],
            }
        )
    test_examples = len(data.build(cfg.data, cfg.sequence_length).y_val)
    return {
        "steps": steps,
        "seeds": seeds,
        "base_overrides": base,
        "rows": rows,
        "test_examples": test_examples,
        "distill": {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature},
    }


def _arch(model_cfg: dict) -> str:
    if model_cfg["arch"] == "mlp":
        dropout = model_cfg.get("dropout", 0.0)
        return f"MLP {'-'.join(map(str, model_cfg['hidden']))}" + (f", dropout {dropout}" if dropout else "")
    return f"GPT {model_cfg['n_layer']} layers / {model_cfg['n_head']} heads / {model_cfg['n_embd']} wide"


def _teacher_arch(teacher_dir: Path) -> str:
    c = json.loads((teacher_dir / "final" / "config.json").read_text())["config"]
    return f"GPT {c['n_layer']} layers / {c['n_head']} heads / {c['n_embd']} wide"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps of every Shakespeare student")
    parser.add_argument("--digits-steps", type=int, default=1000, help="optimizer steps of every digits net")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per row (train.seed 1337, 1338, ...)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of each run; 0 = torch's default. Runs go one at a time; on a shared "
        "2-core machine a second OpenMP thread waits on the busy core and steps got ~10x slower",
    )
    parser.add_argument("--out", type=Path, default=None, help="run folders (default outputs/benchmarks/quality)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few steps, one seed; JSON, plots and results fragment go under --out only",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.digits_steps, args.seeds = QUICK["steps"], QUICK["digits_steps"], QUICK["seeds"]
    args.out = (args.out or DEFAULT_OUT.with_name("quality-quick" if args.quick else "quality")).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    seeds = [SEEDS[0] + i for i in range(args.seeds)]
    results_dir = args.out if args.quick else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    runner = Runner(
        args.out,
        total=len(seeds) * (len(shakespeare_variants(args.steps)) + len(DIGITS_VARIANTS)),
        threads=args.threads,
    )
    teacher_dir, teacher_trained = ensure_teacher(runner, args.quick)
    shakespeare = shakespeare_table(runner, teacher_dir, args.steps, seeds)
    digits = digits_table(runner, args.digits_steps, seeds)
    plots = {"val_loss": results_dir / "quality_val_loss.png", "compression": results_dir / "quality_compression.png"}
    plot_val_loss(shakespeare, plots["val_loss"])
    plot_compression(shakespeare, plots["compression"])
    results = {
        "command": command_line("benchmarks.quality", argv),
        "quick": args.quick,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "teacher_trained_in_this_run": teacher_trained,
        "threads": args.threads,
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "machine": {**machine(), "cpu_count": os.cpu_count()},
        "plots": {name: path.name for name, path in plots.items()},
        "shakespeare": shakespeare,
        "digits": digits,
    }
    json_path = results_dir / "quality.json"
    json_path.write_text(json.dumps(results, indent=1))
    for title, (columns, rows) in (
        ("Tiny Shakespeare", readme_results.shakespeare_rows(results)),
        ("digits (test errors)", readme_results.digits_rows(results)),
    ):
        print(f"\n{title}")
        print_table(columns, rows)
    readme = args.out / "README_results.md" if args.quick else readme_results.RESULTS_DOC
    readme_results.write(results, results_dir, readme)
    if not args.quick:
        readme_results.write_headline()
    print(
        f"\nwrote {json_path}, {', '.join(p.name for p in plots.values())} and the results section of {readme}; "
        f"{results['wall_seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
