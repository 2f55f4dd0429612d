"""The training loop: batch -> teacher forward -> student forward -> losses -> step -> compress -> log -> checkpoint."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from parallel import env as dist_env
from parallel.collectives import dp_mean, dp_sum
from parallel.ddp import assert_replicas_equal
from parallel.mesh import REPLICATE_AXIS
from parallel.parallelize import no_gradient_sync, parallelize
from trainer import checkpoint, data, models, report
from trainer.config import RunConfig, needs_teacher, parallel_dims
from trainer.distill import teacher as teacher_io
from trainer.distill.features import FeatureDistiller
from trainer.distill.losses import kd_loss
from trainer.logging import RunLogger
from trainer.lr_schedule import lr_at

if TYPE_CHECKING:
    from trainer.compress import Compressor


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float, last_checkpoint: Path | None):
        where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        super().__init__(f"non-finite loss ({value}) at step {step}{where}")


def run(cfg: RunConfig, run_dir: Path, resolved_config: dict) -> float:
    """Train, export and report one run; returns the final validation loss."""
    env = dist_env.init(cfg.parallel.backend)
    try:
        return Trainer(cfg, shared_run_dir(Path(run_dir)), env, resolved_config).fit()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        dist_env.shutdown()


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
        self.teacher = teacher_io.load(cfg.teacher.checkpoint, env.device) if needs_teacher(cfg) else None
        self.student_layers = tuple(f.student_layer for f in cfg.distill.features)
        self.teacher_layers = tuple(f.teacher_layer for f in cfg.distill.features)
        self.trainable = nn.ModuleDict({"student": self.student})
        if cfg.distill.features:
            self.trainable["features"] = FeatureDistiller(cfg.distill.features, self.student.width, self.teacher.width)
        self.compressor = self.build_compressor(self.student, cfg.compress.modifiers)
        # The modules that run forward/backward: DDP wrappers, or the FSDP2-sharded modules themselves.
        self.parallel_modules = {name: parallelize(module, self.dims, self.mesh, cfg.parallel)
                                 for name, module in self.trainable.items()}
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.trainable, t.weight_decay), lr=t.lr,
                                           betas=(t.beta1, t.beta2), fused=False)
        if self.compressor:
            self.compressor.attach_optimizer(self.optimizer)
        self.autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                         else contextlib.nullcontext())
        self.tokens_per_step = t.batch_size * self.data.tokens_per_sample()
        self.start_step = self.resume()
        self.logger = RunLogger(
            run_dir, config=resolved_config, total_steps=t.max_steps, start_step=self.start_step,
            is_main=env.is_main, progress=cfg.logger.progress, wandb_mode=cfg.logger.wandb.mode,
            wandb_project=cfg.logger.wandb.project, wandb_entity=cfg.logger.wandb.entity,
            wandb_name=cfg.logger.wandb.name or cfg.name, wandb_tags=list(cfg.logger.wandb.tags))
        self.last_checkpoint = checkpoint.latest(self.ckpt_root)
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

        Without sharding, the live ones. Under FSDP2 a collective: the full state is gathered to
        rank 0's CPU and loaded into a plain copy of the student with its own compressor.
        """
        if not self.dims.fsdp_enabled:
            return (self.student, self.compressor) if self.env.is_main else (None, None)
        state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        compress_state = self.compressor.state_dict() if self.compressor else None
        if compress_state is not None:
            compress_state["masks"] = {name: full_tensor(mask).cpu() for name, mask in compress_state["masks"].items()}
        if not self.env.is_main:
            return None, None
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the training RNG
            student = build_student(self.cfg, self.data)
        compressor = self.build_compressor(student, self.cfg.compress.modifiers)
        student.load_state_dict(state)
        student.train(self.student.training)
        if compressor:
            compressor.load_state_dict(compress_state)
        return student.to(self.env.device), compressor

    # ---- state -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"rng": {"torch": torch.get_rng_state()}, "compress": self.compressor.state_dict() if self.compressor else {},
                "data": {"fingerprint": self.data.fingerprint, "seed": self.cfg.train.seed},
                "lr_schedule": {"lr": self.cfg.train.lr, "min_lr": self.cfg.train.min_lr,
                                "warmup_steps": self.cfg.train.warmup_steps, "max_steps": self.cfg.train.max_steps}}

    def resume(self) -> int:
        mode = self.cfg.train.resume
        path = None if mode == "never" else checkpoint.latest(self.ckpt_root) if mode == "auto" else Path(mode)
        if path is None:
            return 0
        state = checkpoint.load(path, model=self.trainable, optimizer=self.optimizer, extra_template=self.extra_state())
        torch.set_rng_state(state["rng"]["torch"])
        if self.compressor:
            self.compressor.load_state_dict(state["compress"])
        if self.env.is_main:
            print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        self.last_checkpoint = checkpoint.save(
            self.ckpt_root, step, model=self.trainable, optimizer=self.optimizer, extra=self.extra_state(),
            model_spec=models.model_spec(self.student), keep_last=self.cfg.train.keep_last)

    # ---- one step ----------------------------------------------------------------------
    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.cfg.distill
        t_logits = t_hidden = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(x, hidden_layers=self.teacher_layers)
            t_logits, t_hidden = t_out if self.teacher_layers else (t_out, None)
        s_out = self.parallel_modules["student"](x, hidden_layers=self.student_layers)
        logits, s_hidden = s_out if self.student_layers else (s_out, None)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        out = {"train/ce": ce, "train/loss": (1 - d.alpha) * ce}
        if d.loss != "none":
            kd = kd_loss(logits, t_logits, kind=d.loss, temperature=d.temperature, beta=d.beta, labels=y,
                         chunk_size=d.chunk_size, top_k=d.top_k)
            out["distill/kd"] = kd
            out["train/loss"] = out["train/loss"] + d.alpha * kd
        if s_hidden is not None:
            feat, parts = self.parallel_modules["features"](s_hidden, t_hidden)
            out.update(parts)
            out["distill/features"] = feat
            out["train/loss"] = out["train/loss"] + feat
        return out

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (0-based): accumulate, check, clip, step, compress."""
        t = self.cfg.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, torch.Tensor] = {}
        for micro in range(t.grad_accum):
            x, y = self.data.train_batch(t.seed, step, t.batch_size, self.shard, micro)
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.parallel_modules.values()):
                with self.autocast:
                    parts = self.losses(x, y)
                (parts["train/loss"] / t.grad_accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / t.grad_accum
        totals = dp_mean(totals, self.mesh)  # the global batch's values, the same on every rank
        loss = totals["train/loss"].item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step + 1, loss, self.last_checkpoint)
        if self.compressor:
            self.compressor.mask_gradients()
        if t.grad_clip > 0:
            totals["train/grad_norm"] = full_tensor(nn.utils.clip_grad_norm_(self.trainable.parameters(), t.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.compressor:
            self.compressor.after_optimizer_step(step + 1)
        totals["train/lr"] = torch.tensor(lr)
        return totals

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, distributed: bool = False) -> dict[str, float]:
        """Validation metrics of ``model``: over this rank's slices, summed over all ranks, when
        ``distributed`` (every rank calls it); else over whole batches on this rank alone."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss, correct, count
        shard = data.Shard(self.shard.rank, self.shard.world) if distributed else data.Shard()  # no accumulation
        for x, y in self.data.val_batches(self.cfg.train.batch_size, shard):
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self.autocast:
                logits = model(x)
            sums[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += y.numel()
        model.train(was_training)
        if distributed:
            dp_sum(sums, self.mesh)
        loss_sum, correct, count = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        out = {"eval/val_loss": loss_sum / count}
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
        try:
            while step < stop:
                totals = self.train_step(step)
                step += 1
                interval_steps += 1
                self.logger.progress(step, {"loss": totals["train/loss"].item()})
                if step % log_every == 0 or step == stop:
                    elapsed = time.perf_counter() - interval_start
                    self.train_seconds += elapsed
                    metrics = {k: float(v) for k, v in totals.items()}
                    metrics["perf/step_ms"] = 1000 * elapsed / interval_steps
                    metrics["perf/tokens_per_s"] = self.tokens_per_step * interval_steps / elapsed
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
            summary = self.finish(last_eval) if step == t.max_steps else None
        finally:
            self.logger.close()
        if summary is not None:
            print(report.closing_table(summary))
        return last_eval.get("eval/val_loss", float("nan"))

    def compression_metrics(self, step: int, table: bool) -> dict[str, float]:
        """``compress/*`` metrics from full tensors, also logging the per-layer table if ``table``; {} off rank 0."""
        student, compressor = self.full_student()
        if compressor is None:
            return {}
        if table:
            self.logger.table("compress/layers", *compressor.layer_table(), step=step)
        return compressor.metrics()

    def finish(self, last_eval: dict[str, float]) -> dict | None:
        """Export the student to <run_dir>/final, measure it, write report.md; the summary on rank 0."""
        if self.dims.ddp_enabled:
            assert_replicas_equal(self.trainable, self.mesh[REPLICATE_AXIS])
            if self.env.is_main:
                print(f"ddp: parameters identical on all {self.dims.dp_replicate} ranks", file=sys.stderr)
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
        teacher_eval = self.evaluate(self.teacher) if self.teacher is not None else None
        export_eval = self.evaluate(models.load(final).to(self.env.device))
        summary = report.write(
            self.run_dir, cfg=self.cfg, student=student, teacher=self.teacher, final_dir=final,
            student_eval=last_eval, export_eval=export_eval, teacher_eval=teacher_eval,
            train_seconds=self.train_seconds, steps=self.cfg.train.max_steps,
            example=next(iter(self.data.val_batches(self.cfg.train.batch_size)))[0],
            layer_table=compressor.layer_table() if compressor else None)
        self.logger.summary(summary)
        return summary
