"""One process's run: its role (a student rank trains, a teacher rank serves), and the exit each failure ends in."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from parallel import env as dist_env
from parallel import groups, remote
from trainer import cache, checkpoint
from trainer.config import RunConfig, parallel_dims
from trainer.distill.teacher import TeacherPathError
from trainer.loop import NonFiniteLoss, Trainer
from trainer.preemption import PREEMPTED_EXIT, Preempted

INTERRUPTED_EXIT = 130  # what a shell reports for a process ended by SIGINT


def run(cfg: RunConfig, run_dir: Path, resolved_config: dict) -> float:
    """Train, export and report one run; returns the final validation loss."""
    env = dist_env.init(cfg.parallel.backend)
    try:
        run_dir = shared_run_dir(Path(run_dir))
        roles = remote.Roles(env.world_size, cfg.parallel.teacher_ranks) if cfg.parallel.teacher_ranks else None
        if roles:
            groups.set_student_ranks(roles.students)
        if roles and roles.is_teacher(env.rank):
            val_loss = serve_teacher(cfg, roles, env)
        else:
            val_loss = Trainer(cfg, run_dir, env, resolved_config).fit()
        dist_env.wait_for_all()
        return val_loss
    # Both stops happen on every rank at the same step (the loss and the stop flag are reduced over ranks).
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        dist_env.wait_for_all()
        sys.exit(1)
    except Preempted as e:
        if env.is_main:
            print(f"{e}; exit {PREEMPTED_EXIT}: run the same command again to resume", file=sys.stderr)
        dist_env.wait_for_all()
        sys.exit(PREEMPTED_EXIT)
    except cache.CacheError as e:  # a garbled row of the teacher cache, raised on every rank at the same read
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        dist_env.wait_for_all()
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
        if env.is_main:
            newest = checkpoint.latest(run_dir / "ckpt")
            kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"
            print(f"interrupted by a second Ctrl-C; {kept}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except TeacherPathError as e:  # a teacher file damaged since the preflight, or without a manifest to check
        if env.is_main:
            print(f"config error: teacher.checkpoint: {e}", file=sys.stderr)
        sys.exit(2)
    except checkpoint.CheckpointError as e:  # another model's or run's checkpoint, none usable, a failed write
        if env.is_main:
            print(f"config error: {e.config_key}: {e}" if e.config_key else f"error: {e}", file=sys.stderr)
        sys.exit(2 if e.config_key else 1)
    finally:
        dist_env.shutdown()


def serve_teacher(cfg: RunConfig, roles: remote.Roles, env: dist_env.DistEnv) -> float:
    """A teacher rank's whole run: answer its students' requests with the teacher's logits until they stop."""
    from trainer.distill import teacher as teacher_io

    parallel_dims(cfg.parallel, env.world_size).build_mesh(env.device.type)  # its groups need every rank
    module = teacher_io.load_for_run(cfg, env.device)
    served = remote.serve(module, roles.served_by(env.rank), env.device)
    print(f"teacher rank {env.rank}: served {served} requests of ranks {roles.served_by(env.rank)}", file=sys.stderr)
    return float("nan")


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run folder on every rank (Hydra's timestamped default can differ by a second)."""
    if not dist.is_initialized():
        return run_dir
    shared = [str(run_dir)]
    dist.broadcast_object_list(shared, src=0)
    return Path(shared[0])
