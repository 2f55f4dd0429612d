"""``python -m trainer [hydra overrides]``: check the config, then train (and export, and report)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import ConfigError, RunConfig, register_configs, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
HYDRA_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}
MAX_PREFLIGHT_COMBINATIONS = 64
CONFIG_ERROR_EXIT = 2


def fail(message: str) -> None:
    """Exit with CONFIG_ERROR_EXIT; only rank 0 of a torchrun or srun job prints the line (every rank finds it)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"config error: {message}", file=sys.stderr)
    sys.exit(CONFIG_ERROR_EXIT)


def describe_error(error: BaseException) -> str:
    """One line naming the key, from Hydra/OmegaConf's (often multi-line, nested) exceptions."""
    chain, seen = [], error
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return f"{e.full_key}: {str(getattr(e, 'msg', e)).splitlines()[0]}"
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(error).__name__


def job_overrides(argv: list[str]) -> list[str] | None:
    """The job's overrides (no hydra.* ones), or None when the command line has flags we leave to Hydra."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg in ("-m", "--multirun"):
            continue
        elif arg.startswith("-"):
            return None
        elif not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)
    return overrides


def sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """Expand sweeps (``a=1,2``) into the overrides of each job, at most MAX_PREFLIGHT_COMBINATIONS."""
    choices = []
    for parsed in OverridesParser.create().parse_overrides(overrides):
        key = parsed.get_key_element()
        if parsed.is_sweep_override():
            choices.append([f"{key}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append([f"{key}={parsed.get_value_element_as_str()}" if not parsed.is_delete() else parsed.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_PREFLIGHT_COMBINATIONS)]


def preflight(argv: list[str]) -> None:
    """Compose and validate every job the command line asks for, before Hydra starts anything."""
    overrides = job_overrides(argv)
    if overrides is None:
        return
    try:
        combinations = sweep_combinations(overrides)
    except Exception as e:  # noqa: BLE001 - any parse error is reported as one line
        fail(describe_error(e))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for combination in combinations:
            try:
                cfg = compose(config_name="config", overrides=combination)
                validate(OmegaConf.to_object(cfg))
            except ConfigError as e:
                fail(str(e))
            except Exception as e:  # noqa: BLE001 - composition errors become one line
                fail(describe_error(e))


def train_teacher_if_missing(cfg: RunConfig) -> None:
    """Run the teacher's recipe (a plain Stillroom run) when its checkpoint does not exist yet."""
    if cfg.teacher.checkpoint is None or Path(cfg.teacher.checkpoint).exists() or not cfg.teacher.recipe:
        return
    logger_choice = HydraConfig.get().runtime.choices.get("logger", "wandb")
    command = [sys.executable, "-m", "trainer", *cfg.teacher.recipe, f"logger={logger_choice}"]
    print(f"teacher {cfg.teacher.checkpoint} not found: training it with {' '.join(command[1:])}", file=sys.stderr)
    subprocess.run(command, check=True)
    validate(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(dict_cfg: DictConfig) -> float | None:
    from trainer.loop import run

    try:
        cfg: RunConfig = OmegaConf.to_object(dict_cfg)
        validate(cfg)
        train_teacher_if_missing(cfg)
    except ConfigError as e:
        fail(str(e))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run(cfg, run_dir, OmegaConf.to_container(dict_cfg, resolve=True))


def main() -> None:
    register_configs()
    preflight(sys.argv[1:])
    hydra_entry()


if __name__ == "__main__":
    main()
