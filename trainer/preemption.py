"""Stop requests by signal: SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, torchrun
and srun shutting down) and SIGINT (Ctrl-C) ask the run to finish its optimizer step, write a checkpoint and
exit with PREEMPTED_EXIT; rerunning the same command resumes from that checkpoint. A second Ctrl-C aborts at
once (KeyboardInterrupt). The handlers only set a flag; ranks agree on it with one all-reduce per step."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from parallel import groups

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): try again later; launch/slurm/*.sbatch requeue on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
CTRL_C_NOTICE = "Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again aborts)"


class Preempted(Exception):
    """Raised by the loop once the checkpoint of ``step`` is written after a stop request."""

    def __init__(self, signal_name: str, step: int, checkpoint: object):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequests:
    """The stop flag of this rank. ``install`` sets the handlers (Python allows it in the main thread only: elsewhere
    the signals keep their handlers), ``restore`` the previous ones."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None  # the first stop signal's name, on this rank
        # what signal.signal returned: a handler, SIG_DFL / SIG_IGN, or None (not installed from Python)
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    def install(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts whatever runs
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.stderr.write(CTRL_C_NOTICE + "\n")  # one write: a second Ctrl-C cannot split the line
            sys.stderr.flush()

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (a collective under a process group: every rank calls it)."""
        if not dist.is_initialized():
            return self.received is not None
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups.trainer_group())  # the student's ranks
        return bool(flag.item())

    @property
    def signal_name(self) -> str:
        """This rank's signal, or the note that another rank got it."""
        return self.received or "a signal to another rank"
