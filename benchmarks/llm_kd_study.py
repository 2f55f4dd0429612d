"""Why pruned + KD does or does not beat pruned + CE on SmolLM2: KD variants at ``benchmarks.llm``'s token budget.

Every variant trains the same cut student on the same seeds (the same batches) as the llm benchmark's pruned + CE
rows, and is compared with the run it is paired with on its own seed (a paired difference: the seeds change the
data order). The CE rows are read from ``benchmarks/results/llm.json`` when that run had the same base overrides,
and trained here otherwise (``--quick``). Variants (each names its ``distill.alpha``, so that it does not move with
the recipe's default):

- ``alpha1``: KD alone (forward KL, the cached top-64 with its tail, T=1), no cross-entropy on the data;
- ``full_vocab``: KD alone against the live teacher's whole vocabulary (no top-k cache): does the cache lose signal?
- ``t2_alpha0.5``: half KD at temperature 2, half cross-entropy (a cache of its own, built by its first run);
- ``lr1e-3_ce`` and ``lr1e-3_kd``: CE alone and the recipe's KD (alpha 0.5) at a peak learning rate of 1e-3 (the
  recipe's was 3e-4 when the study ran; it is 1e-3 now), the KD runs paired with the CE runs at the same rate
  (a variant's ``against``).

Writes ``benchmarks/results/llm_kd_study.json`` and the docs/results.md section between the ``results:llm_kd_study``
markers; ``--readme`` rewrites that section from the JSON alone. ``--reuse`` keeps a run folder that already holds
its ``side_by_side.json`` (a study stopped midway goes on where it was).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, compose_config, machine, print_table, run_env
from benchmarks.llm import CE, LIVE_FULL_VOCABULARY, NO_QAT, RESULTS_JSON, SEEDS, base_overrides, read_run, train
from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, replace_section

REPO = Path(__file__).resolve().parent.parent
STUDY_JSON = RESULTS / "llm_kd_study.json"
START, END = "<!-- results:llm_kd_study:start -->", "<!-- results:llm_kd_study:end -->"
LR_1E3 = ["train.lr=1.0e-3", "train.min_lr=1.0e-4"]


@dataclass(frozen=True)
class Variant:
    """A variant's overrides (on the base and ``NO_QAT``) and the variant its runs are paired with (None: pruned +
    CE at the recipe's settings)."""

    overrides: list[str]
    against: str | None = None


VARIANTS = {
    "alpha1": Variant(["distill.alpha=1.0"]),
    "full_vocab": Variant([*LIVE_FULL_VOCABULARY, "distill.alpha=1.0"]),
    "t2_alpha0.5": Variant(["distill.temperature=2.0", "distill.alpha=0.5"]),
    "lr1e-3_ce": Variant([*CE, *LR_1E3]),
    "lr1e-3_kd": Variant(["distill.alpha=0.5", *LR_1E3], against="lr1e-3_ce"),
}


def with_references(keys: list[str]) -> list[str]:
    """``keys`` in order, each preceded by the variant it is paired with when that is not already there."""
    ordered: list[str] = []
    for key in keys:
        for needed in (VARIANTS[key].against, key):
            if needed is not None and needed not in ordered:
                ordered.append(needed)
    return ordered


def published_ce(base: list[str], seeds: list[int]) -> dict[int, dict] | None:
    """The llm benchmark's pruned + CE runs by seed, when its JSON ran on ``base`` with every one of ``seeds``."""
    if not RESULTS_JSON.exists():
        return None
    results = json.loads(RESULTS_JSON.read_text())
    if results["base_overrides"] != base or not set(seeds) <= set(results["seeds"]):
        return None
    runs = next(row["runs"] for row in results["rows"] if row["key"] == "pruned_ce")
    return {seed: run for seed, run in zip(results["seeds"], runs, strict=True) if seed in seeds}


def run_once(out: Path, key: str, overrides: list[str], env: dict, label: str, reuse: bool) -> dict:
    """The figures of run ``key``: trained now, or read back from its folder under ``--reuse``."""
    folder = out / key
    if not (reuse and (folder / "side_by_side.json").exists()):
        folder = train(out, key, overrides, env)
    return read_run(folder, label)


def paired(variant: list[dict], reference: dict[int, dict], seeds: list[int]) -> dict:
    """Each seed's val loss less the ``reference`` run's (runs by seed: pruned + CE or another variant) of the same
    seed; their mean and the reference seeds' own spread (the JSON keeps its ``ce_`` names)."""
    deltas = [run["val_loss"] - reference[seed]["val_loss"] for run, seed in zip(variant, seeds, strict=True)]
    reference_losses = [reference[seed]["val_loss"] for seed in seeds]
    spread = statistics.stdev(reference_losses) if len(reference_losses) > 1 else 0.0
    mean = statistics.fmean(deltas)
    return {"deltas": deltas, "mean_delta": mean, "ce_seed_std": spread,
            "below_ce_beyond_spread": all(d < 0 for d in deltas) and -mean > spread}  # fmt: skip


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    seeds = results["seeds"]
    columns = ["variant", "overrides", "paired with", *(f"val loss s{s}" for s in seeds),
               *(f"Δ s{s}" for s in seeds), "mean Δ", "top-1 agr.", "train min"]  # fmt: skip
    lines = [["pruned + CE", "`" + " ".join(CE[:2]) + "`", "—", *(f"{r['val_loss']:.4f}" for r in results["ce"]),
              *("0" for _ in seeds), "0", f"{statistics.fmean(r['agreement'] for r in results['ce']):.4f}",
              f"{statistics.fmean(r['train_minutes'] for r in results['ce']):.1f}"]]  # fmt: skip
    for v in results["variants"]:
        runs = v["runs"]
        lines.append([
            v["key"], "`" + " ".join(v["overrides"]) + "`", v.get("against") or "pruned + CE",
            *(f"{r['val_loss']:.4f}" for r in runs),
            *(f"{d:+.4f}" for d in v["paired"]["deltas"]), f"{v['paired']['mean_delta']:+.4f}",
            f"{statistics.fmean(r['agreement'] for r in runs):.4f}",
            f"{statistics.fmean(r['train_minutes'] for r in runs):.1f}",
        ])  # fmt: skip
    return columns, lines


def render(results: dict) -> str:
    columns, lines = table(results)
    spread = statistics.stdev(r["val_loss"] for r in results["ce"]) if len(results["ce"]) > 1 else 0.0
    verdicts = [
        f"- `{v['key']}`: {'' if v['paired']['below_ce_beyond_spread'] else 'not '}below "
        f"{v.get('against') or 'pruned + CE'} by more than that one's seed spread ({v['paired']['ce_seed_std']:.4f})"
        for v in results["variants"]
    ]
    return "\n".join([
        START,
        "<!-- generated by `python -m benchmarks.llm_kd_study --readme` from benchmarks/results/llm_kd_study.json -->",
        "",
        f"`{results['command']}` ({results['wall_seconds'] / 60:.0f} min, load average "
        f"{results['load_average']['start']:.1f} to {results['load_average']['end']:.1f}): {results['tokens']:,} "
        f"training tokens per run, as in the table above; pruned + CE from {results['ce_source']}. Δ is a run's "
        f"val loss less that of the run it is paired with on the same seed (same batches); pruned + CE's own seed "
        f"spread (std) is {spread:.4f}.",
        "",
        markdown_table(columns, lines),
        "",
        *verdicts,
        END,
    ])  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (llm's default)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds of every variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to train (with the ones they are paired with)")  # fmt: skip
    parser.add_argument("--teacher", help="a GGUF file or Hugging Face folder in place of SmolLM2 (tests)")
    parser.add_argument("--files", help="a corpus glob in place of the standard library (tests)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default outputs/benchmarks/llm)")
    parser.add_argument("--quick", action="store_true", help="a few steps; JSON and results fragment under --out")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose folder has its side_by_side.json")
    parser.add_argument("--readme", action="store_true", help="rewrite the docs/results.md section from the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 4
    args.out = (args.out or REPO / "outputs" / "benchmarks" / ("llm-quick" if args.quick else "llm")).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    json_path = args.out / "llm_kd_study.json" if args.quick else STUDY_JSON
    readme = args.out / "README_llm_kd_study.md" if args.quick else RESULTS_DOC
    if args.readme:
        replace_section(RESULTS_DOC, START, END, render(json.loads(STUDY_JSON.read_text())))
        return
    seeds = [SEEDS[0] + i for i in range(args.seeds)]
    base = base_overrides(args.steps, args.teacher, args.files, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # the llm benchmark's folder: its data and teacher caches are reused
    cfg, _ = compose_config(base)
    keys = with_references(args.variants)
    print(f"plan: {len(keys)} variants x {len(seeds)} seeds of {args.steps} steps", flush=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    env = run_env()
    ce = published_ce(base, seeds)
    source = "benchmarks/results/llm.json"
    if ce is None:
        source = "runs of this study"
        ce = {s: run_once(args.out, f"pruned_ce/seed{s}", [*base, *CE, *NO_QAT, f"train.seed={s}"], env,
                          "pruned + CE", args.reuse) for s in seeds}  # fmt: skip
    variants, by_key = [], {}
    for key in keys:
        variant = VARIANTS[key]
        runs = [
            run_once(args.out, f"study/{key}/seed{s}", [*base, *NO_QAT, *variant.overrides, f"train.seed={s}"], env,
                     key, args.reuse)
            for s in seeds
        ]  # fmt: skip
        by_key[key] = dict(zip(seeds, runs, strict=True))
        reference = ce if variant.against is None else by_key[variant.against]
        variants.append({"key": key, "overrides": variant.overrides, "against": variant.against, "runs": runs,
                         "paired": paired(runs, reference, seeds)})  # fmt: skip
    results = {
        "command": command_line("benchmarks.llm_kd_study", argv),
        "quick": args.quick,
        "steps": args.steps,
        "tokens": args.steps * cfg.train.batch_size * cfg.sequence_length,
        "seeds": seeds,
        "base_overrides": base,
        "ce_source": source,
        "ce": [ce[s] for s in seeds],
        "variants": variants,
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "machine": {**machine(), "cpu_count": os.cpu_count()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    json_path.write_text(json.dumps(results, indent=1))
    print_table(*table(results))
    if args.quick:
        readme.write_text(f"{START}\n{END}\n")
    replace_section(readme, START, END, render(results))
    print(f"wrote {json_path} and the results section of {readme}; {results['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
