"""On-policy against off-policy distillation on the LLM recipe (``experiment=smollm2``: the SmolLM2-135M-Instruct
teacher, the student cut from it), at equal training compute.

Two runs from the same cut student, seed and batches, with the live teacher (``teacher.placement=replicate``: a
cache cannot score samples that do not exist beforehand) and the recipe's divergence (forward KL of the teacher's
top-64 logits with their tail, T=1, fused) alone (``distill.alpha=1``: no CE on the data), no QAT:
``distill.lmbda=0`` (off-policy KD) and ``distill.lmbda=0.5`` (half of each step's samples completed by the student
from the window's first ``--prompt-tokens`` tokens, ``--new-tokens`` at most, temperature 1). "Equal training
compute": the same optimizer steps, and the same tokens through the student's forward and backward and the
teacher's forward at every step; the student's generation is the on-policy run's extra cost, reported as its
training time.

Each trained student is then measured on held-out prompts (the first ``--prompt-tokens`` tokens of validation
windows): its greedy completions of ``--new-tokens`` tokens, and the teacher's mean log-probability of their tokens
(nats/token, higher: text the teacher finds likelier); and its validation loss (the run's last eval).

Writes ``benchmarks/results/on_policy.json`` and the docs/results.md section between the ``results:on_policy`` markers;
``--readme`` rewrites that section from the JSON alone. ``--quick --teacher DIR --files GLOB`` is a test's run on a
small model: a few steps, everything under ``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, compose_config, machine, print_table, run_env
from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, replace_section
from trainer import data, export
from trainer.build import load_teacher
from trainer.distill.sampling import generate

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = RESULTS / "on_policy.json"
START, END = "<!-- results:on_policy:start -->", "<!-- results:on_policy:end -->"
LIVE = ["teacher.placement=replicate", "teacher.cache_build=false", "compress.modifiers=[]",
        "report.side_by_side=false", "distill.alpha=1.0"]  # fmt: skip
QUICK = [
    "data.val_fraction=0.2", "data.eval_batches=2", "student.layers=2", "student.width=0.5", "student.block_size=16",
    "student.calib_batches=2", "distill.top_k=8", "train.warmup_steps=1",
]  # fmt: skip
ARMS = (("off_policy", "off-policy KD (lmbda 0)", 0.0), ("on_policy", "on-policy (lmbda 0.5)", 0.5))


def train(out: Path, key: str, overrides: list[str], env: dict) -> Path:
    """One ``python -m trainer`` run into ``out/key`` (started afresh); its folder."""
    run_dir = out / key
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "trainer", *overrides, "logger.progress=false", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    log = out / "logs" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(command[1:])}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"run {key} failed (exit {proc.returncode}), log {log}:\n{proc.stderr[-2000:]}")
    print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def held_out_prompts(overrides: list[str], count: int, prompt_tokens: int) -> tuple[torch.Tensor, Any]:
    """``count`` prompts of ``prompt_tokens`` tokens: the starts of the first validation windows; and the data set."""
    cfg, _ = compose_config(overrides)
    dataset = data.build(cfg.data, cfg.sequence_length)
    windows = torch.cat([x for x, _ in dataset.val_batches(cfg.train.batch_size)])
    return windows[:count, :prompt_tokens], dataset


@torch.no_grad()
def measure(run_dir: Path, teacher: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, eos: int | None) -> dict:
    """The trained student's greedy completions of ``prompts`` and the teacher's mean log-probability of their
    tokens; the run's last validation loss and training time."""
    student = export.load(run_dir / "final")
    n, p = prompts.shape
    rows = torch.cat([prompts, torch.zeros(n, new_tokens + 1, dtype=prompts.dtype)], dim=1)
    c = generate(
        student,
        rows,
        torch.full((n,), p),
        [torch.Generator() for _ in range(n)],
        max_new_tokens=new_tokens,
        temperature=0.0,
        top_p=1.0,
        eos=eos,
        pad=eos if eos is not None else 0,
    )
    log_p = F.log_softmax(teacher(c.tokens[:, :-1]).float(), dim=-1)
    targets = torch.arange(1, c.tokens.shape[1])
    written = (targets >= p) & (targets < (p + c.lengths)[:, None])
    picked = log_p.gather(-1, c.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "table" not in m]
    evals = [m["eval/val_loss"] for m in metrics if "eval/val_loss" in m]
    return {
        "teacher_logprob": float(picked[written].mean()),
        "completion_tokens": int(written.sum()),
        "val_loss": evals[-1],
        "train_minutes": json.loads((run_dir / "report.json").read_text())["train_seconds"] / 60,
        "final_train_loss": metrics[-1]["train/loss"],
        "on_policy_kl": metrics[-1].get("distill/on_policy_kl"),
        "completions": [c.tokens[i, p : p + int(c.lengths[i])].tolist() for i in range(n)],
    }


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    columns = ["run", "teacher log-prob of greedy completions", "val loss", "train min"]
    lines = [
        [arm["label"], f"{arm['teacher_logprob']:.4f}", f"{arm['val_loss']:.4f}", f"{arm['train_minutes']:.1f}"]
        for arm in results["arms"]
    ]
    return columns, lines


def render(results: dict) -> str:
    columns, lines = table(results)
    s = results["settings"]
    first = results["arms"][1]
    text = [
        START,
        "<!-- generated by `python -m benchmarks.on_policy --readme` from benchmarks/results/on_policy.json -->",
        "",
        f"`{results['command']}` ({results['wall_seconds'] / 60:.0f} min, {results['machine']['cpu_count']} CPU "
        f"cores, load average {results['load_average']['start']:.1f} at the start): {s['steps']} steps x "
        f"{s['batch_size']} x {s['block_size']} tokens from the same cut student, live teacher, the recipe's "
        f"divergence ({s['loss']}, T={s['temperature']}, teacher top-{s['top_k']} with its tail), no QAT; on-policy "
        f"rows: a prompt of {s['prompt_tokens']} tokens, at most {s['new_tokens']} new tokens at temperature "
        f"{s['gen_temperature']}. Measured on {s['prompts']} held-out prompts of {s['prompt_tokens']} tokens: the "
        f"teacher's mean log-probability (nats/token) of each student's {s['new_tokens']}-token greedy completions, "
        "and the validation loss of the run's last eval.",
        "",
        markdown_table(columns, lines),
        "",
        f"First held-out completion, on-policy student: `{first['completion_texts'][0]!r}`; off-policy: "
        f"`{results['arms'][0]['completion_texts'][0]!r}`.",
        END,
    ]
    return "\n".join(text)


def write_readme(results: dict, readme: Path = RESULTS_DOC) -> None:
    replace_section(readme, START, END, render(results))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each run")
    parser.add_argument("--block", type=int, default=128, help="tokens per training window")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt of an on-policy row and a held-out one")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens the student writes at most")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts measured")
    parser.add_argument("--teacher", help="a GGUF file or Hugging Face folder in place of SmolLM2 (tests)")
    parser.add_argument("--files", help="a corpus glob in place of the standard library (tests)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default outputs/benchmarks/on_policy)")
    parser.add_argument("--quick", action="store_true", help="a few steps; JSON and results fragment under --out")
    parser.add_argument("--readme", action="store_true", help="rewrite the docs/results.md section from the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.block, args.prompt_tokens, args.new_tokens, args.prompts = 4, 16, 6, 6, 4
    default = REPO / "outputs" / "benchmarks" / ("on_policy-quick" if args.quick else "on_policy")
    args.out = (args.out or default).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.readme:
        write_readme(json.loads(RESULTS_JSON.read_text()))
        return
    base = ["experiment=smollm2", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
            f"train.ckpt_every={args.steps}", f"student.block_size={args.block}", "logger=console", *LIVE]  # fmt: skip
    if args.teacher:
        base += ["teacher=hf" if Path(args.teacher).is_dir() else "teacher=gguf", f"teacher.checkpoint={args.teacher}"]
    if args.files:
        base.append(f"data.files=[{args.files}]")
    base += QUICK if args.quick else []
    on_policy = ["distill.prompt_tokens=" + str(args.prompt_tokens), f"distill.max_new_tokens={args.new_tokens}",
                 "distill.gen_temperature=1.0"]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # relative paths (a test's files) are the runs' own: they run here
    cfg, _ = compose_config(base)
    print(
        f"plan: 2 runs of {args.steps} steps x {cfg.train.batch_size} x {args.block} tokens (lmbda 0 and 0.5), then "
        f"{args.prompts} held-out prompts completed greedily by each student and scored by the teacher",
        flush=True,
    )
    started, load_at_start = time.perf_counter(), os.getloadavg()
    env = run_env()
    runs = {key: train(args.out, key, [*base, *on_policy, f"distill.lmbda={lmbda}"], env) for key, _, lmbda in ARMS}
    prompts, dataset = held_out_prompts(base, args.prompts, args.prompt_tokens)
    assert cfg.teacher.checkpoint is not None  # the experiment names it
    teacher = load_teacher(cfg, torch.device("cpu"))
    eos = getattr(dataset, "manifest", {}).get("eos")
    arms = []
    for key, label, lmbda in ARMS:
        figures = measure(runs[key], teacher, prompts, args.new_tokens, eos)
        figures["completion_texts"] = [dataset.decode(tokens) for tokens in figures["completions"]]
        arms.append({"key": key, "label": label, "lmbda": lmbda, **figures})
    d = cfg.distill
    results = {
        "command": command_line("benchmarks.on_policy", argv),
        "quick": args.quick,
        "settings": {
            "steps": args.steps,
            "batch_size": cfg.train.batch_size,
            "block_size": args.block,
            "loss": d.loss,
            "temperature": d.temperature,
            "top_k": d.top_k,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "gen_temperature": 1.0,
            "prompts": args.prompts,
            "overrides": base,
        },
        "arms": arms,
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "machine": {**machine(), "cpu_count": os.cpu_count()},
    }
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    json_path = args.out / "on_policy.json" if args.quick else RESULTS_JSON
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print_table(*table(results))
    readme = args.out / "README_on_policy.md" if args.quick else RESULTS_DOC
    if args.quick:
        readme.write_text(f"{START}\n{END}\n")
    write_readme(results, readme)
    print(f"wrote {json_path} and the results section of {readme}; {results['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
