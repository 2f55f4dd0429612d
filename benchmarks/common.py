"""Helpers shared by the benchmarks: compose a real run config, time windows, write the JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any, cast

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from parallel import env as dist_env
from trainer import models
from trainer.config import RunConfig, register_configs
from trainer.process import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RESULTS = Path(__file__).resolve().parent / "results"


def compose_config(overrides: list[str]) -> tuple[RunConfig, dict]:
    """The typed config and its resolved dict, exactly as ``python -m trainer OVERRIDES`` would build it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    # A structured config's to_object is its dataclass; its container, a dict.
    return cast(RunConfig, OmegaConf.to_object(cfg)), cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def recipe_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options every benchmark of the SmolLM2 recipe takes: a test's teacher and files, the run folders (default
    outputs/benchmarks/``out``), quick mode, and ``--readme``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--teacher", help="a GGUF file or Hugging Face folder in place of SmolLM2 (tests)")
    parser.add_argument("--files", help="a corpus glob in place of the standard library (tests)")
    parser.add_argument("--out", type=Path, help=f"run folders (default outputs/benchmarks/{out})")
    parser.add_argument("--quick", action="store_true", help="a few steps; JSON and results fragment under --out")
    parser.add_argument("--readme", action="store_true", help="rewrite the docs section from the JSON only")
    return parser


def timing_parser(description: str) -> argparse.ArgumentParser:
    """The options every step-time benchmark takes: steps per run, window size, warm-up, rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=230)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


def random_teacher(path: Path) -> Path:
    """A teacher export of nanoGPT's CPU size (4/4/128, Tiny Shakespeare vocabulary); its weights do not matter
    for speed."""
    torch.manual_seed(0)
    return models.save_dense(models.build("gpt", vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64), path)


def trainer_windows(overrides: list[str], run_dir: Path, steps: int, window: int, warmup: int) -> list[float]:
    """Run the real trainer in-process; return its ``perf/step_ms`` per ``window``-step log interval after
    ``warmup``."""
    cfg, resolved = compose_config(
        [
            *overrides,
            f"train.max_steps={steps}",
            f"logger.log_every={window}",
            f"train.eval_every={steps}",
            f"train.ckpt_every={steps}",
        ]
    )
    train(cfg, run_dir, dist_env.detect(), resolved)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and warmup < r["step"] < steps]


def run_env() -> dict[str, str]:
    """The environment of a ``python -m trainer`` subprocess run by a benchmark: quiet W&B, unbuffered output, and
    this repository importable from any working folder."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2))
    return path


def print_table(columns: list[str], rows: list[list]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
