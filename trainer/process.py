"""One process's run: its role (a student rank trains, a teacher rank serves), and the exit each failure ends in."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from parallel import env as dist_env
from parallel import groups, remote
from trainer import cache, checkpoint, data, export, models, report, side_by_side
from trainer.build import build_run, load_teacher, remote_teachers, run_identity, teacher_vocab
from trainer.cache import compact
from trainer.config import RunConfig, parallel_dims
from trainer.data.errors import DataError
from trainer.distill.teacher import TeacherPathError
from trainer.failure import INTERRUPTED_EXIT, first_line, os_error_line, stop
from trainer.loop import NonFiniteLoss, Trainer
from trainer.preemption import PREEMPTED_EXIT, Preempted


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
            val_loss = train(cfg, run_dir, env, resolved_config)
        dist_env.wait_for_all()
        return val_loss
    # Both stops happen on every rank at the same step (the loss and the stop flag are reduced over ranks).
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        dist_env.wait_for_all()
        sys.exit(1)
    except Preempted:  # ``train`` said so as soon as the checkpoint was written
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
        stop(f"config error: teacher.checkpoint: {e}", 2)
    except (ValueError, DataError) as e:  # a model or data file read while building, damaged since the preflight
        stop(f"error: {first_line(e)}", 2)
    except OSError as e:  # a disk full, a folder made read-only: this rank's own
        stop(f"error: {os_error_line(e)}" + (f" (rank {env.rank})" if env.world_size > 1 else ""), 1)
    except checkpoint.CheckpointError as e:  # another model's or run's checkpoint, none usable, a failed write
        if env.is_main:
            print(f"config error: {e.config_key}: {e}" if e.config_key else f"error: {e}", file=sys.stderr)
        sys.exit(2 if e.config_key else 1)
    finally:
        dist_env.shutdown()


def train(cfg: RunConfig, run_dir: Path, env: dist_env.DistEnv, resolved_config: dict) -> float:
    """A student rank's whole run: build, train, and after the last step export and report; the final validation
    loss (nan after an earlier stop)."""
    trainer = trainer_for(cfg, run_dir, env, resolved_config)
    try:
        last_eval = trainer.fit()
        summary = finish(cfg, trainer, last_eval) if last_eval is not None else None
    except Preempted as e:  # said before closing the logger: a launcher may kill the process soon after a signal
        if env.is_main:
            print(f"{e}; exit {PREEMPTED_EXIT}: run the same command again to resume", file=sys.stderr, flush=True)
        raise
    finally:
        trainer.close()
    if summary is not None:
        print(report.closing_table(summary))
        if "side_by_side" in summary:
            print(side_by_side.closing_text(summary["side_by_side"]))
    return (last_eval or {}).get("eval/val_loss", float("nan"))


def trainer_for(cfg: RunConfig, run_dir: Path, env: dist_env.DistEnv, resolved_config: dict) -> Trainer:
    """The run's parts, built, in a loop resumed from the newest usable checkpoint (``close`` it after use)."""
    identity = run_identity(cfg)
    modifiers = cfg.compress.modifiers
    return Trainer(
        build_run(cfg, env), run_dir, env, cfg.train, cfg.logger, cfg.name, modifiers, identity, resolved_config
    )


def finish(cfg: RunConfig, trainer: Trainer, last_eval: dict[str, float]) -> dict | None:
    """Export the student to <run_dir>/final, measure it, write report.md; the summary on rank 0 (a collective)."""
    checked = trainer.runtime.check_consistency()
    if checked and trainer.env.is_main:
        print(checked, file=sys.stderr)
    student, compressor = trainer.whole_student()
    if not trainer.env.is_main:
        return None
    assert student is not None  # rank 0 holds the whole student
    final = trainer.run_dir / "final"
    staging = export.staging_dir(final)
    if compressor:
        compressor.export(staging)
    else:
        models.save_dense(student, staging)
    data.save_tokenizer(cfg.data, staging)
    export.publish(staging, final)
    teacher = trainer.teacher.whole_module if trainer.teacher is not None else None
    teacher_eval = trainer.evaluate(teacher) if teacher is not None else None
    export_eval = trainer.evaluate(export.load_served(final).to(trainer.env.device))
    val_batches = trainer.parts.dataset.val_batches(cfg.train.batch_size)
    summary = report.write(
        trainer.run_dir,
        report_cfg=cfg.report,
        title=cfg.name,
        setup=f"data: {cfg.data.name}; student: {cfg.student['arch']}; distill: {cfg.distill.loss}"
        f" (alpha={cfg.distill.alpha}, T={cfg.distill.temperature})",
        student=student,
        teacher=teacher,
        final_dir=final,
        student_eval=last_eval,
        export_eval=export_eval,
        teacher_eval=teacher_eval,
        train_seconds=trainer.train_seconds,
        steps=cfg.train.max_steps,
        example=next(iter(val_batches))[0],
        layer_table=compressor.layer_table() if compressor else None,
        samples=trainer.samples[:4] or None,
    )
    if cfg.report.side_by_side:
        assert cfg.teacher.checkpoint is not None  # the preflight asks for a teacher
        summary["side_by_side"] = side_by_side.run(
            cfg.teacher,
            cfg.data,
            cfg.report,
            trainer.run_dir,
            student,
            list(trainer.parts.dataset.val_batches(cfg.train.batch_size)),
        )
    trainer.logger.summary(summary)
    return summary


def serve_teacher(cfg: RunConfig, roles: remote.Roles, env: dist_env.DistEnv) -> float:
    """A teacher rank's whole run: answer its students' requests with the logits of the teachers it holds (the one
    remote teacher, or each remote member of the ensemble) until they stop."""
    parallel_dims(cfg.parallel, env.world_size).build_mesh(env.device.type)  # its groups need every rank
    teachers = [(load_teacher(run, env.device), wire_of(run)) for run in remote_teachers(cfg)]
    served = remote.serve(teachers, roles.served_by(env.rank), env.device)
    kinds = (("logits", remote.REQUEST), ("compact", remote.PACKED), ("compact graded samples", remote.GRADED))
    sent = [f"{name}: {per:,.1f} bytes a token" for name, kind in kinds
            if (per := served.bytes_per_token(kind)) is not None]  # fmt: skip
    print(f"teacher rank {env.rank}: served {served.requests} requests of ranks {roles.served_by(env.rank)} "
          f"({', '.join(sent)})", file=sys.stderr)  # fmt: skip
    return float("nan")


def wire_of(cfg: RunConfig) -> remote.Wire | None:
    """How the teacher rank packs ``cfg``'s remote teacher's replies to training batches (None: fp32 logits)."""
    if cfg.teacher.wire != "compact":
        return None
    assert cfg.distill.top_k is not None  # preflight: a compact wire sends the top distill.top_k
    vocab = teacher_vocab(cfg) or data.vocab_size(cfg.data)  # what the students' clients expect
    return compact.wire(cfg.distill.top_k, vocab, cfg.distill.temperature)


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run folder on every rank (Hydra's timestamped default can differ by a second)."""
    if not dist.is_initialized():
        return run_dir
    shared = [str(run_dir)]
    dist.broadcast_object_list(shared, src=0)
    return Path(shared[0])
