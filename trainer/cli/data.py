"""``python -m trainer.data [hydra overrides]``: tokenize the data set of a run (``data=text|chat``) into its token
shards without training, and print one JSON line of what the model will learn from."""

from __future__ import annotations

import json
import sys

from trainer import data
from trainer.cli.train import preflight
from trainer.config import TOKENIZED_DATA, ConfigError, RunConfig, check_nodes, register_configs
from trainer.data import shards
from trainer.failure import INTERRUPTED_EXIT, os_error_line, stop


def summary(cfg: RunConfig) -> dict:
    """The counts of ``cfg``'s prepared data set (building its shards first if needed)."""
    root, manifest = shards.prepare(cfg.data, cfg.sequence_length)
    stats = manifest["stats"]
    return {
        "documents": stats["documents"],
        "dropped": stats["dropped"],
        "tokens": {split: stats[f"{split}_tokens"] for split in ("train", "val")},
        "trained_tokens": {split: stats[f"{split}_trained_tokens"] for split in ("train", "val")},
        "tokens_per_s": round(stats["tokens_per_s"], 1),
        "cache": str(root),
    }


def prepare(cfg: RunConfig, prepared: list[dict]) -> None:
    """The run config's own checks, then the data set's (which builds it); ConfigError naming the key."""
    check_nodes(cfg)
    if cfg.data.name not in TOKENIZED_DATA:
        raise ConfigError("data.name", f"python -m trainer.data prepares data=text or chat (got {cfg.data.name})")
    try:
        data.check(cfg.data, cfg.sequence_length)
        prepared.append(summary(cfg))
    except data.DataError as e:
        raise ConfigError(e.key, e.message) from None


INTERRUPTED = "interrupted by Ctrl-C; the chunks tokenized so far are kept: the same command finishes the shards"


def main() -> None:
    register_configs()
    prepared: list[dict] = []
    try:
        preflight(sys.argv[1:], lambda cfg: prepare(cfg, prepared))
    except KeyboardInterrupt:
        stop(INTERRUPTED, INTERRUPTED_EXIT)
    except OSError as e:  # a disk full while writing the shards: no part is left half written
        stop(f"error: data.cache_dir: {os_error_line(e)}; the chunks tokenized so far are kept", 1)
    for line in prepared:
        print(json.dumps(line))
