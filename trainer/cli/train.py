"""``python -m trainer [hydra overrides]``: check the config, then train (and export, and report)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import ConfigError, RunConfig, register_configs
from trainer.failure import stop
from trainer.preflight import check_resume, unknown_keys, validate
from trainer.preflight.layout import world_size_from_env
from trainer.resolvers import MissingPackage

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
HYDRA_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}
CONFIG_ERROR_EXIT = 2


def fail(message: str) -> NoReturn:
    """Exit with CONFIG_ERROR_EXIT, the line ``config error: MESSAGE`` printed by rank 0 of a torchrun or srun job
    (every rank finds it) and recorded as each rank's error file (``parallel.env.stop``)."""
    stop(f"config error: {message}", CONFIG_ERROR_EXIT)


def describe_error(error: BaseException) -> str:
    """One line naming the key, from Hydra/OmegaConf's (often multi-line, nested) exceptions."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    own = next((e for e in chain if isinstance(e, MissingPackage)), None)  # a resolver's line says it all
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return f"{e.full_key}: {own if own else str(getattr(e, 'msg', e)).splitlines()[0]}"
        if isinstance(e, OverrideParseException):  # its cause is ANTLR's, whose text is "None"
            return f"{e.override}: not a valid override ({e.message.splitlines()[0]})"
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
    """Expand sweeps (``a=1,2``) into the overrides of each job (every combination, however many)."""
    choices: list[list[str]] = []
    for parsed in OverridesParser.create().parse_overrides(overrides):
        key = parsed.get_key_element()
        if parsed.is_sweep_override():
            choices.append([f"{key}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append(
                # hydra types input_line Optional; the parser sets it on every override it returns
                [
                    f"{key}={parsed.get_value_element_as_str()}"
                    if not parsed.is_delete()
                    else cast(str, parsed.input_line)
                ]
            )
    return [list(c) for c in itertools.product(*choices)]


def check_group_options(overrides: list[str]) -> None:
    """A config group option that does not exist (``student=huge``, ``experiment=nope``) names all the available
    ones (Hydra skips a missing optional ``experiment`` silently)."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        group = Path(CONF_DIR) / key
        if not sep or key.startswith("hydra") or not group.is_dir() or value in ("null", ""):
            continue
        available = sorted(p.stem for p in group.glob("*.yaml"))
        if value not in available:
            fail(f"{key}: no option {value!r} (available: {', '.join(available)})")


def check_run_dir(argv: list[str], cfg: RunConfig) -> None:
    """A pinned ``hydra.run.dir`` must be a folder (or not exist yet); ``train.resume=never`` must not start over
    in one that holds a run (the next rerun would resume its checkpoints, its metrics would mix with these), and
    ``auto`` resumes only a checkpoint of this run's model and settings. A run that is finished there is left as
    it is: exit 0."""
    pinned = [arg.partition("=")[2] for arg in argv if arg.lstrip("+").startswith("hydra.run.dir=")]
    if not pinned:
        return
    from trainer import checkpoint

    run_dir = Path(pinned[-1]).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"hydra.run.dir: {run_dir} is a file, not a folder")
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not existing.is_dir():
        fail(f"hydra.run.dir: {run_dir} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"hydra.run.dir: {run_dir} cannot be written: {existing} is read-only")
    held = [p.name for p in checkpoint.list_complete(run_dir / "ckpt")] if run_dir.is_dir() else []
    if (run_dir / "metrics.jsonl").exists():
        held.append("metrics.jsonl")
    if cfg.train.resume == "never" and held:
        fail(
            f"train.resume: never, but {run_dir} holds a run ({', '.join(held)}): pin another hydra.run.dir, "
            "or delete that one"
        )
    newest = checkpoint.latest(run_dir / "ckpt")
    if cfg.train.resume == "auto" and newest is not None:
        try:
            check_resume(cfg, newest)
        except ConfigError as e:
            fail(str(e))
        step = checkpoint.step_of(newest)
        if step >= cfg.train.max_steps and (run_dir / "report.json").is_file():
            print(
                f"{run_dir} holds this run, finished (step {step} of {cfg.train.max_steps}; {run_dir / 'report.md'}): "
                "nothing to do; pin another hydra.run.dir to train again",
                file=sys.stderr,
            )
            sys.exit(0)  # before Hydra starts: not a file of the run is touched


def preflight(argv: list[str], check: Callable[[RunConfig], None] = validate) -> None:
    """Compose every job the command line asks for and ``check`` it (raising ConfigError), before Hydra starts
    anything."""
    overrides = job_overrides(argv)
    if overrides is None:
        return
    try:
        combinations = sweep_combinations(overrides)
    except Exception as e:  # any parse error is reported as one line
        fail(describe_error(e))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for combination in combinations:
            check_group_options(combination)
            try:
                dict_cfg = compose(config_name="config", overrides=combination)
                unknown = unknown_keys(dict_cfg)
                if unknown:
                    raise ConfigError(unknown[0], "not a key of the run config")
                cfg = cast(RunConfig, OmegaConf.to_object(dict_cfg))  # a structured config: its dataclass
                check(cfg)
            except ConfigError as e:
                fail(str(e))
            except Exception as e:  # composition errors become one line
                fail(describe_error(e))
            check_run_dir(argv, cfg)


def train_teacher_if_missing(cfg: RunConfig) -> None:
    """Run the teacher's recipe (a plain Stillroom run) when its checkpoint does not exist yet."""
    if cfg.teacher.checkpoint is None or Path(cfg.teacher.checkpoint).exists() or not cfg.teacher.recipe:
        return
    logger_choice = HydraConfig.get().runtime.choices.get("logger", "wandb")
    command = [sys.executable, "-m", "trainer", *cfg.teacher.recipe, f"logger={logger_choice}"]
    print(f"teacher {cfg.teacher.checkpoint} not found: training it with {' '.join(command[1:])}", file=sys.stderr)
    subprocess.run(command, check=True)
    validate(cfg)


def check_run(cfg: RunConfig) -> None:
    """A training run's checks: the preflight's, and that a run which writes its own teacher cache first is one
    process (under torchrun every rank would start a build of the one cache; ``python -m trainer.cache`` under
    torchrun writes one with every rank). ConfigError."""
    validate(cfg)
    if cfg.teacher.placement == "cache" and cfg.teacher.cache_build and world_size_from_env() > 1:
        raise ConfigError("teacher.cache_build", "builds the cache in one process: write it first with torchrun ... "
                          "-m trainer.cache (the same overrides)")  # fmt: skip


def build_cache_if_missing(cfg: RunConfig, run_dir: Path) -> None:
    """With ``teacher.cache_build``, write (or finish) the run's teacher cache with ``python -m trainer.cache`` and
    the run's overrides when ``teacher.cache_dir`` holds no complete one; a rerun reuses it."""
    from trainer import cache
    from trainer.build import checked_cache

    if cfg.teacher.placement != "cache" or not cfg.teacher.cache_build:
        return
    try:
        checked_cache(cfg)
        return
    except cache.CacheError:
        pass  # missing or unfinished (the preflight refused any other cache)
    overrides = list(HydraConfig.get().overrides.task)
    command = [sys.executable, "-m", "trainer.cache", *overrides, f"hydra.run.dir={run_dir / 'cache_build'}"]
    print(f"teacher cache {cfg.teacher.cache_dir} missing or unfinished: building it", file=sys.stderr)
    built = subprocess.run(command)
    if built.returncode != 0:
        sys.exit(built.returncode)  # trainer.cache printed why
    validate(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(dict_cfg: DictConfig) -> float | None:
    from trainer.process import run

    try:
        cfg = cast(RunConfig, OmegaConf.to_object(dict_cfg))  # a structured config: its dataclass
        check_run(cfg)
        train_teacher_if_missing(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        build_cache_if_missing(cfg, run_dir)
    except ConfigError as e:
        fail(str(e))
    return run(cfg, run_dir, cast(dict[str, Any], OmegaConf.to_container(dict_cfg, resolve=True)))


def main() -> None:
    register_configs()
    preflight(sys.argv[1:], check_run)
    hydra_entry()
