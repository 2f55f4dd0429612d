"""``python -m trainer.search [hydra overrides]``: choose the student's cut by distilling each candidate briefly
(``trainer/search/__init__.py`` says how). Give it the training run's overrides (``student=from_teacher``) and
``search.*``; it writes ``search.dir/plan.json`` (the candidates scored as cut), a run folder per trained
candidate, ``search.json`` and ``search.png`` (each trained candidate's validation loss against its training tokens),
prints both rankings and the winner's ``student.*`` overrides. Rerun the same command after a kill: the plan is read
back, finished candidates are skipped and unfinished ones resume from their last checkpoint.

``search.launcher=slurm``: each trained candidate is a job of the Hydra SLURM launcher (``hydra/launcher=slurm``,
its ``hydra.launcher.*`` overrides passed through), all submitted at once; the search waits for them.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer import data, search
from trainer.cli.train import CONF_DIR, fail, preflight
from trainer.config import ConfigError, RunConfig, register_configs
from trainer.cut import from_teacher
from trainer.failure import stop
from trainer.preflight import validate

PLAN, RESULT, PLOT = "plan.json", "search.json", "search.png"


def check(cfg: RunConfig) -> None:
    """The run's own checks, and a student cut from the teacher."""
    validate(cfg)
    if not from_teacher.is_cut(cfg.student):
        raise ConfigError(
            "student", "python -m trainer.search cuts the student out of the teacher: use student=from_teacher"
        )


def run_overrides(argv: list[str]) -> list[str]:
    """The overrides every candidate's training run takes: the command line's, less ``search.*`` and ``hydra.*``
    (the search pins each run's folder)."""
    return [arg for arg in argv if not arg.lstrip("+~").startswith(("search.", "hydra."))]


def launcher_overrides(argv: list[str]) -> list[str]:
    """The command line's ``hydra.launcher.*`` overrides, for ``search.launcher=slurm``."""
    return [arg for arg in argv if arg.lstrip("+~").startswith("hydra.launcher.")]


def plan(cfg: RunConfig, key: dict) -> tuple[list[search.Candidate], float, int]:
    """The candidates scored as cut, the teacher's validation loss and the budget: read back from ``plan.json`` when
    it was made for ``key``, else enumerated, scored and written there."""
    path = Path(cfg.search.dir) / PLAN
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return [search.from_json(c) for c in saved["candidates"]], saved["teacher_loss"], saved["budget"]
    assert cfg.teacher.checkpoint is not None  # validate() refuses from_teacher without one
    base = from_teacher.config(cfg.student, cfg.data)
    with torch.device("meta"):
        meta_teacher = from_teacher.source(cfg.teacher.checkpoint)
    budget = search.budget_of(cfg.search, search.parameters(meta_teacher))
    candidates = search.enumerate_candidates(meta_teacher, base, cfg.search)
    if not candidates:
        fail(
            f"search.budget: no cut of the grid holds between {1 - cfg.search.slack:g} and 1 x the budget of "
            f"{budget:,} {cfg.search.count} parameters (widen search.slack or the grids)"
        )
    print(f"search: {len(candidates)} candidates of at most {budget:,} {cfg.search.count} parameters", file=sys.stderr)
    teacher = from_teacher.source(cfg.teacher.checkpoint)
    dataset = data.build(cfg.data, cfg.sequence_length)
    calibration = from_teacher.calibration_batches(base, dataset, cfg.train.batch_size)
    batches = list(dataset.val_batches(cfg.train.batch_size))
    teacher_loss = search.score(teacher, candidates, base, calibration, batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "teacher_loss": teacher_loss, "budget": budget,
               "candidates": [dataclasses.asdict(c) for c in candidates]}  # fmt: skip
    path.write_text(json.dumps(payload, indent=1))
    return candidates, teacher_loss, budget


def train(cfg: RunConfig, argv: list[str], chosen: list[search.Candidate]) -> None:
    """Train each of ``chosen`` for ``search.tokens`` tokens (``python -m trainer``), and read back its curve."""
    per_step = cfg.train.batch_size * cfg.sequence_length
    steps = -(-cfg.search.tokens // per_step)
    every = max(1, steps // cfg.search.evals)
    common = [
        *run_overrides(argv),
        f"train.max_steps={steps}",
        f"train.eval_every={every}",
        f"train.ckpt_every={every}",
    ]
    folders = {c.name: (Path(cfg.search.dir) / c.name).absolute() for c in chosen}
    if cfg.search.launcher == "slurm":
        procs = [
            subprocess.Popen([sys.executable, "-m", "trainer", "-m", "hydra/launcher=slurm", *launcher_overrides(argv),
                              *common, *c.overrides(), f"hydra.sweep.dir={folders[c.name]}", "hydra.sweep.subdir=."])
            for c in chosen
        ]  # fmt: skip
        failed = [c.name for c, proc in zip(chosen, procs, strict=True) if proc.wait() != 0]
    else:
        failed = []
        for c in chosen:
            print(f"search: training {c.name} ({steps} steps)", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "trainer", *common, *c.overrides(), f"hydra.run.dir={folders[c.name]}"]
            if subprocess.run(command).returncode != 0:
                failed.append(c.name)
    if failed:
        stop(f"error: search: the training runs of {', '.join(failed)} failed (their folders under {cfg.search.dir} "
             "say why); the same command goes on with them", 1)  # fmt: skip
    for c in chosen:
        rows = [json.loads(line) for line in (folders[c.name] / "metrics.jsonl").read_text().splitlines()]
        evals = [(row["step"] * per_step, row["eval/val_loss"]) for row in rows if "eval/val_loss" in row]
        c.curve = [(0, cast(float, c.loss_as_cut)), *evals]
        c.loss_after = evals[-1][1]


def plot(result: dict, path: Path) -> None:
    """Each trained candidate's validation loss against its training tokens, the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in result["candidates"]:
        if row["curve"]:
            tokens, losses = zip(*row["curve"], strict=True)
            axes.plot(tokens, losses, marker="o", label=f"{row['name']} ({row['non_embedding'] / 1e6:.1f}M)")
    axes.axhline(result["teacher_loss"], color="black", linestyle="--", label="teacher")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_yscale("log")
    axes.set_title("cut candidates: validation loss while distilling")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(result: dict) -> None:
    print(f"{'candidate':<28} {'params':>11} {'non-emb':>11} {'as cut':>8} {'rank':>4} {'after':>8} {'rank':>4}")
    for row in result["candidates"]:
        after = "" if row["loss_after"] is None else f"{row['loss_after']:.4f}"
        print(f"{row['name']:<28} {row['params']:>11,} {row['non_embedding']:>11,} {row['loss_as_cut']:>8.4f} "
              f"{row['rank_as_cut']:>4} {after:>8} {row['rank_after'] or '':>4}")  # fmt: skip
    agree = "the same as" if result["rankings_agree"] else "not the same as"
    print(f"ranking after training is {agree} the ranking as cut (of the trained candidates)")
    if result["winner"]:
        print(f"winner: {result['winner']['name']}: {' '.join(result['winner']['overrides'])}")


def main() -> None:
    argv = sys.argv[1:]
    register_configs()
    preflight(argv, check)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dict_cfg = compose(config_name="config", overrides=[a for a in argv if not a.startswith("hydra.")])
    cfg = cast(RunConfig, OmegaConf.to_object(dict_cfg))
    key = {"overrides": run_overrides(argv), "search": dataclasses.asdict(cfg.search) | {"top": None, "launcher": None}}
    candidates, teacher_loss, budget = plan(cfg, key)
    chosen = sorted(candidates, key=lambda c: cast(float, c.loss_as_cut))[: cfg.search.top]
    train(cfg, argv, chosen)
    result = search.summary(candidates, teacher_loss, budget, cfg.search)
    out = Path(cfg.search.dir)
    (out / RESULT).write_text(json.dumps(result, indent=1))
    plot(result, out / PLOT)
    print_table(result)
    print(f"wrote {out / RESULT} and {out / PLOT}", file=sys.stderr)
