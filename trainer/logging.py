"""Run logging: fans metrics out to a console progress bar, <run_dir>/metrics.jsonl and W&B.

Only the main process writes anything; on every other rank each method is a no-op.
W&B is best effort: online mode without an API key, or with a server that cannot be reached, logs offline
(one warning line; `wandb sync` uploads it later); any other W&B failure is reported once and W&B is switched
off, training goes on.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_MODES = ("online", "offline", "disabled")
WANDB_INIT_TIMEOUT_S = 30.0  # wandb.init gives up (and we go on without W&B) after this
WANDB_PROBE_TIMEOUT_S = 5.0  # an online run whose W&B server does not answer within this logs offline
WANDB_DEFAULT_URL = "https://api.wandb.ai"
WANDB_FINISH_TIMEOUT_S = 60.0  # run.finish stops waiting for uploads after this; `wandb sync` can resume


def _plain(value: Any) -> Any:
    """A JSON-ready Python scalar for a tensor / numpy scalar; other values unchanged."""
    return value.item() if hasattr(value, "item") else value


def _short(value: Any) -> str:
    """Compact text for the progress bar postfix."""
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _has_wandb_api_key() -> bool:
    """Whether W&B credentials exist locally (WANDB_API_KEY or a netrc entry); no network, no prompt."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(_wandb_base_url()).netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        creds = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why the server at ``url`` cannot be reached (refused, no route, DNS, timeout), or None when it answers.

    wandb.init itself retries an unreachable server until its init timeout; this answers in ``timeout`` at most.
    Any HTTP answer, an error status included, means the server is there. Proxies from the environment apply.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        return str(e.reason)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _truncate_after(path: Path, step: int) -> None:
    """Atomically rewrite a metrics.jsonl keeping only lines with "step" <= step (drops torn lines)."""
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RunLogger:
    """Progress bar, metrics.jsonl and W&B for one training run."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: dict,
        total_steps: int,
        start_step: int = 0,
        is_main: bool = True,
        progress: bool = True,
        wandb_mode: str = "online",
        wandb_project: str = "stillroom",
        wandb_entity: str | None = None,
        wandb_name: str | None = None,
        wandb_tags: list[str] | None = None,
    ):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.is_main = is_main
        self._file = None
        self._bar: tqdm | None = None
        self._run: Any = None  # the wandb Run, or None when W&B is off
        self._next_postfix = 0.0
        if not is_main:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if start_step > 0 and metrics.exists():
            _truncate_after(metrics, start_step)
        self._file = metrics.open("a", encoding="utf-8")
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, unit="step", dynamic_ncols=True)
        if wandb_mode != "disabled":
            self._run = self._init_wandb(wandb_mode, dict(config), wandb_project, wandb_entity, wandb_name, wandb_tags)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl and log the metrics to W&B at `step`."""
        if self._file is None:
            return
        row = {key: _plain(value) for key, value in metrics.items()}
        self._write({"step": int(step), **row})
        self._call_wandb("log", lambda run: run.log(row, step=int(step)))

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        """Move the bar to `step`; the postfix (e.g. loss, tok/s) is refreshed at most every bar interval."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        now = time.monotonic()
        if now >= self._next_postfix:
            self._next_postfix = now + self._bar.mininterval
            self._bar.set_postfix({key: _short(value) for key, value in postfix.items()}, refresh=False)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """Log a table: a wandb.Table under `key` and one {"step", "table", "columns", "rows"} line."""
        if self._file is None:
            return
        rows = [[_plain(cell) for cell in row] for row in rows]
        self._write({"step": int(step), "table": key, "columns": list(columns), "rows": rows})

        def log_table(run: Any) -> None:
            import wandb

            run.log({key: wandb.Table(columns=list(columns), data=rows)}, step=int(step))

        self._call_wandb("table", log_table)

    def summary(self, values: dict) -> None:
        """Update the W&B run summary."""
        plain = {key: _plain(value) for key, value in values.items()}
        self._call_wandb("summary", lambda run: run.summary.update(plain))

    def warn(self, message: str) -> None:
        """Print a warning line on stderr without breaking the progress bar (main process only)."""
        if self.is_main:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> None:
        """Close the bar, finish the W&B run (exit code 0) and close metrics.jsonl; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._call_wandb("finish", lambda run: run.finish(exit_code=0))
        self._run = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict) -> None:
        assert self._file is not None  # callers return first when there is no metrics file (not rank 0)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _call_wandb(self, what: str, call: Callable[[Any], None]) -> None:
        """Run `call(run)`; on any error warn once and switch W&B off for the rest of the run."""
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as e:  # W&B is best effort
            self._run = None
            self.warn(f"W&B {what} failed ({type(e).__name__}: {e}); W&B is off for the rest of this run")

    def _init_wandb(
        self, mode: str, config: dict, project: str, entity: str | None, name: str | None, tags: list[str] | None
    ) -> Any:
        """The W&B run; online mode logs offline (one warning) when it has no key or cannot reach W&B."""
        try:
            import wandb
        except Exception as e:  # a broken install only turns W&B off
            self.warn(f"W&B unavailable ({type(e).__name__}: {e}); continuing without W&B")
            return None
        offline = f"logging offline under {self.run_dir / 'wandb'}; upload later with `wandb sync`"
        if mode == "online" and not _has_wandb_api_key():
            mode = "offline"
            self.warn(f"no W&B API key (WANDB_API_KEY or ~/.netrc): {offline}")
        elif mode == "online" and (problem := _unreachable(_wandb_base_url(), WANDB_PROBE_TIMEOUT_S)):
            mode = "offline"
            self.warn(f"W&B server {_wandb_base_url()} unreachable ({problem}): {offline}")
        settings = wandb.Settings(
            console="off", silent=True, init_timeout=WANDB_INIT_TIMEOUT_S, finish_timeout=WANDB_FINISH_TIMEOUT_S
        )
        for attempt in ("online", "offline") if mode == "online" else (mode,):
            try:
                return wandb.init(
                    dir=self.run_dir,
                    id=self._wandb_id(),
                    resume="allow",
                    mode=attempt,
                    project=project,
                    entity=entity,
                    name=name,
                    tags=tags,
                    config=config,
                    settings=settings,
                )
            except Exception as e:  # any W&B failure: offline, or on without W&B
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                if attempt == "online":
                    self.warn(f"W&B online init failed ({reason}): {offline}")
                    wandb.teardown()  # else the failed run keeps this id registered and offline init refuses it
                else:
                    self.warn(f"W&B init failed ({reason}); continuing without W&B")
        return None

    def _wandb_id(self) -> str:
        """The run's persistent W&B id, created on first use, so a resumed run continues it."""
        path = self.run_dir / WANDB_ID_FILE
        if path.exists() and (run_id := path.read_text().strip()):
            return run_id
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
        return run_id
