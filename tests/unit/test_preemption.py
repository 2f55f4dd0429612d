"""Stop requests from real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from trainer.preemption import StopRequests


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    stops = StopRequests(torch.device("cpu")).install()
    try:
        assert not stops.agreed()
        os.kill(os.getpid(), sig)
        assert stops.agreed() and stops.signal_name == sig.name
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first
        assert stops.signal_name == sig.name
    finally:
        stops.restore()
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_interrupts_at_once():
    stops = StopRequests(torch.device("cpu")).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stops.restore()
