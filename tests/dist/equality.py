"""How closely a parallel run must equal its single-process reference, and why (shared by the dist tests).

Two runs of the same global batch compute the same sums in different orders (DDP/FSDP reduce over ranks, a
pipeline adds micro-batch gradients on two stages, another CPU kernel path blocks its matmuls otherwise), so
their fp32 results differ in the last bits. Two bounds follow, neither measured on one machine:

- ``REASSOCIATION`` (1e-5 relative): a reordered fp32 sum of n terms moves by at most about n * 2**-24 of the
  sum of the terms' magnitudes; the sums here have at most a few thousand terms of one sign or of similar
  size, so a loss moves by well under 1e-5 relative (measured: at most 2.5e-6 across the default, avx2 and
  avx512 kernel paths). It holds for every step before fake-quant, and for whole runs without it.
- After fake-quant, a weight that lies within those last bits of an int8 rounding boundary rounds to the
  neighbouring code in one run and not in the other ("a flipped code"): the weight the forward uses moves by
  one quantization step ``s`` (its row's scale). Such a move is no reassociation error: it changes the loss
  by up to ``|dL/dw| * s``, which for the weight where that is largest is the change one flip can make
  (``one_flip_change``, computed from the reference's own weights, gradients and scales: to first order).
  A run is held after fake-quant to ``REASSOCIATION`` plus twice that change per flipped code its export
  shows (at least one: a flip may come and go before the end; twice: second-order terms).
- How many codes may flip is not bounded beforehand: a flip changes the gradients of the steps after it, so the
  runs drift further apart and more weights cross boundaries (measured: 10 of 26k codes for the 2-stage runs across
  kernel paths, 115 of 52k for interleaved 1F1B under avx2). How far a weight drifts is bounded, on any kernel path
  (``adam_drift``): AdamW moves a weight by at most ``lr_t * B_t`` a step (plus weight decay, which shrinks the
  two runs' difference), whatever the gradients, so after fake-quant starts two runs' weights part by at most twice
  the sum of those moves. Each exported weight is held to one code and a half plus that drift (doubled: the row's
  scale moves with its largest weight). The bound once held each weight to a code and a half alone, which the
  drift after a flip exceeds on other CPUs (an AMD EPYC's MKL/oneDNN kernels: blocks.3.attn.proj in the
  interleaved run). A wrong layout (a missed all-reduce, a wrong slice, a learning rate 1% off) fails the 1e-5
  bound at the first steps, before fake-quant, and that bound is not loosened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from tests.conftest import read_metrics
from trainer import checkpoint, data, export, models
from trainer.compress import qat
from trainer.config import DataConfig, DistillConfig
from trainer.distill.interface import TeacherOutput
from trainer.distill.losses import logit_losses

REASSOCIATION = 1e-5
LOSS_KEYS = ("train/loss", "train/ce", "distill/kd", "eval/val_loss")
# The export stores one fp16 scale per row: a quantized weight that did not flip is within half a step of the
# reference's, one that flipped within one step and a half (its scale may round to the neighbouring fp16 value).
NOT_FLIPPED, FLIPPED = 0.5, 1.5


def by_step(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir)}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The student's fp32 weights in the run's last DCP checkpoint (read without a process group), by the
    student's own parameter names."""
    path = checkpoint.latest(run / "ckpt")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.student.")
    }
    with checkpoint._single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    return {key.removeprefix("model.student."): tensor for key, tensor in state.items()}


def export_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every weight of the shipped student (``final/``) as its forward uses it (int8 codes times scales)."""
    model = export.load(run / "final")
    return {
        f"{name}.weight": module.weight.detach().float()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def adam_bound(step: int, beta1: float, beta2: float) -> float:
    """The most ``|m_hat / (sqrt(v_hat) + eps)|`` can be at AdamW step ``step`` (1-based) for any gradients: by
    Cauchy-Schwarz, ``|m_t| / sqrt(v_t) <= (1 - beta1) / sqrt(1 - beta2) * sqrt(sum_k<t (beta1**2 / beta2)**k)``, times
    the bias corrections ``sqrt(1 - beta2**t) / (1 - beta1**t)``."""
    ratio = sum((beta1**2 / beta2) ** k for k in range(step))
    corrections = math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(ratio) * corrections


def adam_drift(reference: Path, qat_start: int) -> float:
    """How far one weight of two runs of ``reference``'s config may part from fake-quant's start on, whatever their
    gradients: each run moves it by at most ``lr_t * adam_bound(t)`` at each step ``t >= qat_start`` (weight decay
    only shrinks their difference), so twice the sum of those (the learning rates as the reference logged them)."""
    cfg = OmegaConf.load(reference / ".hydra" / "config.yaml")
    lrs = {step: row["train/lr"] for step, row in by_step(reference).items()}
    beta1, beta2 = cfg.train.beta1, cfg.train.beta2
    return 2 * sum(lr * adam_bound(step, beta1, beta2) for step, lr in lrs.items() if step >= qat_start)


def count_flips(run: Path, reference: Path, drift: float) -> int:
    """Quantized weights of the two exports that differ by a code (asserting every other weight is within half a
    step, every flip within one and a half plus twice ``drift``: see the module); the unquantized tensors (norms,
    biases) within ``REASSOCIATION``."""
    got, want = export_weights(run), export_weights(reference)
    assert sorted(got) == sorted(want)
    flips = 0
    for name, expected in want.items():
        difference = (got[name] - expected).abs()
        if expected.dim() != 2:
            assert float(difference.max()) <= REASSOCIATION, name
            continue
        step = expected.abs().amax(dim=1, keepdim=True) / 127  # int8 per row: the largest |w| is code 127
        moved = difference > FLIPPED * step + 2 * drift + REASSOCIATION
        assert not bool(moved.any()), f"{name}: a weight moved by over a code and a half plus the drift {drift:.2e}"
        flips += int((difference > NOT_FLIPPED * step + REASSOCIATION).sum())
    return flips


def one_flip_change(reference: Path, teacher: Path) -> dict[str, float]:
    """The largest change one flipped code can make to each logged loss term, to first order: the largest
    ``|dL/dw| * s`` over the quantized weights (every matrix of these students is an int8 QAT target; ``s`` is
    its row's scale), at the reference's final weights fake-quantized, on its first validation batch."""
    weights, scales = {}, {}
    for name, weight in final_weights(reference).items():
        if weight.dim() == 2:
            codes, scale = qat.quantize_weight(weight, 8, weight.shape[1])
            weight, scales[name] = qat.dequantize_weight(codes, scale), scale.float()
        weights[name] = weight
    student = models.build_from_spec(checkpoint.read_model_spec(checkpoint.latest(reference / "ckpt")))
    models.load_weights(student, weights)
    params = {name: p for name, p in student.named_parameters() if name in scales}
    cfg = OmegaConf.to_container(OmegaConf.load(reference / ".hydra" / "config.yaml"), resolve=True)
    tokens = data.build(DataConfig(**cfg["data"]), cfg["student"]["block_size"])
    x, y = next(tokens.val_batches(cfg["train"]["batch_size"]))
    with torch.no_grad():
        teacher_logits = export.load(teacher)(x)
    distill = DistillConfig(**{k: v for k, v in cfg["distill"].items() if k != "features"})
    terms = logit_losses(student(x), y, TeacherOutput(logits=teacher_logits), distill)
    change = {}
    for key, value in terms.items():
        grads = torch.autograd.grad(value, list(params.values()), retain_graph=True)
        change[key] = max(float((g.abs() * scales[name]).max()) for name, g in zip(params, grads))
    change["eval/val_loss"] = change["train/ce"]
    return change


def export_val_loss(run: Path) -> float:
    models_ = json.loads((run / "report.json").read_text())["models"]
    return next(m["val_loss"] for m in models_ if m["model"] == "student (export)")


def assert_same_run(run: Path, reference: Path, teacher: Path, *, steps: int, qat_start: int) -> int:
    """The run equals its reference at every step: each loss term within ``REASSOCIATION`` up to ``qat_start``
    and within the flipped-code bound after it (see the module); sparsity and nonzero weights exactly (masks
    are chosen by counts, which reordering does not move); the export's size within one byte per flipped code
    (a code flipping between 0 and 1 adds or removes one stored value); the export's weights code for code but
    for the flipped ones, and its validation loss within the flipped-code bound; the final fp32 weights within
    ``REASSOCIATION`` when no code flipped (a flip changes the gradients after it). Returns the flipped codes."""
    got, want = by_step(run), by_step(reference)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    flips = count_flips(run, reference, adam_drift(reference, qat_start))
    change = one_flip_change(reference, teacher)
    for step, expected in want.items():
        for key in LOSS_KEYS:
            if key in expected:
                bound = REASSOCIATION * abs(expected[key])
                if step > qat_start:
                    bound += 2 * max(1, flips) * change[key]
                assert got[step][key] == pytest.approx(expected[key], rel=0, abs=bound), (step, key, flips)
        for key in ("compress/sparsity", "compress/nonzero_params"):
            assert got[step][key] == expected[key], (step, key)
        assert abs(got[step]["compress/model_bytes"] - expected["compress/model_bytes"]) <= flips, step
    assert want[steps]["compress/qat_active"] == 1.0
    expected_loss = export_val_loss(reference)
    bound = REASSOCIATION * expected_loss + 2 * max(1, flips) * change["eval/val_loss"]
    assert export_val_loss(run) == pytest.approx(expected_loss, rel=0, abs=bound)
    if flips == 0:
        got_weights, want_weights = final_weights(run), final_weights(reference)
        assert sorted(got_weights) == sorted(want_weights)
        assert max(float((got_weights[k] - want_weights[k]).abs().max()) for k in want_weights) <= REASSOCIATION
    return flips
