"""How a process that cannot go on says why: one line on stderr (printed by rank 0 of a launched job), recorded as
torchrun's error file so its summary names the cause, and an exit code. Imports nothing heavy: a bad input stops
before torch is loaded."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

INTERRUPTED_EXIT = 130  # what a shell reports for a process ended by SIGINT
RANK_ZERO_GRACE_S = 5.0  # how long the other ranks let rank 0 print and record a failure all of them share


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK, srun's SLURM_PROCID; 0 alone)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def record_error(line: str) -> None:
    """Under torchrun, ``line`` as this rank's error file, so torchrun's summary names the cause (the format
    torch.distributed.elastic's ErrorHandler writes and the summary reads)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        with open(error_file, "w") as handle:
            json.dump({"message": record}, handle)


def stop(line: str, code: int) -> NoReturn:
    """Record ``line`` (``record_error``), print it on rank 0, and exit with ``code``. The other ranks wait
    ``RANK_ZERO_GRACE_S`` first: torchrun stops every rank once one exits, so a failure all ranks share (a bad input
    all of them read) is printed once, by rank 0, and its file is the summary's root cause; a failure of another
    rank alone is named by that rank's file in the summary."""
    if launch_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    else:
        time.sleep(RANK_ZERO_GRACE_S)
    record_error(line)
    sys.exit(code)


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def os_error_line(error: OSError) -> str:
    """An OSError as one line: what failed, on which file."""
    what = error.strerror or first_line(error)
    return f"{what}: {error.filename}" if error.filename else what
