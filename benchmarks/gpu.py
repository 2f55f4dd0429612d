"""The GPU tier's tests, then the GPU training throughput of distillation.

First the GPU tier (``python -m pytest -q -p no:cacheprovider -m gpu tests/gpu``) in a subprocess: each test's
outcome and skip reason (from its JUnit XML) and the pass/skip/fail counts go into the JSON; past ``--tier-timeout``
seconds it is stopped and counts as timed out. On a first run its stored-loss test records
``tests/gpu/assets/quickstart_losses.json`` (and skips, asking for it to be committed). ``--no-tier`` leaves it out.

Then the throughput of distillation: a ~110M-parameter GPT student learning from a ~4x larger teacher.

bf16 autocast (fp32 master weights, fused AdamW), the teacher frozen in bf16, the trainer's own loss
(``trainer.distill.losses.logit_losses``: (1 - alpha) * CE + alpha * T^2 * forward KL), random tokens (speed
does not depend on the data). Each mode (eager, then ``torch.compile`` of the whole forward + loss)
is timed over ``--steps`` steps after ``--warmup``. Reports tokens/s, MFU, peak memory and the
device into ``benchmarks/results/gpu.json``.

MFU = (3 x student forward FLOPs + teacher forward FLOPs) per step / step time / the device's peak
dense bf16 rate (``PEAK_BF16_TFLOPS``, matched on the device name; ``--peak-tflops`` overrides).
Forward FLOPs per token = 2 x (weights of every matmul, the output head included) + 4 x layers x
context x width (attention scores and values, counted as if not causal, as PaLM's appendix does).

The ``smollm2`` mode times ``python -m trainer experiment=smollm2``'s training step on the real trainer, in bf16:
the teacher live on the device (dequantized to bf16), the cut student learning from its top-64 with the tail (fused
KD), ``--smollm2-batch`` x ``--smollm2-block`` tokens a step, no QAT; its FLOPs count both models' matmuls and
attention the same way. It needs the ``llm`` extra (one error row without it).

With the defaults the whole runs in about 8 minutes on one H100-class GPU (the tier under 5, the timings about 3;
the 2-GPU tests skip there). Without CUDA it prints one line and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from benchmarks.common import RESULTS, machine, print_table
from trainer import models
from trainer.build import param_groups
from trainer.config import DistillConfig
from trainer.distill.interface import TeacherOutput
from trainer.distill.losses import logit_losses
from trainer.models.gpt import GPTConfig
from trainer.process import trainer_for

REPO = Path(__file__).resolve().parent.parent
TIER = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
OUTCOMES = ("passed", "skipped", "failed", "errors")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), first match on the device name wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
]
DISTILL = DistillConfig(loss="forward_kl", alpha=0.5, temperature=2.0)


@dataclass(frozen=True)
class Shape:
    """One GPT's size."""

    n_layer: int
    n_head: int
    n_embd: int


FULL: dict[str, Any] = {
    "student": Shape(12, 12, 768),
    "teacher": Shape(20, 20, 1280),
    "vocab": 32768,
    "block": 1024,
    "batch": 16,
}
TINY: dict[str, Any] = {"student": Shape(2, 2, 64), "teacher": Shape(2, 2, 128), "vocab": 256, "block": 64, "batch": 4}


def build_gpt(shape: Shape, vocab: int, block: int, device: torch.device | str) -> nn.Module:
    """A freshly initialised GPT of ``shape``, created directly on ``device`` (``meta`` to count parameters)."""
    with torch.device(device):
        return models.build(
            "gpt", vocab_size=vocab, block_size=block, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd
        )


def forward_flops_per_token(model: nn.Module, block: int) -> float:
    """2 x matmul weights (the tied head counted as the matmul it is) + 4 x layers x context x width."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = cast(GPTConfig, model.cfg)  # a GPT (build_gpt)
    return 2.0 * matmul_weights + 4.0 * cfg.n_layer * block * cfg.n_embd


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def forward_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The distillation loss of one batch: the teacher without gradients, the student, the trainer's loss terms."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        return logit_losses(logits, y, TeacherOutput(logits=teacher_logits), DISTILL)["train/loss"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, tokens: torch.Tensor
) -> torch.Tensor:
    """One optimizer step per batch of ``tokens`` ``[steps, batch, block + 1]``; the last step's loss."""
    loss = torch.zeros((), device=tokens.device)
    for batch in tokens:
        loss = loss_fn(student, teacher, batch[:, :-1], batch[:, 1:])
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(device: torch.device, fn, *args) -> tuple[torch.Tensor, float]:
    """``fn(*args)`` and its wall time, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - start


def run_mode(compiled: bool, sizes: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """Build fresh models, train ``warmup + steps`` steps, time the last ``steps``."""
    torch.manual_seed(0)
    student = build_gpt(sizes["student"], sizes["vocab"], sizes["block"], device)
    teacher = build_gpt(sizes["teacher"], sizes["vocab"], sizes["block"], device).to(torch.bfloat16).eval()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(student, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    loss_fn = torch.compile(forward_loss) if compiled else forward_loss
    batch, block = sizes["batch"], sizes["block"]
    tokens = torch.randint(sizes["vocab"], (warmup + steps, batch, block + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, warmup_seconds = timed(device, train_steps, student, teacher, optimizer, loss_fn, tokens[:warmup])
    loss, seconds = timed(device, train_steps, student, teacher, optimizer, loss_fn, tokens[warmup:])
    step_flops = batch * block * (3 * forward_flops_per_token(student, block) + forward_flops_per_token(teacher, block))
    return {
        "mode": "torch.compile" if compiled else "eager",
        "steps": steps,
        "warmup": warmup,
        "warmup_seconds": round(warmup_seconds, 2),
        "step_ms": 1000 * seconds / steps,
        "tokens_per_s": batch * block * steps / seconds,
        "achieved_tflops": step_flops * steps / seconds / 1e12,
        "final_loss": float(loss),
        "step_flops": step_flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


SMOLLM2 = ["experiment=smollm2", "train.precision=bf16", "teacher.placement=replicate", "teacher.cache_build=false",
           "teacher.param_dtype=bf16", "compress.modifiers=[]", "report.side_by_side=false", "logger.progress=false",
           "logger=console", "train.eval_every=1000000", "train.ckpt_every=1000000", "logger.log_every=1"]  # fmt: skip


def hf_forward_flops_per_token(model: nn.Module, block: int) -> float:
    """``forward_flops_per_token`` of a transformers decoder (its config gives layers and attention width)."""
    config: Any = model.config
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 2.0 * matmul_weights + 4.0 * config.num_hidden_layers * block * width


def run_smollm2(overrides: list[str], steps: int, warmup: int, run_dir: Path) -> dict:
    """The real trainer's step on ``experiment=smollm2`` (``SMOLLM2`` plus ``overrides``), timed over ``steps``
    steps after ``warmup``; stopped before the export (``train.stop_at_step``)."""
    from benchmarks.common import compose_config
    from parallel import env as dist_env

    total = warmup + steps
    cfg, resolved = compose_config(
        [*SMOLLM2, *overrides, f"train.max_steps={total + 1}", f"train.stop_at_step={total}"]
    )
    env = dist_env.detect()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    trainer = trainer_for(cfg, run_dir, env, resolved)
    teacher = trainer.teacher.module if trainer.teacher is not None else None
    assert teacher is not None  # a live teacher (teacher.placement=replicate)
    block, batch = cfg.student["block_size"], cfg.train.batch_size
    student_flops = hf_forward_flops_per_token(trainer.runtime.student, block)
    teacher_flops = hf_forward_flops_per_token(getattr(teacher, "model", teacher), block)
    trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_ms = [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r["step"] > warmup]
    seconds = sum(step_ms) / 1000
    step_flops = batch * block * (3 * student_flops + teacher_flops)
    return {
        "mode": "smollm2",
        "steps": len(step_ms),
        "warmup": warmup,
        "step_ms": 1000 * seconds / len(step_ms),
        "tokens_per_s": batch * block * len(step_ms) / seconds,
        "achieved_tflops": step_flops * len(step_ms) / seconds / 1e12,
        "final_loss": rows[-1]["train/loss"],
        "step_flops": step_flops,
        "batch": batch,
        "block": block,
        "peak_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None,
    }


def read_junit(report: Path) -> list[dict]:
    """Every test case of a pytest JUnit XML report: its id, outcome (``OUTCOMES``), seconds, and the skip reason or
    failure message."""
    tests = []
    for case in ET.parse(report).getroot().iter("testcase"):
        test = {"test": f"{case.get('classname', '')}::{case.get('name', '')}", "seconds": float(case.get("time", 0))}
        found = {child.tag: child for child in case}
        for tag, outcome in (("error", "errors"), ("failure", "failed"), ("skipped", "skipped")):
            if tag in found:
                test |= {"outcome": outcome, "message": found[tag].get("message", "")}
                break
        else:
            test["outcome"] = "passed"
        tests.append(test)
    return tests


def run_tier(timeout: float) -> dict:
    """The GPU tier (``TIER``) in a subprocess in a session of its own: the counts of ``OUTCOMES``, each test's outcome,
    its seconds, the end of its output when it did not pass. Past ``timeout`` seconds its whole process group is asked
    to stop (SIGTERM, which torchrun passes on to its workers), then killed 10 s later."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start, timed_out = time.perf_counter(), False
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "tier.xml"
        proc = subprocess.Popen(
            [sys.executable, *TIER, f"--junitxml={report}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
        tests = read_junit(report) if report.exists() else []
    result: dict[str, Any] = {
        "command": "python " + " ".join(TIER),
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - start, 1),
        **{outcome: sum(t["outcome"] == outcome for t in tests) for outcome in OUTCOMES},
        "tests": tests,
    }
    if proc.returncode != 0:
        result["output_tail"] = output[-4000:]
    return result


def tier_line(tier: dict) -> str:
    counts = ", ".join(f"{tier[outcome]} {outcome}" for outcome in OUTCOMES)
    ended = "timed out" if tier["timed_out"] else f"exit {tier['exit_code']}"
    return f"gpu tier: {counts} in {tier['seconds']:.0f} s ({ended})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--batch", type=int, default=None, help=f"sequences per step (default {FULL['batch']})")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--modes", default="eager,compile,smollm2")
    parser.add_argument("--smollm2-batch", type=int, default=16, help="the smollm2 mode's sequences per step")
    parser.add_argument("--smollm2-block", type=int, default=1024, help="the smollm2 mode's tokens per sequence")
    parser.add_argument("--no-tier", action="store_true", help="time only: leave out the GPU tier's tests")
    parser.add_argument("--tier-timeout", type=float, default=300, help="seconds the GPU tier may take")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    # A CPU smoke test of this code path at a tiny size: no MFU, and no JSON unless --out is given.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks.gpu needs CUDA and found no CUDA device: nothing run, nothing written")
        return
    started = time.perf_counter()
    tier = None
    if device.type == "cuda" and not args.no_tier:  # the tier needs CUDA: a CPU smoke run (--device cpu) has none
        print(f"gpu tier: python {' '.join(TIER)} (at most {args.tier_timeout:.0f} s)", flush=True)
        tier = run_tier(args.tier_timeout)
        print(tier_line(tier), flush=True)
        for test in tier["tests"]:
            if test["outcome"] != "passed":
                print(
                    f"  {test['outcome']}: {test['test']}: {test['message'].splitlines()[0] if test['message'] else ''}"
                )
    sizes = dict(TINY if args.tiny else FULL)
    if args.batch:
        sizes["batch"] = args.batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    params = {
        role: sum(p.numel() for p in build_gpt(sizes[role], sizes["vocab"], sizes["block"], "meta").parameters())
        for role in ("student", "teacher")
    }
    print(
        f"{name}: student {params['student'] / 1e6:.1f}M, teacher {params['teacher'] / 1e6:.1f}M parameters "
        f"({params['teacher'] / params['student']:.2f}x), batch {sizes['batch']} x {sizes['block']} tokens",
        flush=True,
    )
    results = []
    for mode in args.modes.split(","):
        if args.tiny and mode == "smollm2":
            continue  # the real model: not a smoke test's (tests/slow/test_benchmarks_llm.py runs it on a tiny one)
        try:
            if mode == "smollm2":
                recipe = [f"train.batch_size={args.smollm2_batch}", f"student.block_size={args.smollm2_block}"]
                with tempfile.TemporaryDirectory() as run_dir:
                    result = run_smollm2(recipe, args.steps, args.warmup, Path(run_dir))
            else:
                result = run_mode(mode == "compile", sizes, device, args.steps, args.warmup)
        except Exception as e:  # one failing mode (e.g. out of memory) must not lose the other's figures
            result = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["mfu"] = result["achieved_tflops"] / peak if peak and "error" not in result else None
        results.append(result)
        print(json.dumps(result), flush=True)
    rows = [
        [
            r["mode"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_ms']:.1f}",
            f"{r['achieved_tflops']:.1f}",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
        ]
        if "error" not in r
        else [r["mode"], r["error"], "", "", "", ""]
        for r in results
    ]
    print_table(["mode", "tokens/s", "step ms", "TFLOP/s", "MFU", "peak GiB"], rows)
    if args.tiny and args.out == RESULTS / "gpu.json":
        return  # a smoke test never replaces the real figures
    payload = {
        "command": " ".join(["python -m benchmarks.gpu", *sys.argv[1:]]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": name,
        "peak_bf16_tflops": peak,
        "cuda": torch.version.cuda,
        "precision": "bf16 autocast, fp32 master weights; teacher in bf16",
        "distill": {"loss": DISTILL.loss, "alpha": DISTILL.alpha, "temperature": DISTILL.temperature},
        "student": {**dataclasses.asdict(sizes["student"]), "params": params["student"]},
        "teacher": {**dataclasses.asdict(sizes["teacher"]), "params": params["teacher"]},
        "vocab": sizes["vocab"],
        "block": sizes["block"],
        "batch": sizes["batch"],
        "tier": tier,
        "modes": results,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
