"""The training loop: batch -> teacher forward -> student forward -> losses -> step -> compress -> log -> checkpoint."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallel import env as dist_env
from parallel import groups, remote
from parallel.collectives import PairwiseGradients, dp_mean, dp_sum
from parallel.ddp import assert_replicas_equal
from parallel.mesh import REPLICATE_AXIS
from parallel.parallelize import no_gradient_sync, parallelize
from parallel.pipeline import build_pipeline
from parallel.teacher import TeacherOutput, build_teacher
from trainer import checkpoint, data, models, report
from trainer.config import DistillConfig, RunConfig, needs_teacher, parallel_dims
from trainer.distill.features import FeatureDistiller
from trainer.distill.losses import kd_loss, kd_loss_topk
from trainer.logging import RunLogger
from trainer.lr_schedule import lr_at
from trainer.metrics import held_bytes, peak_memory_bytes, state_bytes
from trainer.preemption import PREEMPTED_EXIT, Preempted, StopRequests

if TYPE_CHECKING:
    from trainer.compress import Compressor
    from trainer.compress.stats import ParamCounts


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float, last_checkpoint: Path | None):
        where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        super().__init__(f"non-finite loss ({value}) at step {step}{where}")


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


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); a tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def build_student(cfg: RunConfig, dataset) -> nn.Module:
    s = cfg.student
    if s.arch == "mlp":
        return models.build("mlp", in_dim=dataset.in_dim, n_classes=dataset.n_classes, hidden=list(s.hidden), dropout=s.dropout)
    return models.build("gpt", vocab_size=dataset.vocab_size, block_size=s.block_size, n_layer=s.n_layer,
                        n_head=s.n_head, n_embd=s.n_embd, dropout=s.dropout, bias=s.bias)


def logit_losses(logits: torch.Tensor, y: torch.Tensor, teacher: TeacherOutput | None,
                 d: DistillConfig) -> dict[str, torch.Tensor]:
    """``train/ce``, ``distill/kd`` (with a KD loss) and ``train/loss`` = (1 - alpha) * CE + alpha * KD of a batch."""
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    out = {"train/ce": ce, "train/loss": (1 - d.alpha) * ce}
    if d.loss != "none":
        options = dict(kind=d.loss, temperature=d.temperature, beta=d.beta, labels=y, chunk_size=d.chunk_size)
        kd = (kd_loss_topk(logits, *teacher.topk, **options) if teacher.topk is not None
              else kd_loss(logits, teacher.logits, top_k=d.top_k, **options))
        out["distill/kd"] = kd
        out["train/loss"] = out["train/loss"] + d.alpha * kd
    return out


class PipelineLoss:
    """The pipeline's loss on the last stage, per micro-batch: the teacher's logits, then ``logit_losses``.

    The target packs the micro-batch's tokens and labels as ``[rows, tokens, 2]``, so the teacher runs on
    the micro-batch the student saw, as ``Trainer.losses`` does under accumulation. Returns the loss over
    ``microbatches`` (the pipeline does not rescale gradients) and keeps the step's averaged terms.
    """

    def __init__(self, teacher: nn.Module | None, distill: DistillConfig, microbatches: int):
        self.teacher, self.distill, self.microbatches = teacher, distill, microbatches
        self.keys = ["train/ce", "train/loss"] + (["distill/kd"] if distill.loss != "none" else [])
        self.totals: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = target.unbind(-1)
        t_out = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = TeacherOutput(logits=self.teacher(x))
        parts = logit_losses(logits, y, t_out, self.distill)
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value.detach() / self.microbatches
        return parts["train/loss"] / self.microbatches

    def pop_totals(self) -> dict[str, torch.Tensor]:
        """The terms averaged over the micro-batches since the last call."""
        totals, self.totals = self.totals, {}
        return totals


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: matrices decay, vectors (norms, biases) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, env: dist_env.DistEnv, resolved_config: dict):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.ckpt_root = run_dir / "ckpt"
        torch.manual_seed(cfg.train.seed)
        block = cfg.student.block_size
        self.data = data.build(cfg.data, block)
        self.dims = parallel_dims(cfg.parallel, env.world_size)
        self.mesh = self.dims.build_mesh(env.device.type)
        self.shard = data.Shard(self.dims.dp_rank(self.mesh), self.dims.dp_size, cfg.train.grad_accum)
        self.student = build_student(cfg, self.data).to(env.device)
        self.teacher = build_teacher(cfg, self.dims, env.device, self.shard, getattr(self.data, "vocab_size", 0),
                                     self.next_micro_batch) if needs_teacher(cfg) else None
        self.student_layers = tuple(f.student_layer for f in cfg.distill.features)
        self.trainable = nn.ModuleDict({"student": self.student})
        if cfg.distill.features:
            self.trainable["features"] = FeatureDistiller(cfg.distill.features, self.student.width,
                                                          self.teacher.module.width)
        self.compressor = self.build_compressor(self.student, cfg.compress.modifiers)
        self.student_spec = models.model_spec(self.student)
        self.dp_mesh = self.dims.dp_mesh(self.mesh)
        self.pipeline = None
        if self.dims.pp_enabled:
            # From here on the student is this rank's stages; the compressor covers their parameters.
            self.pipeline_loss = PipelineLoss(self.teacher.module if self.teacher else None, cfg.distill,
                                              cfg.parallel.microbatches)
            rows = cfg.train.batch_size // (self.dims.dp_size * cfg.parallel.microbatches)
            self.pipeline = build_pipeline(self.student, self.dims, self.mesh, cfg.parallel, loss_fn=self.pipeline_loss,
                                           microbatch=(rows, block), device=env.device)
            self.student = self.trainable["student"] = self.pipeline.part
            self.compressor = self.compressor.for_part(self.student) if self.compressor else None
        # The modules that run forward/backward: DDP wrappers, or the FSDP2-sharded modules themselves.
        self.parallel_modules = {} if self.pipeline else {
            name: parallelize(module, self.dims, self.mesh, cfg.parallel) for name, module in self.trainable.items()}
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.trainable, t.weight_decay), lr=t.lr,
                                           betas=(t.beta1, t.beta2), fused=False)
        if self.compressor:
            self.compressor.attach_optimizer(self.optimizer)
        self.autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                         else contextlib.nullcontext())
        self.tokens_per_step = t.batch_size * self.data.tokens_per_sample()
        self.last_checkpoint: Path | None = None  # the newest good checkpoint: set by resume and each save
        self.start_step = self.resume()
        # W&B's config shows the sizes this run resolved (-1 = infer replaced) and the world size.
        sizes = {"world_size": env.world_size, "dp_replicate": self.dims.dp_replicate,
                 "dp_shard": self.dims.dp_shard, "pp": self.dims.pp}
        resolved_config = {**resolved_config, "parallel": {**resolved_config.get("parallel", {}), **sizes}}
        self.logger = RunLogger(
            run_dir, config=resolved_config, total_steps=t.max_steps, start_step=self.start_step,
            is_main=env.is_main, progress=cfg.logger.progress, wandb_mode=cfg.logger.wandb.mode,
            wandb_project=cfg.logger.wandb.project, wandb_entity=cfg.logger.wandb.entity,
            wandb_name=cfg.logger.wandb.name or cfg.name, wandb_tags=list(cfg.logger.wandb.tags))
        self.train_seconds = 0.0

    @staticmethod
    def build_compressor(student: nn.Module, modifiers):
        """Masks and fake-quant on ``student`` (None without modifiers: torchao is not even imported)."""
        if not modifiers:
            return None
        from trainer.compress import build_compressor

        return build_compressor(student, modifiers)

    def full_student(self) -> tuple[nn.Module | None, Compressor | None]:
        """(student, compressor) over full tensors on rank 0, (None, None) elsewhere.

        Without sharding or stages, the live ones. Under FSDP2 a collective that streams the sharded state into a
        plain copy of the student on rank 0, one tensor at a time (rank 0 holds one full model, never a second);
        under pipelining the stages' states are gathered to rank 0 and loaded into that copy.
        """
        if self.pipeline is None and not self.dims.fsdp_enabled:
            return (self.student, self.compressor) if self.env.is_main else (None, None)
        student, compressor = self.plain_student() if self.env.is_main else (None, None)
        if self.pipeline is not None:
            state, compress_state = self.gather_stages()
            if student is not None:
                student.load_state_dict(state)
        else:
            target = student.state_dict() if student is not None else None
            for name, tensor in self.student.state_dict().items():
                whole = full_tensor(tensor.detach().to(self.env.device))  # CPU-offloaded shards gather on the device
                if target is not None:
                    target[name].copy_(whole)
            compress_state = self.compressor.state_dict() if self.compressor else None
            if compress_state is not None:
                compress_state["masks"] = {name: full_tensor(mask).cpu() for name, mask in compress_state["masks"].items()}
        if student is None:
            return None, None
        if compressor:
            compressor.load_state_dict(compress_state)
        return student, compressor

    def plain_student(self) -> tuple[nn.Module, Compressor | None]:
        """A new unsharded student, in the live one's train/eval mode, with its own compressor."""
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the training RNG
            student = build_student(self.cfg, self.data).to(self.env.device)
        student.train(self.student.training)
        return student, self.build_compressor(student, self.cfg.compress.modifiers)

    def gather_stages(self) -> tuple[dict | None, dict | None]:
        """(model state, compression state) of the whole student, from every stage's full tensors, on rank 0's
        CPU; (None, None) elsewhere. A collective: every rank calls it."""
        state = {name: full_tensor(tensor).detach().cpu() for name, tensor in self.student.state_dict().items()}
        compress_state = self.compressor.state_dict() if self.compressor else None
        if compress_state is not None:
            compress_state["masks"] = {name: full_tensor(mask).cpu() for name, mask in compress_state["masks"].items()}
        stages = self.pipeline.gather_to_first((state, compress_state)) if self.shard.rank == 0 else None
        if not self.env.is_main:
            return None, None
        state = {name: tensor for stage_state, _ in stages for name, tensor in stage_state.items()}
        if compress_state is not None:  # steps and schedule positions are the same on every stage
            compress_state["masks"] = {name: mask for _, stage in stages for name, mask in stage["masks"].items()}
        return state, compress_state

    def next_micro_batch(self, key: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor] | None:
        """The (step, micro) after ``key`` and its inputs on this rank; None after the run's last micro-batch."""
        t = self.cfg.train
        step, micro = key[0] + (key[1] + 1) // t.grad_accum, (key[1] + 1) % t.grad_accum
        if step >= (t.stop_at_step or t.max_steps):
            return None
        x, _ = self.data.train_batch(t.seed, step, t.batch_size, self.shard, micro)
        return (step, micro), x.to(self.env.device)

    # ---- state -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"rng": {"torch": torch.get_rng_state()}, "compress": self.compressor.state_dict() if self.compressor else {},
                "data": {"fingerprint": self.data.fingerprint, "seed": self.cfg.train.seed},
                "lr_schedule": {"lr": self.cfg.train.lr, "min_lr": self.cfg.train.min_lr,
                                "warmup_steps": self.cfg.train.warmup_steps, "max_steps": self.cfg.train.max_steps}}

    def resume(self) -> int:
        """The step to start at: 0, or that of the newest usable checkpoint, loaded in place. A corrupt checkpoint is
        named and the one before it used; one of another model, or none usable, stops the run (nothing deleted)."""
        mode = self.cfg.train.resume
        candidates = {"never": [], "auto": checkpoint.list_complete(self.ckpt_root)}.get(mode, [Path(mode)])
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if not candidates:
            if restarts and mode == "auto" and self.env.is_main:
                print(f"warning: torchrun restart {restarts} found no checkpoint in {self.ckpt_root}: starting at step "
                      "0; pin hydra.run.dir so that restarted workers find the run's checkpoints", file=sys.stderr)
            return 0
        try:
            path, state, skipped = checkpoint.load_newest(
                candidates, model=self.trainable, optimizer=self.optimizer, extra_template=self.extra_state(),
                model_spec=self.student_spec)
        except checkpoint.CheckpointError as e:
            mismatch = isinstance(e, checkpoint.ModelMismatch)
            if self.env.is_main:
                print(f"{'config error: student' if mismatch else 'error'}: {e}", file=sys.stderr)
            sys.exit(2 if mismatch else 1)
        torch.set_rng_state(state["rng"]["torch"])
        if self.compressor:
            self.compressor.load_state_dict(state["compress"])
        if self.env.is_main:
            for problem in skipped:
                print(f"warning: {problem}; using the checkpoint before it", file=sys.stderr)
            print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
        self.last_checkpoint = path
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint step ``step``; a write error (disk full, I/O) stops the run, the previous checkpoint intact."""
        try:
            self.last_checkpoint = checkpoint.save(
                self.ckpt_root, step, model=self.trainable, optimizer=self.optimizer, extra=self.extra_state(),
                model_spec=self.student_spec, keep_last=self.cfg.train.keep_last)
        except checkpoint.CheckpointWriteError as e:
            if self.env.is_main:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    # ---- one step ----------------------------------------------------------------------
    def losses(self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The loss terms of micro-batch ``micro`` of step ``step`` (inputs ``x``, labels ``y``)."""
        d = self.cfg.distill
        t_out = self.teacher(x, step, micro) if self.teacher is not None else None
        s_out = self.parallel_modules["student"](x, hidden_layers=self.student_layers)
        logits, s_hidden = s_out if self.student_layers else (s_out, None)
        out = logit_losses(logits, y, t_out, d)
        if s_hidden is not None:
            feat, parts = self.parallel_modules["features"](s_hidden, t_out.hidden)
            out.update(parts)
            out["distill/features"] = feat
            out["train/loss"] = out["train/loss"] + feat
        return out

    def train_step(self, step: int, measure_memory: bool = False) -> dict[str, float]:
        """Optimizer step ``step`` (0-based): accumulate, check, clip, step, compress. With ``measure_memory``,
        also the ``memory/*`` figures of every rank, taken after the optimizer step while gradients exist."""
        t = self.cfg.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The global batch's values, the same on every rank.
        totals = self.pipeline_forward_backward(step) if self.pipeline else self.forward_backward(step)
        loss = totals["train/loss"].item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step + 1, loss, self.last_checkpoint)
        if self.compressor:
            self.compressor.mask_gradients()
        if t.grad_clip > 0:
            totals["train/grad_norm"] = (self.pipeline.clip_grad_norm_(t.grad_clip) if self.pipeline else
                                         full_tensor(nn.utils.clip_grad_norm_(self.trainable.parameters(), t.grad_clip)))
        self.optimizer.step()
        if measure_memory:
            totals.update(self.memory_metrics())
        self.optimizer.zero_grad(set_to_none=True)
        if self.compressor:
            self.compressor.after_optimizer_step(step + 1)
        totals["train/lr"] = torch.tensor(lr)
        return totals

    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward of step ``step``'s micro-batches (gradients synced after the last); the loss terms
        averaged over them and over the data-parallel ranks."""
        t = self.cfg.train
        totals: dict[str, torch.Tensor] = {}
        pairwise = PairwiseGradients(list(self.trainable.parameters())) if t.accum_order == "pairwise" else None
        for micro in range(t.grad_accum):
            x, y = self.data.train_batch(t.seed, step, t.batch_size, self.shard, micro)
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.parallel_modules.values()):
                with self.autocast:
                    parts = self.losses(x, y, step, micro)
                (parts["train/loss"] / t.grad_accum).backward()
            if pairwise:
                pairwise.push()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / t.grad_accum
        if pairwise:
            pairwise.finish()
        return dp_mean(totals, self.dp_mesh)

    def pipeline_forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """``forward_backward`` through the pipeline: the schedule splits this rank's rows into micro-batches,
        the last stage computes the losses, and its averages reach every rank."""
        t = self.cfg.train
        x, y = self.data.train_batch(t.seed, step, t.batch_size, self.shard)
        x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
        with self.autocast:
            self.pipeline.step(x, target=torch.stack([x, y], dim=-1))
        self.pipeline.sync_tied_grads()
        keys = self.pipeline_loss.keys
        if self.pipeline.has_last:
            totals = dp_mean(self.pipeline_loss.pop_totals(), self.dp_mesh)
            values = torch.stack([totals[key].float() for key in keys])
        else:
            values = torch.zeros(len(keys), device=self.env.device)
        return dict(zip(keys, self.pipeline.broadcast_from_last(values).unbind()))

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, distributed: bool = False) -> dict[str, float]:
        """Validation metrics of ``model``: over this rank's slices, summed over all ranks, when
        ``distributed`` (every rank calls it; a pipelined student runs through its stages); else over
        whole batches on this rank alone. A distributed eval with a live or remote teacher (not pipelined) adds
        ``distill/agreement`` (top-1 agreement of student and teacher) and ``distill/teacher_entropy`` (nats)."""
        was_training = model.training
        model.eval()
        pipelined = distributed and self.pipeline is not None
        # A cache has no logits for evaluation batches.
        with_teacher = distributed and not pipelined and self.teacher is not None and self.teacher.placement != "cache"
        sums = torch.zeros(5, dtype=torch.float64, device=self.env.device)  # loss, correct, count, agree, entropy
        shard = data.Shard(self.shard.rank, self.shard.world) if distributed else data.Shard()  # no accumulation
        for x, y in self.data.val_batches(self.cfg.train.batch_size, shard):
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self.autocast:
                logits = self.pipeline.forward(x) if pipelined else model(x)
            if logits is None:
                continue  # not the last stage: that one scores the batch
            sums[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += y.numel()
            if with_teacher:
                teacher_logits = self.teacher.eval_logits(x)
                log_p = F.log_softmax(teacher_logits.float(), dim=-1)
                sums[3] += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
                sums[4] -= (log_p.exp() * log_p).sum()
        model.train(was_training)
        if distributed:
            dp_sum(sums, self.dp_mesh)
        if pipelined:
            self.pipeline.broadcast_from_last(sums)
        loss_sum, correct, count = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        out = {"eval/val_loss": loss_sum / count}
        if with_teacher:
            out.update({"distill/agreement": sums[3].item() / count, "distill/teacher_entropy": sums[4].item() / count})
        if self.data.task == "classify":
            out.update({"eval/accuracy": correct / count, "eval/errors": count - correct})
        return out

    # ---- the run -----------------------------------------------------------------------
    def fit(self) -> float:
        t, log_every = self.cfg.train, self.cfg.logger.log_every
        stop = t.stop_at_step or t.max_steps
        self.student.train()
        last_eval: dict[str, float] = {}
        interval_start, interval_steps = time.perf_counter(), 0
        step = self.start_step
        stops = StopRequests(self.env.device).install()
        try:
            while step < stop:
                totals = self.train_step(step, measure_memory=(step + 1) % log_every == 0 or step + 1 == stop)
                step += 1
                interval_steps += 1
                self.logger.progress(step, {"loss": totals["train/loss"].item()})
                if step % log_every == 0 or step == stop:
                    elapsed = time.perf_counter() - interval_start
                    self.train_seconds += elapsed
                    metrics = {k: float(v) for k, v in totals.items()}
                    metrics["perf/step_ms"] = 1000 * elapsed / interval_steps
                    metrics["perf/tokens_per_s"] = self.tokens_per_step * interval_steps / elapsed
                    if self.teacher is not None and self.pipeline is None:
                        metrics.update(self.teacher_metrics(interval_steps))
                    evaluate = step % t.eval_every == 0 or step == t.max_steps
                    if self.compressor:
                        metrics.update(self.compression_metrics(step, table=evaluate))
                    if evaluate:
                        last_eval = self.evaluate(self.student, distributed=True)
                        metrics.update(last_eval)
                    self.logger.log(step, metrics)
                    if step % t.ckpt_every == 0 or step == stop:
                        self.save_checkpoint(step)
                    interval_start, interval_steps = time.perf_counter(), 0
                if step < stop and stops.agreed():
                    self.checkpoint_and_stop(step, stops.signal_name)
            summary = self.finish(last_eval) if step == t.max_steps else None
        finally:
            stops.restore()
            if self.teacher is not None:
                self.teacher.close()
            self.logger.close()
        if summary is not None:
            print(report.closing_table(summary))
        return last_eval.get("eval/val_loss", float("nan"))

    def checkpoint_and_stop(self, step: int, signal_name: str) -> None:
        """After a stop request: make sure step ``step`` is checkpointed, then raise Preempted (every rank)."""
        if self.last_checkpoint != checkpoint.step_dir(self.ckpt_root, step):
            self.save_checkpoint(step)
        raise Preempted(signal_name, step, self.last_checkpoint)

    def memory_metrics(self) -> dict[str, torch.Tensor]:
        """``memory/rank{r}/{params,grads,optimizer,masks,peak}_bytes`` of every rank (a collective): the training
        state each rank holds (local shards only) and its peak memory (CUDA max allocated, or CPU peak RSS)."""
        masks = self.compressor.masks.values() if self.compressor else ()
        held = state_bytes(list(self.trainable.parameters()), self.optimizer, masks)
        held["peak"] = peak_memory_bytes(self.env.device)
        mine = torch.tensor(list(held.values()), dtype=torch.float64, device=self.env.device)
        ranks = [mine]
        if dist.is_initialized():
            group = groups.trainer_group()
            ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(ranks, mine, group=group)
        return {f"memory/rank{rank}/{kind}_bytes": value
                for rank, values in enumerate(ranks) for kind, value in zip(held, values.unbind())}

    def teacher_metrics(self, steps: int) -> dict[str, float]:
        """``distill/teacher_ms``: time per step the student waited on the teacher over the last ``steps``;
        ``distill/teacher_param_bytes``: the teacher parameter bytes this rank holds (0 for a cache)."""
        module = self.teacher.module
        return {"distill/teacher_ms": 1000 * self.teacher.pop_wait_seconds() / steps,
                "distill/teacher_param_bytes": float(held_bytes(module.parameters()) if module is not None else 0)}

    def compression_metrics(self, step: int, table: bool) -> dict[str, float]:
        """``compress/*`` metrics, also logging the per-layer table if ``table``; {} off rank 0.

        A sharded or pipelined student is measured from counts over each rank's local shards (no weight is
        gathered); others, and students a ``channel`` modifier thins, from full tensors.
        """
        from trainer.compress import stats

        if (self.dims.fsdp_enabled or self.pipeline is not None) and self.compressor.counts_are_exact:
            counts = self.whole_model_counts()
            if counts is None:
                return {}
            if table:
                self.logger.table("compress/layers", *stats.table_from_counts(counts), step=step)
            return stats.summary_from_counts(counts, qat_active=self.compressor.qat_active)
        student, compressor = self.full_student()
        if compressor is None:
            return {}
        if table:
            self.logger.table("compress/layers", *compressor.layer_table(), step=step)
        return compressor.metrics()

    def whole_model_counts(self) -> dict[str, ParamCounts] | None:
        """The student's ``stats.ParamCounts`` summed over shards and merged over pipeline stages, on rank 0;
        None elsewhere. A collective: every rank calls it."""
        counts = self.compressor.shard_counts()
        if self.pipeline is None:
            return counts if self.env.is_main else None
        stages = self.pipeline.gather_to_first(counts) if self.shard.rank == 0 else None
        if not self.env.is_main:
            return None
        merged: dict[str, ParamCounts] = {}
        for stage in stages:  # the tied embedding is on the first and the last stage: counted once
            for name, param_counts in stage.items():
                merged.setdefault(name, param_counts)
        return merged

    def finish(self, last_eval: dict[str, float]) -> dict | None:
        """Export the student to <run_dir>/final, measure it, write report.md; the summary on rank 0."""
        if self.dims.ddp_enabled:
            assert_replicas_equal(self.trainable, self.mesh[REPLICATE_AXIS])
            if self.env.is_main:
                print(f"ddp: parameters identical on all {self.dims.dp_replicate} ranks", file=sys.stderr)
        if self.pipeline is not None:
            self.pipeline.assert_tied_weights_equal()
            if self.env.is_main:
                print("pipeline: tied tok_emb.weight identical on the first and the last stage", file=sys.stderr)
        student, compressor = self.full_student()
        if not self.env.is_main:
            return None
        final = self.run_dir / "final"
        staging = self.run_dir / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        if compressor:
            compressor.export(staging)
        else:
            models.save_dense(student, staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        # Only a replicated teacher is whole on rank 0: a sharded one's forward is a collective, a cache has none.
        teacher = self.teacher.module if self.teacher is not None and self.teacher.placement == "replicate" else None
        teacher_eval = self.evaluate(teacher) if teacher is not None else None
        export_eval = self.evaluate(models.load(final).to(self.env.device))
        summary = report.write(
            self.run_dir, cfg=self.cfg, student=student, teacher=teacher, final_dir=final,
            student_eval=last_eval, export_eval=export_eval, teacher_eval=teacher_eval,
            train_seconds=self.train_seconds, steps=self.cfg.train.max_steps,
            example=next(iter(self.data.val_batches(self.cfg.train.batch_size)))[0],
            layer_table=compressor.layer_table() if compressor else None)
        self.logger.summary(summary)
        return summary
