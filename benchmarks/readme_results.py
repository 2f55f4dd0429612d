"""The quality section of docs/results.md and README.md's headline table, generated from the JSON in
``benchmarks/results/`` (never typed by hand).

``python -m benchmarks.readme_results`` rewrites the part of docs/results.md between the two ``results:quality``
markers from the JSON that ``python -m benchmarks.quality`` wrote (the benchmark calls ``write`` itself at its end),
and README.md's headline table between the ``results:headline`` markers from ``quality.json`` and ``llm.json``
(``python -m benchmarks.llm`` calls ``write_headline`` too). Every figure and every comparison in the text is computed
here from that JSON.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from benchmarks.readme_section import REPO, RESULTS_DOC, markdown_table, replace_section
from trainer.report import LATENCY_REPEATS

README = REPO / "README.md"
RESULTS_JSON = REPO / "benchmarks" / "results" / "quality.json"
LLM_JSON = REPO / "benchmarks" / "results" / "llm.json"
START, END = "<!-- results:quality:start -->", "<!-- results:quality:end -->"
HEADLINE_START, HEADLINE_END = "<!-- results:headline:start -->", "<!-- results:headline:end -->"
LLM_HEADLINE_ROWS = ("teacher", "scratch_ce", "pruned_ce", "pruned_kd", "pruned_kd_qat")
DISTILLED = ("forward_kl", "reverse_kl", "jsd", "features")
EXPORT_TARGET_RATIO = 6.0


def fmt(s: dict, digits: int) -> str:
    """``mean ± std`` of a stat, just the mean when there is one value."""
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def count(s: dict) -> str:
    return f"{round(s['mean']):,}" + (f" ± {s['std']:,.0f}" if s["std"] > 0 else "")


def variants(results: dict) -> dict[str, dict]:
    return {v["key"]: v for v in results["shakespeare"]["variants"]}


def shakespeare_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The Tiny Shakespeare table: teacher, every student row, and the export of the last one."""
    sh = results["shakespeare"]
    scratch = variants(results)["scratch"]["student"]["val_loss"]["mean"]
    columns = [
        "model",
        "steps",
        "val loss",
        "Δ vs scratch",
        "params",
        "bytes on disk",
        "CPU latency (ms)",
        "training (s)",
    ]

    def row(label: str, steps: int, figures: dict, train: str, is_scratch: bool = False) -> list[str]:
        delta = "—" if is_scratch else f"{figures['val_loss']['mean'] - scratch:+.4f}"
        return [
            label,
            f"{steps:,}",
            fmt(figures["val_loss"], 4),
            delta,
            count(figures["params"]),
            count(figures["bytes"]),
            fmt(figures["latency_ms"], 2),
            train,
        ]

    t = sh["teacher"]
    rows = [row(f"teacher ({t['steps']:,} steps by its recipe)", t["steps"], t, fmt(t["train_seconds"], 1))]
    for v in sh["variants"]:
        rows.append(
            row(
                v["label"],
                sh["steps"],
                v["student"],
                fmt(v["student"]["train_seconds"], 1),
                is_scratch=v["key"] == "scratch",
            )
        )
        if "export" in v:
            rows.append(row("↳ its export (int8 codes + sparse bitmask)", sh["steps"], v["export"], "(same run)"))
    return columns, rows


def digits_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    d = results["digits"]
    columns = [
        "net",
        "architecture",
        f"test errors (of {d['test_examples']})",
        "per seed",
        "Hinton et al. 2015, MNIST (of 10,000)",
    ]
    rows = [
        [
            r["label"],
            r["arch"],
            fmt(r["errors"], 1),
            ", ".join(str(run["errors_curve"][-1][1]) for run in r["runs"]),
            str(r["hinton_mnist_errors"]),
        ]
        for r in d["rows"]
    ]
    return columns, rows


def distillation_finding(results: dict) -> str:
    """Whether the distilled students beat the scratch student at equal steps, and by how much against seed noise."""
    sh, by_key = results["shakespeare"], variants(results)
    scratch = by_key["scratch"]["student"]["val_loss"]
    distilled = [by_key[k] for k in DISTILLED if k in by_key]
    best = min(distilled, key=lambda v: v["student"]["val_loss"]["mean"])
    better = [v for v in distilled if v["student"]["val_loss"]["mean"] < scratch["mean"]]
    d = sh["distill"]
    tried = (
        f"forward KL, reverse KL and JSD (β={d['beta']}) at α={d['alpha']}, T={d['temperature']}, and forward KL "
        "plus hidden-state matching (the `conf/distill` defaults); no other settings were searched"
    )
    b = best["student"]["val_loss"]
    if not better:
        return (
            f"**The distilled student is not better than the student from scratch at {sh['steps']:,} steps**: the "
            f"best distilled row ({best['label']}) reaches {b['mean']:.4f} against {scratch['mean']:.4f} from "
            f"scratch. What was tried: {tried}."
        )
    margin = scratch["mean"] - b["mean"]
    spread = max(scratch["std"], b["std"])
    noise = ("larger than" if margin > spread else "within") + f" the spread over seeds (std up to {spread:.4f})"
    return (
        f"At {sh['steps']:,} steps, {len(better)} of {len(distilled)} distilled students reach a lower validation "
        f"loss than the student from scratch; the best, {best['label']}, by {margin:.4f} nats/char "
        f"({b['mean']:.4f} against {scratch['mean']:.4f}), {noise}. Settings: {tried}."
    )


def export_finding(results: dict) -> str:
    by_key = variants(results)
    pq = by_key["prune_qat"]
    dense_bytes, export_bytes = pq["student"]["bytes"]["mean"], pq["export"]["bytes"]["mean"]
    ratio = dense_bytes / export_bytes
    met = "meets" if ratio >= EXPORT_TARGET_RATIO else "**misses**"
    reference = by_key["forward_kl"]["student"]
    return (
        f"The pruned + int8 QAT export is {ratio:.2f}x smaller on disk than the fp32 student "
        f"({export_bytes:,.0f} against {dense_bytes:,.0f} bytes; this {met} the {EXPORT_TARGET_RATIO:g}x target), "
        f"at val loss {pq['export']['val_loss']['mean']:.4f} (the dense forward-KL student: "
        f"{reference['val_loss']['mean']:.4f}) and {pq['export']['latency_ms']['mean']:.2f} ms CPU latency "
        f"(dense: {reference['latency_ms']['mean']:.2f} ms)."
    )


def digits_finding(results: dict) -> str:
    rows = {r["key"]: r["errors"]["mean"] for r in results["digits"]["rows"]}
    h = {r["key"]: r["hinton_mnist_errors"] for r in results["digits"]["rows"]}
    gap = rows["scratch"] - rows["teacher"]
    theirs = (h["scratch"] - h["distilled"]) / (h["scratch"] - h["teacher"])
    if gap <= 0:
        return (
            f"Here the small net from scratch makes no more errors than the teacher ({rows['scratch']:.1f} against "
            f"{rows['teacher']:.1f}), so there is no gap for distillation to close."
        )
    closed = (rows["scratch"] - rows["distilled"]) / gap
    spread = max(r["errors"]["std"] for r in results["digits"]["rows"] if r["key"] != "teacher")
    noise = "larger than" if abs(rows["scratch"] - rows["distilled"]) > spread else "within"
    return (
        f"Distillation closes {closed:.0%} of the gap between the small net from scratch and the teacher "
        f"({rows['scratch']:.1f} → {rows['distilled']:.1f} errors; teacher {rows['teacher']:.1f}), a difference "
        f"{noise} the spread over seeds (std up to {spread:.1f} errors); Hinton et al. closed {theirs:.0%} on "
        "MNIST (146 → 74; teacher 67)."
    )


def reproduce_line(results: dict) -> str:
    m = results["machine"]
    threads = f"OMP_NUM_THREADS={results['threads']} per run" if results["threads"] else "torch's default threads"
    teacher = (
        "including training the teacher"
        if results["teacher_trained_in_this_run"]
        else "reusing the quickstart's teacher"
    )
    return (
        f"Reproduce with `{results['command']}`: it took {results['wall_seconds'] / 60:.1f} minutes on "
        f"{m['cpu_count']} CPU cores ({m['cpu']}, torch {m['torch']}, {threads}; the machine was shared, load "
        f"average {results['load_average']['start']:.1f} at the start and {results['load_average']['end']:.1f} at "
        f"the end), {teacher}. Every figure comes from the runs' own `report.json` and `metrics.jsonl`."
    )


def shakespeare_setup(results: dict) -> str:
    sh = results["shakespeare"]
    start, end = sh["steps"] // 10, sh["steps"] * 6 // 10
    return (
        f"Every student is the quickstart's {sh['student_arch']} trained {sh['steps']:,} steps (batch 12 x 64 "
        f"characters, the quickstart's LR schedule), mean ± std over {len(sh['seeds'])} seeds "
        f"({', '.join(map(str, sh['seeds']))}); the teacher is the quickstart's {sh['teacher_arch']}. Pruning and "
        "QAT follow `conf/compress` with the quickstart's timing scaled to the budget (AGP over steps "
        f"{start:,}-{end:,}, int8 QAT from step {end:,}). Latency: median of {LATENCY_REPEATS} CPU forward "
        f"passes on a fixed batch of {' x '.join(map(str, sh['latency_batch']))} tokens, the teacher's measured "
        "in the distilled runs beside their students; training: the loop's time (no start-up, export or report), "
        "the teacher's from its own run's report."
    )


def digits_setup(results: dict) -> str:
    dg = results["digits"]
    return (
        f"Each net trained {dg['steps']:,} steps (batch 64) per seed ({', '.join(map(str, dg['seeds']))}); the "
        f"distilled net learns from the teacher of its seed (α={dg['distill']['alpha']}, "
        f"T={dg['distill']['temperature']}). Errors on the {dg['test_examples']} held-out digits; Hinton et al.'s "
        "figures are on MNIST's 10,000 test images with larger nets (1200-1200 teacher, 800-800 small net)."
    )


def render(results: dict, results_dir: Path, readme: Path) -> str:
    """The section between the markers (markers included), image paths relative to ``readme``."""
    image = {
        name: Path(os.path.relpath(results_dir / file, readme.parent)).as_posix()
        for name, file in results["plots"].items()
    }
    return "\n".join(
        [
            START,
            "<!-- generated by `python -m benchmarks.readme_results` from benchmarks/results/quality.json -->",
            "",
            reproduce_line(results),
            "",
            "### Tiny Shakespeare: distillation and compression at equal steps",
            "",
            shakespeare_setup(results),
            "",
            markdown_table(*shakespeare_rows(results)),
            "",
            f"- {distillation_finding(results)}",
            f"- {export_finding(results)}",
            "",
            f"![validation loss against steps]({image['val_loss']})",
            "",
            f"![sparsity and bits against steps]({image['compression']})",
            "",
            (
                "Compressed rows, from `compress/*` in `metrics.jsonl` (mean over seeds): the pruned weights' "
                "sparsity, and the export's bits per weight and size as they would be at that step (QAT targets "
                "count as int8 from the start, since that is how the export stores them; the dotted line marks where "
                "fake-quant starts)."
            ),
            "",
            "### scikit-learn digits, in the manner of Hinton et al. 2015",
            "",
            digits_setup(results),
            "",
            markdown_table(*digits_rows(results)),
            "",
            f"- {digits_finding(results)}",
            END,
        ]
    )


def write(results: dict, results_dir: Path, readme: Path) -> None:
    """Replace the marked section of ``readme``; a file that does not exist yet gets the section alone."""
    section = render(results, results_dir, readme)
    if not readme.exists():
        readme.write_text(section + "\n")
        return
    replace_section(readme, START, END, section)


def llm_stat(runs: list[dict], key: str) -> dict:
    """A figure of the llm benchmark's runs (one per seed) as ``fmt`` and ``count`` take it."""
    values = [r[key] for r in runs]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def headline_rows(quality: dict, llm: dict) -> tuple[list[str], list[list[str]]]:
    """README's headline: the Tiny Shakespeare teacher, the student from scratch, the best distilled student and the
    pruned + int8 QAT export; then the SmolLM2 teacher and the llm benchmark's key rows."""
    sh, by_key = quality["shakespeare"], variants(quality)
    best = min((by_key[k] for k in DISTILLED if k in by_key), key=lambda v: v["student"]["val_loss"]["mean"])
    columns = ["benchmark", "model", "params", "bytes on disk", "val loss"]

    def row(bench: str, label: str, figures: dict) -> list[str]:
        return [bench, label, count(figures["params"]), count(figures["bytes"]), fmt(figures["val_loss"], 4)]

    rows = [
        row("Tiny Shakespeare (the quickstart's models)", f"teacher, {sh['teacher_arch']}", sh["teacher"]),
        row("", f"student from scratch, {sh['student_arch']}", by_key["scratch"]["student"]),
        row("", f"{best['label']} (the best distilled)", best["student"]),
        row("", "distilled + pruning + int8 QAT, its export", by_key["prune_qat"]["export"]),
    ]
    llm_rows = {r["key"]: r for r in llm["rows"]}
    for i, key in enumerate(LLM_HEADLINE_ROWS):
        runs = llm_rows[key]["runs"]
        figures = {k: llm_stat(runs, k) for k in ("params", "bytes", "val_loss")}
        rows.append(row("" if i else "SmolLM2 (`experiment=smollm2`)", llm_rows[key]["label"], figures))
    return columns, rows


def headline_table(columns: list[str], rows: list[list[str]]) -> str:
    """``markdown_table`` with its first two columns (benchmark, model) left-aligned."""
    lines = markdown_table(columns, rows).split("\n")
    return "\n".join([lines[0], "|---|---|" + "---:|" * (len(columns) - 2), *lines[2:]])


def headline(quality: dict, llm: dict) -> str:
    """README's headline section (markers included)."""
    sh, pq = quality["shakespeare"], variants(quality)["prune_qat"]
    llm_rows = {r["key"]: r["runs"] for r in llm["rows"]}
    teacher_bytes, qat_bytes = llm_rows["teacher"][0]["bytes"], llm_rows["pruned_kd_qat"][0]["bytes"]
    return "\n".join(
        [
            HEADLINE_START,
            "<!-- generated by `python -m benchmarks.readme_results` from benchmarks/results/quality.json and "
            "llm.json -->",
            "",
            headline_table(*headline_rows(quality, llm)),
            "",
            f"On {quality['machine']['cpu_count']} CPU cores. Tiny Shakespeare (`python -m benchmarks.quality`): the "
            f"teacher trained {sh['teacher']['steps']:,} steps by its recipe, every student {sh['steps']:,} steps, "
            f"mean ± std over {len(sh['seeds'])} seeds, val loss in nats/character; the export is "
            f"{pq['student']['bytes']['mean'] / pq['export']['bytes']['mean']:.2f}x smaller than the fp32 student. "
            "SmolLM2 (`python -m benchmarks.llm`): SmolLM2-135M-Instruct, the students' architecture from random init "
            f"(scratch) and the student cut out of the teacher (pruned), {llm['tokens']:,} training tokens per row, "
            "mean ± std over seeds where there are several, val loss in nats/token on held-out Python files; the int8 "
            f"QAT student is {teacher_bytes / qat_bytes:.2f}x smaller than the fp32 teacher. Every table, its settings "
            "and what it does and does not show: [docs/results.md](docs/results.md).",
            HEADLINE_END,
        ]
    )


def write_headline(readme: Path = README) -> None:
    """Replace README's headline section from the committed quality.json and llm.json."""
    quality, llm = json.loads(RESULTS_JSON.read_text()), json.loads(LLM_JSON.read_text())
    replace_section(readme, HEADLINE_START, HEADLINE_END, headline(quality, llm))


def main() -> None:
    results = json.loads(RESULTS_JSON.read_text())
    write(results, RESULTS_JSON.parent, RESULTS_DOC)
    write_headline()
    print(f"rewrote the results section of {RESULTS_DOC} from {RESULTS_JSON}, and the headline of {README}")


if __name__ == "__main__":
    main()
