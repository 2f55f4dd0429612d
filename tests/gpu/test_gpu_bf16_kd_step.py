"""A bf16 KD step on CUDA through the real CLI: a small Llama student (transformers, built from a config, no
download) distilled from a live Llama teacher with ``train.precision=bf16`` (autocast to bf16, fp32 master weights)
gives finite losses, within bf16's rounding of the same step in fp32 on the same device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import FAST, read_metrics, run_cli, save_hf_student, small_hf_config
from tests.gpu.cuda import requires_cuda, trained_on_cuda

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")

STEPS = 2
# Step 1's forward runs on the same weights in both runs, so its losses differ by bf16 rounding alone. bf16 keeps 8
# significant bits: each rounding moves a value by at most u = 2**-9 relative. Autocast rounds every matmul's inputs
# and output to bf16 (accumulating in fp32) and keeps norms, softmax and the losses in fp32, so a logit of these
# 4-layer models carries a few dozen mostly independent roundings: a few u relative. CE moves by at most twice the
# largest logit change (d CE = dz_y - sum_v p_v dz_v), and these logits are small beside CE (~ ln 32), so CE and the
# total loss move by well under 10 u relative (2.5e-5 under CPU's bf16 autocast); 10 u (2%) is the bound. A bf16
# run that computes in fp32 (autocast not applied) is caught the other way: the two step-1 losses must differ.
BF16_REL = 10 * 2.0**-9
COMPARED = ("train/loss", "train/ce")
LOSSES = ("train/loss", "train/ce", "distill/kd")
RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
    "student=hf",
    "student.path=student",
    "student.block_size=64",
    "distill=kd",
    "teacher=hf",
    "teacher.checkpoint=teacher",
    f"train.max_steps={STEPS}",
    f"train.eval_every={STEPS}",
    "logger.log_every=1",
]


def save_teacher(folder: Path) -> Path:
    """A wider Llama than the student (128 wide, SwiGLU 256), on the same vocabulary, seed 1."""
    import torch

    config = small_hf_config("llama")
    config.hidden_size, config.intermediate_size = 128, 256
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def kd_run(root: Path, precision: str) -> dict[int, dict]:
    """``python -m trainer RUN train.precision=precision`` in ``root``: its metrics rows by step."""
    proc = run_cli(root, *RUN, f"train.precision={precision}", f"hydra.run.dir={precision}")
    assert "distill: fused head + divergence" in proc.stdout, proc.stdout[-2000:]
    return {row["step"]: row for row in read_metrics(root / precision)}


@requires_cuda(1)
def test_bf16_kd_step_is_finite_and_close_to_fp32(tmp_path):
    save_hf_student(tmp_path / "student", "llama")
    save_teacher(tmp_path / "teacher")
    fp32, bf16 = kd_run(tmp_path, "fp32"), kd_run(tmp_path, "bf16")
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1))
    for step, row in bf16.items():
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in LOSSES), (step, row)
        for run, precision in ((fp32, "fp32"), (bf16, "bf16")):
            peak = run[step]["memory/rank0/peak_bytes"]
            assert trained_on_cuda(run[step]), f"the {precision} run's step {step} peaked at {peak:.0f} bytes: not CUDA"
    for key in COMPARED:
        assert bf16[1][key] == pytest.approx(fp32[1][key], rel=BF16_REL), key
    assert bf16[1]["train/loss"] != fp32[1]["train/loss"], "bf16 gave fp32's loss bit for bit: no autocast"
