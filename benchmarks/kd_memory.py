"""Peak memory and time of one forward+backward of logit distillation at LLM vocabularies, from the models' last
hidden states and heads (the heads' matmuls included), forward KL at T=2:

- ``naive``: full logits of both models, ``F.kl_div`` of their log-softmaxes;
- ``chunked``: full logits of both models, ``kd_loss`` over chunks of tokens;
- ``fused``: ``fused_linear_kd_loss`` (no full logits of either model).

Every case runs in a fresh process. CPU (fp32): the resident-set high-water mark above the process's resident set
once the inputs exist (Linux: reset through ``/proc/self/clear_refs``), under an address-space limit so that a case
that does not fit fails its allocation (recorded as out of memory) instead of pressing on a shared machine; a case
whose full-size tensors alone exceed the limit is recorded as such without running. CUDA (bf16, when a GPU is
present): ``max_memory_allocated`` above the inputs. Writes ``benchmarks/results/kd_memory.json``, prints the table
and rewrites its section of docs/results.md from the JSON.

    python -m benchmarks.kd_memory [--vocab 49152 128256] [--tokens 2048 8192] [--hidden 576 2048] [--quick]
    python -m benchmarks.kd_memory --readme   # the docs/results.md section from the JSON alone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.readme_section import RESULTS_DOC, command_line, markdown_table, replace_section
from trainer.distill.fused import FUSED_CHUNK_SIZE
from trainer.distill.losses import fused_linear_kd_loss, kd_loss

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = REPO / "benchmarks" / "results" / "kd_memory.json"
START, END = "<!-- results:kd_memory:start -->", "<!-- results:kd_memory:end -->"
RESULT_PREFIX = "kd-memory-result: "
METHODS = ("naive", "chunked", "fused")
# Full [tokens, V] fp32 tensors each method holds at once at least: naive both logits, both log-softmaxes and the
# divergence's elementwise product; chunked both logits and the student's gradient buffer.
FULL_COPIES = {"naive": 5, "chunked": 3, "fused": 0}
TEMPERATURE, CHUNK = 2.0, FUSED_CHUNK_SIZE  # the loop's chunk when distill.chunk_size is not set
GiB = 2**30


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None, f"/proc/self/status has no {key}"
    return int(match.group(1))


def loss_of(method: str, s_hidden, s_weight, t_hidden, t_weight) -> torch.Tensor:
    """The KD loss of ``method`` from both models' hidden states and head weights (the heads' matmuls included)."""
    if method == "fused":
        return fused_linear_kd_loss(
            s_hidden, s_weight, t_hidden, t_weight, kind="forward_kl", temperature=TEMPERATURE, chunk_size=CHUNK
        )
    s_logits = s_hidden @ s_weight.T
    with torch.no_grad():
        t_logits = t_hidden @ t_weight.T
    if method == "chunked":
        return kd_loss(s_logits, t_logits, kind="forward_kl", temperature=TEMPERATURE, chunk_size=CHUNK)
    log_p_s = F.log_softmax(s_logits.float() / TEMPERATURE, dim=-1)
    log_p_t = F.log_softmax(t_logits.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * TEMPERATURE**2


def run_case(case: dict) -> dict:
    """One forward+backward of ``case`` in this process: its loss, peak bytes above the inputs and seconds."""
    device = torch.device(case["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, hidden, vocab = case["tokens"], case["hidden"], case["vocab"]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    s_hidden, t_hidden = randn(tokens, hidden).requires_grad_(), randn(tokens, hidden)
    s_weight = randn(vocab, hidden, scale=2 * hidden**-0.5).requires_grad_()
    t_weight = randn(vocab, hidden, scale=3 * hidden**-0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        limit = _status_kib("VmSize") * 1024 + int(case["limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again at the resident set
        baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    try:
        loss = loss_of(case["method"], s_hidden, s_weight, t_hidden, t_weight)
        loss.backward()
    except (RuntimeError, MemoryError) as e:
        return {"oom": f"allocation failed ({str(e).splitlines()[0][:80]})"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = _status_kib("VmHWM") * 1024 - baseline
    return {"value": loss.item(), "peak_bytes": peak, "seconds": time.perf_counter() - start}


def launch(case: dict) -> dict:
    """``case`` in a fresh process (or its out-of-memory record when its full-size tensors exceed the limit)."""
    needs = FULL_COPIES[case["method"]] * case["tokens"] * case["vocab"] * 4
    if case["device"] == "cpu" and needs > case["limit_bytes"]:
        return {"oom": f"needs at least {needs / GiB:.1f} GiB ({FULL_COPIES[case['method']]} full fp32 [tokens, V])"}
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "benchmarks.kd_memory", "--case", json.dumps(case)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"oom": f"the process ended with {proc.returncode} ({(proc.stderr.strip().splitlines() or [''])[-1]})"}
    return json.loads(lines[0][len(RESULT_PREFIX) :])


def memory_limit(requested_gib: float) -> int:
    """The address space a case may add: the requested GiB, or less when the machine has less available (minus 2
    GiB left to others)."""
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024  # type: ignore[union-attr]
    return int(min(requested_gib * GiB, available - 2 * GiB))


def compare(rows: list[dict]) -> list[dict]:
    """Per (device, V, tokens, hidden): fused against naive (or chunked when naive did not fit)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["vocab"], row["tokens"], row["hidden"]), {})[row["method"]] = row
    out = []
    for (device, vocab, tokens, hidden), by in groups.items():
        fused = by.get("fused", {})
        base = next((by[m] for m in ("naive", "chunked") if m in by and "oom" not in by[m]), None)
        entry = {"device": device, "vocab": vocab, "tokens": tokens, "hidden": hidden}
        if "oom" in by.get("naive", {}) and "oom" not in fused:  # naive holds at least its full-size copies
            entry["peak_ratio_at_most"] = fused["peak_bytes"] / (FULL_COPIES["naive"] * tokens * vocab * 4)
        if "oom" not in fused and base is not None:
            entry |= {
                "against": base["method"],
                "peak_ratio": fused["peak_bytes"] / base["peak_bytes"],
                "time_ratio": fused["seconds"] / base["seconds"],
                "value_rel_diff": abs(fused["value"] - base["value"]) / abs(base["value"]),
            }
        out.append(entry)
    return out


def _cell(row: dict) -> tuple[str, str]:
    if "oom" in row:
        return "out of memory", "—"
    return f"{row['peak_bytes'] / GiB:.2f}", f"{row['seconds']:.1f}"


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    columns = ["device", "V", "tokens", "hidden"] + [f"{m} {what}" for m in METHODS for what in ("GiB", "s")]
    columns += ["fused / naive peak", "fused / naive time"]
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        by_case.setdefault((row["device"], row["vocab"], row["tokens"], row["hidden"]), {})[row["method"]] = row
    ratios = {(c["device"], c["vocab"], c["tokens"], c["hidden"]): c for c in results["comparisons"]}
    lines = []
    for key, by in sorted(by_case.items()):
        device, vocab, tokens, hidden = key
        cells = [c for m in METHODS for c in (_cell(by[m]) if m in by else ("—", "—"))]
        c = ratios.get(key, {})
        against = "" if c.get("against", "naive") == "naive" else " (vs chunked)"
        peak = f"{c['peak_ratio']:.3f}{against}" if "peak_ratio" in c else "—"
        if "peak_ratio_at_most" in c:
            peak = f"≤ {c['peak_ratio_at_most']:.3f}"
        ratio = [peak, f"{c['time_ratio']:.2f}{against}" if "time_ratio" in c else "—"]
        lines.append([device, f"{vocab:,}", f"{tokens:,}", f"{hidden:,}", *cells, *ratio])
    return columns, lines


def render(results: dict) -> str:
    """The docs/results.md section (markers included) from the benchmark's JSON."""
    checked = [c for c in results["comparisons"] if "value_rel_diff" in c]
    worst = max((c["value_rel_diff"] for c in checked), default=float("nan"))
    m = results["machine"]
    runs = " then ".join(
        f"`{r['command']}` ({r['wall_seconds'] / 60:.0f} min, load average {r['load_average']['start']:.1f} at the "
        f"start and {r['load_average']['end']:.1f} at the end)"
        for r in results["runs"]
    )
    limit = min(r["limit_gib"] for r in results["runs"])
    return "\n".join(
        [
            START,
            "<!-- generated by `python -m benchmarks.kd_memory --readme` from benchmarks/results/kd_memory.json -->",
            "",
            f"{runs} on {m['cpu_count']} CPU cores ({m['cpu']}, torch {m['torch']}; a shared machine, so times "
            f"are loose), fp32, forward KL at T={results['temperature']:g}, chunks of {results['chunk_size']:,} "
            f"tokens; each case in a fresh process, at most {limit:.1f} GiB above its inputs (more: out of memory). "
            "Peak: resident-set high-water mark above the inputs (both models' hidden states and head weights); "
            "time: one forward+backward including the heads' matmuls. Where naive does not fit, its peak is at least "
            f"its {FULL_COPIES['naive']} full-size fp32 copies (logits, log-softmaxes and the divergence's product), "
            "which bounds the peak ratio (≤); the time ratio is then against chunked. The fused loss's value equals "
            f"the naive one (or the chunked one where naive did not fit) within {worst:.1e} relative.",
            "",
            markdown_table(*table(results)),
            END,
        ]
    )


def write_readme(results: dict, readme: Path = RESULTS_DOC) -> None:
    replace_section(readme, START, END, render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--memory-limit-gib", type=float, default=14.0)
    parser.add_argument("--quick", action="store_true", help="one small case per method (a test's run)")
    parser.add_argument("--out", type=Path, default=RESULTS_JSON)
    parser.add_argument("--readme", action="store_true", help="rewrite the docs/results.md section from --out and stop")
    parser.add_argument("--merge", action="store_true", help="add these cases to --out's, replacing the same ones")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(RESULT_PREFIX + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    if args.readme:
        write_readme(json.loads(args.out.read_text()))
        return
    if args.quick:
        args.vocab, args.tokens, args.hidden = [4096], [256], [64]
    limit = memory_limit(args.memory_limit_gib)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for device in devices:
        for vocab in args.vocab:
            for tokens in args.tokens:
                for hidden in args.hidden:
                    for method in METHODS:
                        case = dict(device=device, vocab=vocab, tokens=tokens, hidden=hidden, method=method)
                        rows.append(case | launch(case | {"limit_bytes": limit}))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    run = {
        "command": command_line("benchmarks.kd_memory", sys.argv[1:]),
        "wall_seconds": time.perf_counter() - started,
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "limit_gib": limit / GiB,
    }
    runs = [run]
    if args.merge:
        earlier = json.loads(args.out.read_text())
        measured = {_key(row) for row in rows}
        rows = [row for row in earlier["rows"] if _key(row) not in measured] + rows
        runs = earlier["runs"] + runs
    results = {
        "temperature": TEMPERATURE,
        "chunk_size": CHUNK,
        "runs": runs,
        "rows": rows,
        "comparisons": compare(rows),
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_name(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    columns, lines = table(results)
    print(markdown_table(columns, lines))
    print(f"wrote {args.out}")
    if not args.quick:
        write_readme(results)


def _key(row: dict) -> tuple:
    return row["device"], row["vocab"], row["tokens"], row["hidden"], row["method"]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
