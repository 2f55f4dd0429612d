"""The training loop: batch -> teacher forward -> student forward -> losses -> step -> compress -> log -> checkpoint."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from parallel import env as dist_env
from parallel import groups
from parallel.collectives import dp_sum
from trainer import checkpoint, data, models
from trainer.build import RunParts, build_compressor
from trainer.config import LoggerConfig, ModifierConfig, TrainConfig
from trainer.logging import RunLogger
from trainer.lr_schedule import lr_at
from trainer.metrics import held_bytes, peak_memory_bytes, state_bytes
from trainer.preemption import Preempted, StopRequests

if TYPE_CHECKING:
    from trainer.compress import Compressor


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float, last_checkpoint: Path | None):
        where = (
            f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        )
        super().__init__(f"non-finite loss ({value}) at step {step}{where}")


class Trainer:
    """One run's loop on this rank over its built parts (``trainer.build``): step, log, evaluate, checkpoint
    (``fit``), then ``close``. ``train``: the steps, optimizer schedule and checkpoints; ``logger_cfg``: the progress
    bar and W&B; ``modifiers``: the compression a plain copy of the student gets; ``identity``: what a checkpoint
    must share with the run to resume it (``trainer.build.run_identity``, None: anything)."""

    def __init__(
        self,
        parts: RunParts,
        run_dir: Path,
        env: dist_env.DistEnv,
        train: TrainConfig,
        logger_cfg: LoggerConfig,
        run_name: str,
        modifiers: list[ModifierConfig],
        identity: dict,
        resolved_config: dict,
    ):
        self.parts, self.run_dir, self.env = parts, run_dir, env
        self.train, self.modifiers, self.identity = train, modifiers, identity
        self.ckpt_root = run_dir / "ckpt"
        self.runtime, self.teacher, self.optimizer = parts.runtime, parts.teacher, parts.optimizer
        self.tokens_per_step = train.batch_size * parts.batches.tokens_per_sample
        self.last_checkpoint: Path | None = None  # the newest good checkpoint: set by resume and each save
        self.train_seconds = 0.0  # training time of the run so far (restored by a resume)
        self.start_step = self.resume()
        # W&B's config shows the sizes this run resolved (-1 = infer replaced) and the world size.
        dims = self.parts.dims
        sizes = {
            "world_size": env.world_size,
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "pp": dims.pp,
        }
        resolved_config = {**resolved_config, "parallel": {**resolved_config.get("parallel", {}), **sizes}}
        self.log_every, lg = logger_cfg.log_every, logger_cfg
        self.logger = RunLogger(
            run_dir,
            config=resolved_config,
            total_steps=train.max_steps,
            start_step=self.start_step,
            is_main=env.is_main,
            progress=lg.progress,
            wandb_mode=lg.wandb.mode,
            wandb_project=lg.wandb.project,
            wandb_entity=lg.wandb.entity,
            wandb_name=lg.wandb.name or run_name,
            wandb_tags=list(lg.wandb.tags),
        )
        self.samples: list[list] = []  # on-policy distillation: the completions of the last evaluation (rank 0)

    @property
    def compressor(self) -> Compressor | None:
        return self.runtime.compressor

    def whole_student(self) -> tuple[nn.Module | None, Compressor | None]:
        """(student, compressor) over full tensors on rank 0, (None, None) elsewhere (a collective)."""
        return self.runtime.whole_student(self.plain_student, self.env.is_main)

    def plain_student(self) -> tuple[nn.Module, Compressor | None]:
        """A new unsharded student, in the live one's train/eval mode, with its own compressor."""
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the training RNG
            student = models.build_from_spec(self.parts.student_spec).to(self.env.device)
        student.train(self.runtime.student.training)
        return student, build_compressor(student, self.modifiers)

    # ---- state -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        t = self.train
        return {
            "rng": {"torch": torch.get_rng_state()},
            "compress": self.compressor.state_dict() if self.compressor else {},
            "data": {"fingerprint": self.parts.dataset.fingerprint, "seed": t.seed},
            "run": self.identity,
            "train_seconds": self.train_seconds,
            "lr_schedule": {"lr": t.lr, "min_lr": t.min_lr, "warmup_steps": t.warmup_steps, "max_steps": t.max_steps},
        }

    def resume(self) -> int:
        """The step to start at: 0, or that of the newest usable checkpoint, loaded in place. A corrupt checkpoint is
        named and the one before it used; one of another model or other settings (seed, data, batch, LR
        schedule), or none usable, raises CheckpointError (nothing deleted)."""
        mode = self.train.resume
        candidates = {"never": [], "auto": checkpoint.list_complete(self.ckpt_root)}.get(mode, [Path(mode)])
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if not candidates:
            if restarts and mode == "auto" and self.env.is_main:
                print(
                    f"warning: torchrun restart {restarts} found no checkpoint in {self.ckpt_root}: starting at step "
                    "0; pin hydra.run.dir so that restarted workers find the run's checkpoints",
                    file=sys.stderr,
                )
            return 0
        path, state, skipped = checkpoint.load_newest(
            candidates,
            model=self.runtime.trainable,
            optimizer=self.optimizer,
            extra_template=self.extra_state(),
            model_spec=self.parts.student_spec,
            run_identity=self.train.resume_must_keep(self.identity),
        )
        torch.set_rng_state(state["rng"]["torch"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.compressor:
            self.compressor.load_state_dict(state["compress"])
        if self.env.is_main:
            for problem in skipped:
                print(f"warning: {problem}; using the checkpoint before it", file=sys.stderr)
            print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
        self.last_checkpoint = path
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint step ``step``; a write error (disk full, I/O) raises CheckpointWriteError, the previous
        checkpoint intact."""
        self.last_checkpoint = checkpoint.save(
            self.ckpt_root,
            step,
            model=self.runtime.trainable,
            optimizer=self.optimizer,
            extra=self.extra_state(),
            model_spec=self.parts.student_spec,
            keep_last=self.train.keep_last,
        )

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, step: int, measure_memory: bool = False) -> dict[str, torch.Tensor]:
        """Optimizer step ``step`` (0-based): accumulate, check, clip, step, compress. With ``measure_memory``,
        also the ``memory/*`` figures of every rank, taken after the optimizer step while gradients exist."""
        t = self.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = self.runtime.forward_backward(step)  # the global batch's values, the same on every rank
        loss = totals["train/loss"].item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step + 1, loss, self.last_checkpoint)
        if self.compressor:
            self.compressor.mask_gradients()
        if t.grad_clip > 0:
            totals["train/grad_norm"] = self.runtime.clip_grad_norm_(t.grad_clip)
        self.optimizer.step()
        if measure_memory:
            totals.update(self.memory_metrics())
        self.optimizer.zero_grad(set_to_none=True)
        if self.compressor:
            self.compressor.after_optimizer_step(step + 1)
        totals["train/lr"] = torch.tensor(lr)
        return totals

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Validation metrics. Without ``model``: the live student's, over this rank's slices summed over all ranks
        (every rank calls it; a pipelined student runs through its stages), with ``distill/agreement`` (top-1
        agreement of student and teacher) and ``distill/teacher_entropy`` (nats) when the teacher scores
        evaluation batches (not through a pipeline), and ``eval/bits_per_byte`` (the loss over the UTF-8 bytes of the
        text the labels decode to: comparable across tokenizers) over unmasked text of a subword tokenizer. With
        ``model``: that model's, over whole batches on this rank alone."""
        distributed = model is None
        model = self.runtime.student if model is None else model
        was_training = model.training
        model.eval()
        teacher = self.teacher if distributed and not self.runtime.pipelined else None
        with_teacher = teacher is not None and teacher.scores_eval_batches
        # loss, correct, count, agree, entropy, text bytes
        sums = torch.zeros(6, dtype=torch.float64, device=self.env.device)
        tokenizer = None if self.parts.dataset.masked else getattr(self.parts.dataset, "tokenizer", None)
        shard = self.parts.batches.shard
        shard = data.Shard(shard.rank, shard.world) if distributed else data.Shard()  # no accumulation
        for x, y in self.parts.dataset.val_batches(self.train.batch_size, shard):
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self.parts.autocast:
                logits = self.runtime.eval_logits(x) if distributed else model(x)
            if logits is None:
                continue  # not the last stage: that one scores the batch
            # Labels of data=chat are IGNORE_INDEX off the assistant's tokens: only the others are scored.
            scored = y != data.IGNORE_INDEX if self.parts.dataset.masked else None
            sums[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += y.numel() if scored is None else scored.sum()
            if tokenizer is not None:
                sums[5] += sum(len(tokenizer.decode(row).encode()) for row in y.tolist())
            if with_teacher:
                assert teacher is not None  # with_teacher implies it
                teacher_logits = teacher.eval_logits(x)
                log_p = F.log_softmax(teacher_logits.float(), dim=-1)
                agree = logits.argmax(-1) == teacher_logits.argmax(-1)
                entropy = -(log_p.exp() * log_p)
                if scored is not None:
                    agree, entropy = agree & scored, entropy.sum(-1) * scored
                sums[3] += agree.sum()
                sums[4] += entropy.sum()
        model.train(was_training)
        if distributed:
            dp_sum(sums, self.runtime.dp_mesh)
            self.runtime.share_eval_sums(sums)
        loss_sum, correct, count = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        out = {"eval/val_loss": loss_sum / count}
        if tokenizer is not None and sums[5].item() > 0:
            out["eval/bits_per_byte"] = loss_sum / math.log(2) / sums[5].item()
        if with_teacher:
            out.update({"distill/agreement": sums[3].item() / count, "distill/teacher_entropy": sums[4].item() / count})
        if self.parts.dataset.task == "classify":
            out.update({"eval/accuracy": correct / count, "eval/errors": count - correct})
        return out

    # ---- the run -----------------------------------------------------------------------
    def fit(self) -> dict[str, float] | None:
        """Train from the start step to ``train.stop_at_step`` or the end; the last evaluation's metrics after the
        last step (``train.max_steps``), None after an earlier stop. Raises Preempted on a stop request."""
        t, log_every = self.train, self.log_every
        stop = t.stop_at_step or t.max_steps
        self.runtime.student.train()
        last_eval: dict[str, float] = {}
        interval_start, interval_steps = time.perf_counter(), 0
        step = self.start_step
        if step == 0 and t.eval_at_start:
            self.logger.log(0, self.evaluate())
        stops = StopRequests(self.env.device).install()
        try:
            while step < stop:
                totals = self.train_step(step, measure_memory=(step + 1) % log_every == 0 or step + 1 == stop)
                step += 1
                interval_steps += 1
                self.logger.progress(step, {"loss": totals["train/loss"].item()})
                # Each period on its own: an eval or checkpoint step is logged too, whatever log_every is.
                evaluate = step % t.eval_every == 0 or step == t.max_steps
                save = step % t.ckpt_every == 0 or step == stop
                if step % log_every == 0 or step == stop or evaluate or save:
                    elapsed = time.perf_counter() - interval_start
                    self.train_seconds += elapsed
                    metrics = {k: float(v) for k, v in totals.items()}
                    metrics["perf/step_ms"] = 1000 * elapsed / interval_steps
                    metrics["perf/tokens_per_s"] = self.tokens_per_step * interval_steps / elapsed
                    if self.teacher is not None and not self.runtime.pipelined:
                        metrics.update(self.teacher_metrics(interval_steps))
                    if self.compressor:
                        metrics.update(self.compression_metrics(step, table=evaluate))
                    if evaluate:
                        last_eval = self.evaluate()
                        metrics.update(last_eval)
                        self.log_samples(step)
                    self.logger.log(step, metrics)
                    if save:
                        self.save_checkpoint(step)
                    interval_start, interval_steps = time.perf_counter(), 0
                if step < stop and stops.agreed():
                    self.checkpoint_and_stop(step, stops.signal_name)
            if step == t.max_steps and not last_eval:  # resumed from the last step's checkpoint: no step ran
                last_eval = self.evaluate()
        finally:
            stops.restore()
        return last_eval if step == t.max_steps else None

    def close(self) -> None:
        """Release the teacher (its connections, a remote one's ranks) and close the logger."""
        try:
            if self.teacher is not None:
                self.teacher.close()
        finally:
            self.logger.close()

    def log_samples(self, step: int) -> None:
        """On-policy distillation: the last step's completions of every rank, as the table ``gen/samples`` (W&B and
        metrics.jsonl) on rank 0, kept for the report (a collective)."""
        on_policy = getattr(self.runtime, "on_policy", None)
        if on_policy is None:
            return
        from trainer.distill.on_policy import SAMPLE_COLUMNS, sample_rows

        examples = [on_policy.examples]
        if dist.is_initialized():
            group = groups.trainer_group()
            examples = [[] for _ in range(dist.get_world_size(group))]
            dist.all_gather_object(examples, on_policy.examples, group=group)
        rows = sample_rows([e for rank in examples for e in rank], self.parts.dataset.decode, step)
        self.logger.table("gen/samples", SAMPLE_COLUMNS, rows, step=step)
        self.samples = rows

    def checkpoint_and_stop(self, step: int, signal_name: str) -> None:
        """After a stop request: make sure step ``step`` is checkpointed, then raise Preempted (every rank)."""
        if self.last_checkpoint != checkpoint.step_dir(self.ckpt_root, step):
            self.save_checkpoint(step)
        raise Preempted(signal_name, step, self.last_checkpoint)

    def memory_metrics(self) -> dict[str, torch.Tensor]:
        """``memory/rank{r}/{params,grads,optimizer,masks,peak}_bytes`` of every rank (a collective): the training
        state each rank holds (local shards only) and its peak memory (CUDA max allocated, or CPU peak RSS)."""
        masks = self.compressor.masks.values() if self.compressor else ()
        held = state_bytes(list(self.runtime.trainable.parameters()), self.optimizer, masks)
        held["peak"] = peak_memory_bytes(self.env.device)
        mine = torch.tensor(list(held.values()), dtype=torch.float64, device=self.env.device)
        ranks = [mine]
        if dist.is_initialized():
            group = groups.trainer_group()
            ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(ranks, mine, group=group)
        return {
            f"memory/rank{rank}/{kind}_bytes": value
            for rank, values in enumerate(ranks)
            for kind, value in zip(held, values.unbind())
        }

    def teacher_metrics(self, steps: int) -> dict[str, float]:
        """``distill/teacher_ms``: time per step the student waited on the teacher over the last ``steps``;
        ``distill/teacher_param_bytes``: the teacher parameter bytes this rank holds (0 for a cache)."""
        assert self.teacher is not None  # called only with a teacher
        return {
            "distill/teacher_ms": 1000 * self.teacher.pop_wait_seconds() / steps,
            "distill/teacher_param_bytes": float(held_bytes(self.teacher.parameters())),
        }

    def compression_metrics(self, step: int, table: bool) -> dict[str, float]:
        """``compress/*`` metrics, also logging the per-layer table if ``table``; {} off rank 0.

        A sharded or pipelined student is measured from counts over each rank's local shards (no weight is
        gathered); others, and students a ``channel`` modifier thins, from full tensors.
        """
        from trainer.compress import stats

        assert self.compressor is not None  # called only when compressing
        sharded = self.parts.dims.fsdp_enabled or self.runtime.pipelined
        if sharded and self.compressor.counts_are_exact:
            counts = self.runtime.shard_counts(self.env.is_main)
            if counts is None:
                return {}
            if table:
                self.logger.table("compress/layers", *stats.table_from_counts(counts), step=step)
            return stats.summary_from_counts(counts, qat_active=self.compressor.qat_active)
        _, compressor = self.whole_student()
        if compressor is None:
            return {}
        if table:
            self.logger.table("compress/layers", *compressor.layer_table(), step=step)
        return compressor.metrics()
