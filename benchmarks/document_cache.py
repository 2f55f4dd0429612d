"""The teacher cache kept by document on a real LLM: SmolLM2-135M-Instruct (the GGUF of ``experiment=smollm2``,
49,152 tokens) cached at k = 64 over a slice of the standard library (``json`` and ``logging``), then read by a
student of another tokenizer (``benchmarks.cross_tokenizer``'s 4-layer Llama of its own byte-level BPE). Reports
the cache's bytes per teacher token on disk, file by file, the build's speed, and a student's steps three ways at
equal tokens: from the cache, from the live teacher aligned by span, and cross-entropy alone (the time a step spends
on its teacher, the share of its positions aligned, the teacher's probability on the shared tokens there).

Writes ``benchmarks/results/document_cache.json`` and the docs/results.md section between the
``results:document_cache`` markers; ``--readme`` rewrites that section from the JSON alone. ``--quick --teacher DIR
--files GLOB --vocab N``: a few steps with a test's teacher and files, JSON and section under ``--out``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, print_table, recipe_parser, run_env
from benchmarks.cross_tokenizer import files_of, smollm2_teacher, student_folder
from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, publish, replace_section

RESULTS_JSON = RESULTS / "document_cache.json"
START, END = "<!-- results:document_cache:start -->", "<!-- results:document_cache:end -->"
TOP_K = 64
CACHE = ["teacher.placement=cache", "teacher.cache_layout=documents", "teacher.cache_dtype=compact",
         "teacher.cache_dir=cache", f"distill.top_k={TOP_K}"]  # fmt: skip
ROWS = {  # the student's runs: each step's teacher from the cache, live, or none
    "cache": ["distill=kd", "distill.alpha=0.5", "distill.temperature=1.0", *CACHE],
    "live": ["distill=kd", "distill.alpha=0.5", "distill.temperature=1.0", "distill.align=span"],
    "ce": ["distill=none"],
}
LABELS = {"cache": "KD from the cache", "live": "KD from the live teacher (span)", "ce": "cross-entropy alone"}


def overrides(student: Path, teacher: str, files: list[Path], steps: int, quick: bool) -> list[str]:
    sizes = ["student.block_size=32", "train.batch_size=2", "data.eval_batches=2"] if quick else [
        "student.block_size=256", "train.batch_size=4", "data.eval_batches=4",
    ]  # fmt: skip
    listed = ",".join(f"'{f}'" for f in files)
    kind = "teacher=gguf" if teacher.endswith(".gguf") else "teacher=hf"
    return [
        "data=text", f"data.files=[{listed}]", f"data.tokenizer={student}", "data.val_fraction=0.06", "student=hf",
        f"student.path={student}", kind, f"teacher.checkpoint={teacher}",
        f"train.max_steps={steps}", "train.lr=1.0e-3", "train.min_lr=1.0e-4",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
        "logger=console", "logger.progress=false", "logger.log_every=1", "report.side_by_side=false", *sizes,
    ]  # fmt: skip


def call(out: Path, name: str, command: list[str]) -> float:
    """Run ``command`` in ``out`` (its output kept in ``out/logs/name.log``); its seconds."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=run_env(), capture_output=True, text=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{name}.log").write_text(f"{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def build(out: Path, base: list[str]) -> dict:
    """``python -m trainer.cache`` over the corpus; the cache's counts, bytes by file and build seconds."""
    shutil.rmtree(out / "cache", ignore_errors=True)
    seconds = call(out, "build", [sys.executable, "-m", "trainer.cache", *base, *CACHE, "hydra.run.dir=build"])
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    positions = manifest["positions"]
    files = {f.name: f.stat().st_size for f in sorted((out / "cache").iterdir()) if f.is_file()}
    return {
        "documents": manifest["documents"],
        "teacher_tokens": positions,
        "windows": manifest["windows"],
        "window": manifest["window"],
        "teacher_vocab": manifest["vocab"],
        "seconds": round(seconds, 1),
        "teacher_tokens_per_s": round(positions / seconds, 1),
        "bytes_per_teacher_token": {name: size / positions for name, size in files.items()},
        "total_bytes_per_teacher_token": sum(files.values()) / positions,
    }


def train(out: Path, key: str, base: list[str]) -> dict:
    """The student's run ``key``; its median step and teacher times (the first step left out) and what it aligned."""
    run_dir = out / f"run_{key}"
    shutil.rmtree(run_dir, ignore_errors=True)
    call(out, key, [sys.executable, "-m", "trainer", *base, *ROWS[key], f"hydra.run.dir={run_dir.name}"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_ms" in r][1:]
    result = {
        "step_ms": statistics.median(r["perf/step_ms"] for r in steps),
        "bits_per_byte": [r for r in rows if "eval/bits_per_byte" in r][-1]["eval/bits_per_byte"],
    }
    if key != "ce":
        result["teacher_ms"] = statistics.median(r["distill/teacher_ms"] for r in steps)
        trained = [r for r in rows if "distill/aligned_fraction" in r]
        result["aligned_fraction"] = statistics.mean(r["distill/aligned_fraction"] for r in trained)
        result["shared_mass"] = statistics.mean(r["distill/shared_mass"] for r in trained)
    print(f"{key}: {result}", flush=True)
    return result


def render(results: dict) -> str:
    cache, runs = results["cache"], results["runs"]
    per_file = ", ".join(f"{name} {size:.1f}" for name, size in cache["bytes_per_teacher_token"].items() if size >= 1)
    rows = [
        [LABELS[key], f"{run['step_ms']:,.0f}", f"{run['teacher_ms']:,.0f}" if "teacher_ms" in run else "—",
         f"{run['aligned_fraction']:.3f}" if "aligned_fraction" in run else "—",
         f"{run['shared_mass']:.3f}" if "shared_mass" in run else "—", f"{run['bits_per_byte']:.4f}"]
        for key, run in runs.items()
    ]  # fmt: skip
    rows_bytes = sum(cache["bytes_per_teacher_token"][name] for name in ("values.bin", "indices.bin", "tail.bin"))
    speedup = runs["live"]["teacher_ms"] / max(runs["cache"]["teacher_ms"], 1e-9)
    return "\n".join([
        START,
        "<!-- generated by `python -m benchmarks.document_cache --readme` from "
        "benchmarks/results/document_cache.json -->",
        "",
        f"`{results['command']}`: {results['teacher_name']} ({cache['teacher_vocab']:,} tokens) cached by document at "
        f"top-{results['top_k']} over {cache['documents']} files ({cache['teacher_tokens']:,} teacher tokens in "
        f"{cache['windows']} windows of at most {cache['window']}), in {cache['seconds']:,.0f} s "
        f"({cache['teacher_tokens_per_s']:,.0f} teacher tokens a second). "
        f"**{cache['total_bytes_per_teacher_token']:.1f} bytes per teacher token on disk** (by file: {per_file}), "
        f"of which the compact rows (values, ids, tail) are {rows_bytes:.1f}, as in the cache of batches. A student of "
        f"its own {results['student_vocab']:,}-token BPE then trains {results['steps']} steps of "
        f"{results['tokens_per_step']:,} tokens each way (seed 0; median step times, the first step left out): "
        f"reading the cache costs {speedup:,.0f}x less time a step than the live teacher does.",
        "",
        markdown_table(["student's teacher", "step ms", "teacher ms", "aligned fraction", "shared mass",
                        "val bits per byte"], rows),  # fmt: skip
        END,
    ])  # fmt: skip


def main() -> None:
    parser = recipe_parser(__doc__.splitlines()[0], "document_cache")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=8192, help="the student's BPE vocabulary")
    args = parser.parse_args()
    if args.readme:
        replace_section(RESULTS_DOC, START, END, render(json.loads(RESULTS_JSON.read_text())))
        return
    import sysconfig

    from trainer.data import tokenizer

    teacher = smollm2_teacher(args.teacher)
    stdlib = sysconfig.get_paths()["stdlib"]
    patterns = [str(Path(args.files).absolute())] if args.files else [f"{stdlib}/json/*.py", f"{stdlib}/logging/*.py"]
    files = [f for pattern in patterns for f in files_of(pattern)]
    steps = 3 if args.quick else args.steps
    out = (args.out or Path(__file__).resolve().parent.parent / "outputs" / "benchmarks" / "document_cache").resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = student_folder(out / "student", files, args.vocab)
    base = overrides(student, teacher, files, steps, args.quick)
    cache = build(out, base)
    runs = {key: train(out, key, base) for key in ROWS}
    results = {
        "command": command_line("benchmarks.document_cache", sys.argv[1:]),
        "machine": machine(),
        "teacher_name": Path(teacher).name,
        "student_vocab": len(tokenizer.load(str(student))),
        "top_k": TOP_K,
        "steps": steps,
        "tokens_per_step": 2 * 32 if args.quick else 4 * 256,
        "cache": cache,
        "runs": runs,
    }
    print_table(
        ["run", "step ms", "teacher ms", "aligned", "shared", "bits/byte"],
        [[key, f"{r['step_ms']:.0f}", f"{r.get('teacher_ms', 0):.0f}", f"{r.get('aligned_fraction', 0):.3f}",
          f"{r.get('shared_mass', 0):.3f}", f"{r['bits_per_byte']:.4f}"] for key, r in runs.items()],
    )  # fmt: skip
    print(f"cache: {cache['total_bytes_per_teacher_token']:.1f} bytes per teacher token, {cache['teacher_tokens']} "
          f"tokens in {cache['seconds']} s")  # fmt: skip
    json_path = out / "document_cache.json" if args.quick else RESULTS_JSON
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    publish(render(results), START, END, "The cache kept by document (`benchmarks.document_cache`)",
            out / "README_document_cache.md" if args.quick else None)  # fmt: skip
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
