"""SmolLM2-135M-Instruct distilled into a student cut from it, every row at the same token budget.

Rows: the teacher; the student's architecture from random init trained with cross-entropy (scratch + CE); the cut
student as cut; cut + CE; cut + KD (``experiment=smollm2``: the cached top-64 with its tail, forward KL mixed half
and half with CE); cut + KD + int8 QAT from the middle of training, and its compressed-tensors export. CE and KD rows
run ``--seeds`` seeds (the data order: the cut is calibrated with ``student.calib_seed``, so every seed trains the
same student); each KD seed has its own teacher cache, built once by its first run and reused by the QAT row. Every
run is ``python -m trainer experiment=smollm2 ...`` in a subprocess, and every figure is measured on its export as
transformers loads it (``trainer/side_by_side.py``: val loss on the held-out files, top-1 agreement with the teacher,
parameters, bytes, forward tokens/s); training tokens/s and minutes come from the run's metrics. Last, the trainer's
KD step time over a bare PyTorch/transformers loop's (the same cut student and teacher modules, AdamW, the same
batches, the run's mix of full-vocabulary forward KL and cross-entropy, ``distill.fused=false``).

Writes ``benchmarks/results/llm.json``, the docs/results.md section between the ``results:llm`` markers and README.md's
headline table; ``--readme`` rewrites both from the JSON alone; ``--keep ROW`` reads a row's finished runs back from
``--out`` instead of training them (a row the change being measured leaves alone). ``--quick --teacher DIR --files
GLOB`` is a test's run on a small model: a few steps, everything under ``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import readme_results
from benchmarks.common import RESULTS, compose_config, machine, print_table, run_env, trainer_windows
from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, replace_section
from trainer import data, models, report, side_by_side
from trainer.build import build_student
from trainer.models import hf

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = RESULTS / "llm.json"
START, END = "<!-- results:llm:start -->", "<!-- results:llm:end -->"
SEEDS = (1337, 1338)
# Measured on 2 cores (PLATFORM_NOTES.md, "Sizing the SmolLM2 recipe"): what the plan's estimate uses.
TEACHER_TOKENS_PER_S, STUDENT_TOKENS_PER_S, KD_STEP_S, RUN_OVERHEAD_S = 800, 450, 6.0, 150
LIVE_FULL_VOCABULARY = ["distill.top_k=null", "distill.top_k_tail=false", "teacher.placement=replicate",
                        "teacher.cache_build=false"]  # fmt: skip
CE = ["distill.loss=none", "distill.alpha=0.0", *LIVE_FULL_VOCABULARY]
NO_QAT = ["compress.modifiers=[]"]
TRAINED_ROWS = ("scratch_ce", "pruned_ce", "pruned_kd", "pruned_kd_qat")
QUICK = [
    "data.val_fraction=0.2", "data.eval_batches=2", "student.layers=2", "student.width=0.5", "student.block_size=16",
    "student.calib_batches=2", "distill.top_k=8", "report.new_tokens=4", "train.warmup_steps=1",
]  # fmt: skip


def rows_to_train(seeds: list[int], scratch_config: Path) -> list[tuple[str, str, list[str]]]:
    """(key, label, overrides) of every trained run; the scratch row's architecture is ``scratch_config``'s."""
    scratch = ["student=hf", f"student.path={scratch_config}", "~student.layers", "~student.layer_select",
               "~student.width", "~student.mlp_width", "~student.calib_batches"]  # fmt: skip
    runs = [("scratch_ce", "scratch + CE", [*scratch, *CE, *NO_QAT, f"train.seed={seeds[0]}"])]
    runs += [(f"pruned_ce/seed{s}", "pruned + CE", [*CE, *NO_QAT, f"train.seed={s}"]) for s in seeds]
    runs += [(f"pruned_kd/seed{s}", "pruned + KD", [*NO_QAT, f"train.seed={s}"]) for s in seeds]
    return runs + [("pruned_kd_qat", "pruned + KD + int8 QAT", [f"train.seed={seeds[0]}"])]


def base_overrides(steps: int, teacher: str | None, files: str | None, quick: bool) -> list[str]:
    """The overrides every row shares: the recipe at ``steps`` steps, a test's teacher and files, quick sizes."""
    base = ["experiment=smollm2", f"train.max_steps={steps}", f"train.eval_every={steps}",
            f"train.ckpt_every={steps}", "logger=console"]  # fmt: skip
    if teacher:
        base += ["teacher=hf" if Path(teacher).is_dir() else "teacher=gguf", f"teacher.checkpoint={teacher}"]
    if files:
        base.append(f"data.files=[{files}]")
    return base + (QUICK if quick else [])


def plan(steps: int, batch: int, block: int, seeds: list[int], timing_steps: int) -> tuple[str, float]:
    """What the run will do and its estimated minutes at the measured 2-core speeds."""
    tokens = steps * batch * block
    runs = rows_to_train(seeds, Path("scratch_config"))
    seconds = len(seeds) * tokens / TEACHER_TOKENS_PER_S  # one cache per seed
    seconds += len(runs) * (tokens / STUDENT_TOKENS_PER_S + RUN_OVERHEAD_S)
    seconds += 2 * timing_steps * KD_STEP_S * batch * block / 1024 + RUN_OVERHEAD_S
    text = (
        f"plan: {len(runs)} runs of {steps} steps x {batch} x {block} = {tokens:,} tokens each "
        f"({', '.join(k for k, _, _ in runs)}), {len(seeds)} teacher caches, the cut student measured as cut, "
        f"{timing_steps} KD steps each by the trainer and a bare loop; about {seconds / 60:.0f} min on 2 cores"
    )
    return text, seconds / 60


def train(out: Path, key: str, overrides: list[str], env: dict) -> Path:
    """One ``python -m trainer`` run into ``out/key`` (started afresh); its folder."""
    run_dir = out / key
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "trainer", *overrides, "logger.progress=false", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    log = out / "logs" / f"{key.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(command[1:])}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"run {key} failed (exit {proc.returncode}), log {log}:\n{proc.stderr[-2000:]}")
    print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def non_embedding(params: int, folder: Path) -> int:
    """``params`` less the embedding (and an untied head) of the Hugging Face folder's model."""
    config = json.loads((folder / "config.json").read_text())
    tables = 1 if config.get("tie_word_embeddings", False) else 2
    return params - tables * config["vocab_size"] * config["hidden_size"]


def read_run(run_dir: Path, label: str) -> dict:
    """A finished run's figures: its export's and teacher's side-by-side rows, training speed and time."""
    side = json.loads((run_dir / "side_by_side.json").read_text())
    rows = {r["model"]: r for r in side["models"]}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m]
    export = rows["student (export)"]
    return {
        "label": label,
        **export,
        "non_embedding_params": non_embedding(export["params"], run_dir / "final"),
        "train_tokens_per_s": statistics.fmean(speeds[1:] or speeds),  # the first interval holds the warm-up
        "train_minutes": json.loads((run_dir / "report.json").read_text())["train_seconds"] / 60,
        "teacher": rows["teacher"],
        **({"gap_recovered": side["gap_recovered"]["share"]} if side.get("gap_recovered") else {}),
        "completions": {prompt: by["student (export)"] for prompt, by in side["completions"].items()},
        "teacher_completions": {prompt: by["teacher"] for prompt, by in side["completions"].items()},
    }


def as_cut(out: Path, overrides: list[str]) -> dict:
    """The cut student before any training, saved as a Hugging Face folder and measured as transformers loads it."""
    cfg, _ = compose_config(overrides)
    dataset = data.build(cfg.data, cfg.sequence_length)
    folder = out / "pruned_as_cut"
    shutil.rmtree(folder, ignore_errors=True)
    models.save_dense(build_student(cfg, dataset).eval(), folder)
    batches = list(dataset.val_batches(cfg.train.batch_size))
    assert cfg.teacher.checkpoint is not None  # the experiment names it
    _, teacher_top1 = side_by_side.measure(side_by_side.load_teacher(cfg.teacher.checkpoint, "fp32"), batches, [])
    student = hf.load_transformers(folder)
    figures, _ = side_by_side.measure(student, batches, teacher_top1)
    params = side_by_side.weight_count(student)
    return {
        "label": "pruned, no training",
        **figures,
        "params": params,
        "non_embedding_params": non_embedding(params, folder),
        "bytes": report.folder_bytes(folder),
    }


def bare_step_ms(overrides: list[str], steps: int, warmup: int) -> float:
    """Median step time of a bare PyTorch/transformers KD loop: the cut student, the teacher as transformers loads
    it, AdamW, the trainer's batches and LR, the run's loss: ``alpha`` x full-vocabulary forward KL at the run's
    temperature (times T^2) plus ``1 - alpha`` x cross-entropy on the data."""
    cfg, _ = compose_config(overrides)
    t = cfg.train
    dataset = data.build(cfg.data, cfg.sequence_length)
    student = build_student(cfg, dataset).train()
    assert cfg.teacher.checkpoint is not None  # the experiment names it
    teacher = side_by_side.load_teacher(cfg.teacher.checkpoint, "fp32")
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    temperature, alpha, times = cfg.distill.temperature, cfg.distill.alpha, []
    for step in range(steps):
        start = time.perf_counter()
        x, y = dataset.train_batch(t.seed, step, t.batch_size, data.Shard())
        with torch.no_grad():
            target = F.log_softmax(teacher(x).float() / temperature, dim=-1)
        logits = student(x).float()
        log_q = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        kd = temperature**2 * kl
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


def overhead(out: Path, base: list[str], steps: int, warmup: int) -> dict:
    """The trainer's KD step time (live teacher, full-vocabulary KD, no fusion, no QAT) over the bare loop's."""
    live = [*base, *NO_QAT, "teacher.placement=replicate", "teacher.cache_build=false", "distill.top_k=null",
            "distill.top_k_tail=false", "distill.fused=false", "report.side_by_side=false"]  # fmt: skip
    run_dir = out / "overhead_trainer"
    shutil.rmtree(run_dir, ignore_errors=True)
    windows = trainer_windows([*live, "logger.progress=false"], run_dir, steps, 2, warmup)
    trainer_ms = statistics.median(windows)
    bare_ms = bare_step_ms(live, steps, warmup)
    return {
        "steps": steps,
        "warmup": warmup,
        "trainer_ms": trainer_ms,
        "bare_ms": bare_ms,
        "ratio": trainer_ms / bare_ms,
    }


def mean_std(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The docs/console table: one line per row (mean ± std over seeds where there are several)."""
    columns = ["row", "seeds", "non-emb. params", "params", "bytes on disk", "val loss", "top-1 agreement",
               "train tokens/s", "train min"]  # fmt: skip
    # Runs of report.heldout_files and train.eval_at_start (the recipe since they exist) add two columns.
    extra = [key for key in ("heldout_loss", "gap_recovered") if any(key in r for row in results["rows"]
                                                                      for r in row["runs"])]  # fmt: skip
    columns += [{"heldout_loss": "held-out (prose) loss", "gap_recovered": "gap recovered"}[key] for key in extra]
    lines = []
    for row in results["rows"]:
        runs = row["runs"]

        def cell(key: str, digits: int, runs: list[dict] = runs) -> str:
            s = mean_std(runs, key)
            return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if len(runs) > 1 else "")

        trained = "train_tokens_per_s" in runs[0]
        lines.append([
            row["label"], str(len(runs)), f"{runs[0]['non_embedding_params']:,}", f"{runs[0]['params']:,}",
            f"{runs[0]['bytes']:,}", cell("val_loss", 4), cell("agreement", 4),
            cell("train_tokens_per_s", 0) if trained else "—", cell("train_minutes", 1) if trained else "—",
            *(cell(key, 4) if key in runs[0] else "—" for key in extra),
        ])  # fmt: skip
    return columns, lines


def render(results: dict) -> str:
    columns, lines = table(results)
    o = results["overhead"]
    teacher = next(r for r in results["rows"] if r["key"] == "teacher")["runs"][0]
    qat = next(r for r in results["rows"] if r["key"] == "pruned_kd_qat")["runs"][0]
    kd = next(r for r in results["rows"] if r["key"] == "pruned_kd")["runs"]
    ce = next(r for r in results["rows"] if r["key"] == "pruned_ce")["runs"]
    deltas = ", ".join(f"{k['val_loss'] - c['val_loss']:+.4f} (seed {s})" for k, c, s in zip(kd, ce, results["seeds"]))
    spread = mean_std(ce, "val_loss")["std"]
    text = [
        START,
        "<!-- generated by `python -m benchmarks.llm --readme` from benchmarks/results/llm.json -->",
        "",
        f"`{results['command']}` ({results['wall_seconds'] / 60:.0f} min, load average "
        f"{results['load_average']['start']:.1f} at the start and {results['load_average']['end']:.1f} at the end, "
        f"{results['machine']['cpu_count']} CPU cores): {results['steps']} steps x {results['batch_size']} x "
        f"{results['block_size']} tokens = {results['tokens']:,} training tokens per row; val loss in nats/token "
        f"over {results['val_tokens']:,} tokens of held-out files; every figure on the export as transformers "
        "loads it. The teacher's bytes are its fp32 size.",
        "",
        markdown_table(columns, lines),
        "",
        f"- Pruned + KD less pruned + CE, seed by seed (the same batches): {deltas}; the CE seeds' spread (std) is "
        f"{spread:.4f}.",
        *kept_line(results),
        f"- int8 QAT export: {teacher['bytes'] / qat['bytes']:.2f}x smaller than the fp32 teacher; val loss "
        f"{100 * (qat['val_loss'] / statistics.fmean(r['val_loss'] for r in kd) - 1):+.1f}% against the dense KD "
        "student's.",
        "- Step time, trainer over a bare PyTorch/transformers KD loop (live teacher, the run's loss with "
        f"full-vocabulary forward KL, "
        f"{o['steps'] - o['warmup']} timed steps{remeasured(o)}): {o['trainer_ms']:.0f} ms / {o['bare_ms']:.0f} ms = "
        f"{o['ratio']:.3f}.",
        "",
        "Greedy completions (seed 1337's pruned + KD student, as transformers loads it):",
        "",
        *(
            f"- `{prompt!r}`: teacher `{results['completions']['teacher'][prompt]!r}`, student `{text!r}`"
            for prompt, text in results["completions"]["pruned + KD"].items()
        ),
        END,
    ]
    return "\n".join(text)


def kept_line(results: dict) -> list[str]:
    """The line naming the runs read back from an earlier run (``--keep``), if any."""
    kept = results.get("kept_runs")
    return [f"- Read back from an earlier run with the same overrides (`--keep`): {', '.join(kept)}."] if kept else []


def remeasured(o: dict) -> str:
    """Where the overhead was measured again on its own (``--overhead-only``): the command and the load."""
    if "command" not in o:
        return ""
    return f"; `{o['command']}`, load average {o['load_average']['start']:.1f} to {o['load_average']['end']:.1f}"


def write_readme(results: dict, readme: Path = RESULTS_DOC) -> None:
    """The section of ``readme``; for docs/results.md, README.md's headline too (it reads benchmarks/results)."""
    replace_section(readme, START, END, render(results))
    if readme == RESULTS_DOC:
        readme_results.write_headline()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every trained row")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds of the CE and KD rows")
    parser.add_argument("--timing-steps", type=int, default=12, help="KD steps timed by the trainer and bare loop")
    parser.add_argument("--teacher", help="a GGUF file or Hugging Face folder in place of SmolLM2 (tests)")
    parser.add_argument("--files", help="a corpus glob in place of the standard library (tests)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default outputs/benchmarks/llm)")
    parser.add_argument("--quick", action="store_true", help="a few steps; JSON and results fragment under --out")
    parser.add_argument("--readme", action="store_true", help="rewrite its docs section and README headline from JSON")
    parser.add_argument("--keep", nargs="+", default=[], choices=TRAINED_ROWS, help="rows whose runs are read back")
    parser.add_argument(
        "--overhead-only", action="store_true", help="measure the trainer/bare step ratio again (JSON, docs)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.timing_steps = 4, 6
    args.out = (args.out or REPO / "outputs" / "benchmarks" / ("llm-quick" if args.quick else "llm")).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    json_path = args.out / "llm.json" if args.quick else RESULTS_JSON
    readme = args.out / "README_llm.md" if args.quick else RESULTS_DOC
    if args.readme:
        write_readme(json.loads(RESULTS_JSON.read_text()))
        return
    if args.overhead_only:  # the base overrides (a test's teacher and files too) are the JSON's
        results = json.loads(json_path.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        os.chdir(args.out)
        load_before = os.getloadavg()[0]
        results["overhead"] = overhead(args.out, results["base_overrides"], args.timing_steps, 2)
        results["overhead"]["load_average"] = {"start": load_before, "end": os.getloadavg()[0]}
        results["overhead"]["command"] = command_line("benchmarks.llm", argv)
        json_path.write_text(json.dumps(results, indent=1))
        write_readme(results, readme)
        print(f"trainer/bare step: {results['overhead']['ratio']:.3f}")
        return
    seeds = [SEEDS[0] + i for i in range(args.seeds)]
    base = base_overrides(args.steps, args.teacher, args.files, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # relative paths (the teacher caches, a test's files) are the runs' own: they run here
    cfg, _ = compose_config(base)
    text, minutes = plan(args.steps, cfg.train.batch_size, cfg.sequence_length, seeds, args.timing_steps)
    print(text, flush=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    env = run_env()
    cut = as_cut(args.out, base)
    scratch_config = args.out / "scratch_config"  # the cut student's config.json alone: random init
    scratch_config.mkdir(exist_ok=True)
    shutil.copy(args.out / "pruned_as_cut" / "config.json", scratch_config / "config.json")
    trained: dict[str, list[dict]] = {}
    labels, kept_runs = {}, []
    for key, label, overrides in rows_to_train(seeds, scratch_config):
        group = key.split("/")[0]
        labels[group] = label
        if group in args.keep and (args.out / key / "side_by_side.json").exists():
            folder = args.out / key
            kept_runs.append(key)
        else:
            folder = train(args.out, key, [*base, *overrides], env)
        trained.setdefault(group, []).append(read_run(folder, label))
    first = trained["pruned_kd"][0]
    embedding = first["params"] - first["non_embedding_params"]  # the cut keeps the teacher's embedding whole
    teacher = {
        "label": "teacher (SmolLM2-135M-Instruct, dequantized)" if not args.teacher else "teacher",
        **first["teacher"],
        "non_embedding_params": first["teacher"]["params"] - embedding,
    }
    rows = [{"key": "teacher", "label": teacher["label"], "runs": [teacher]}]
    rows.append({"key": "scratch_ce", "label": labels["scratch_ce"], "runs": trained["scratch_ce"]})
    rows.append({"key": "pruned", "label": cut["label"], "runs": [cut]})
    rows += [{"key": k, "label": labels[k], "runs": trained[k]} for k in ("pruned_ce", "pruned_kd", "pruned_kd_qat")]
    results = {
        "command": command_line("benchmarks.llm", argv),
        "quick": args.quick,
        "steps": args.steps,
        "batch_size": cfg.train.batch_size,
        "block_size": cfg.sequence_length,
        "tokens": args.steps * cfg.train.batch_size * cfg.sequence_length,
        "seeds": seeds,
        "base_overrides": base,
        "planned_minutes": round(minutes, 1),
        "kept_runs": kept_runs,
        "rows": rows,
        "val_tokens": json.loads((args.out / "pruned_kd_qat" / "side_by_side.json").read_text())["val_tokens"],
        "completions": {"teacher": first["teacher_completions"], "pruned + KD": first["completions"]},
        "overhead": overhead(args.out, base, args.timing_steps, 2),
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "machine": {**machine(), "cpu_count": os.cpu_count()},
    }
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    json_path.write_text(json.dumps(results, indent=1))
    print_table(*table(results))
    if args.quick:
        readme.write_text(f"{START}\n{END}\n")
    write_readme(results, readme)
    print(f"wrote {json_path} and the results section of {readme}; {results['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
