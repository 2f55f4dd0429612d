"""Run the trainer CLI, but SIGKILL the process in the middle of its Nth checkpoint write.

The kill lands after DCP has written the tensors of checkpoint N into its temporary folder and
before that folder is completed and renamed: the moment a real crash would do the most harm.
Usage: python kill_during_checkpoint.py N <trainer overrides...>
"""

import os
import signal
import sys

import torch.distributed.checkpoint as dcp

from trainer.cli.train import main

kill_at = int(sys.argv.pop(1))
real_save = dcp.save
writes = []


def save_then_die(state, *, checkpoint_id, **options):
    real_save(state, checkpoint_id=checkpoint_id, **options)
    writes.append(checkpoint_id)
    if len(writes) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


dcp.save = save_then_die
main()
