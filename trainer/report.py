"""The end-of-run report: sizes, losses, latency and steps, as report.md and a closing console table."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from trainer import export, files, models
from trainer.config import ReportConfig
from trainer.data.tokenizer import TOKENIZER_FILES
from trainer.models.protocol import family_of

LATENCY_REPEATS = 20


def parameter_count(model: nn.Module) -> int:
    """Weights the model computes with: parameters, plus quantized weights that an export keeps as buffers."""
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter):
            count += weight.numel()
    return count


def folder_bytes(path: Path) -> int:
    """Bytes of an export's model files (not of the manifest that records their hashes, nor of a tokenizer)."""
    left_out = {files.MANIFEST_FILE, *TOKENIZER_FILES}
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in left_out)


def dense_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 model of the same architecture and weights (no fake-quant modules)."""
    plain = models.build_from_spec(models.model_spec(model))
    models.load_weights(plain, {k: v.detach().float().cpu() for k, v in models.unique_state_dict(model).items()})
    return plain.eval()


def dense_export_bytes(model: nn.Module) -> int:
    """Bytes on disk of the model written as a dense fp32 export (measured by writing it); for a model Stillroom
    does not export (a Hugging Face or vocabulary-sliced teacher), its fp32 parameter bytes."""
    if family_of(model).config_class is None:
        return 4 * sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        return folder_bytes(models.save_dense(model, tmp))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time of one forward pass over ``example`` on CPU, over ``repeats`` passes after (up to) 3."""
    model = model.eval()
    for _ in range(min(3, repeats)):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def write(
    run_dir: Path,
    *,
    report_cfg: ReportConfig,
    title: str,
    setup: str,
    student: nn.Module,
    teacher: nn.Module | None,
    final_dir: Path,
    student_eval: dict,
    export_eval: dict,
    teacher_eval: dict | None,
    train_seconds: float,
    steps: int,
    example: torch.Tensor,
    layer_table: tuple[list[str], list[list]] | None,
    samples: list[list] | None = None,
) -> dict:
    """Measure the models, write ``report.md`` and ``report.json`` (headed by the run's ``title`` and its ``setup``
    line), return the summary figures."""
    exported = export.load_served(final_dir)  # a Hugging Face student's: as transformers loads and runs it
    dense_student = dense_copy(student)
    rows = [
        ("student (fp32 dense)", dense_student, student_eval, dense_export_bytes(dense_student)),
        ("student (export)", exported, export_eval, folder_bytes(final_dir)),
    ]
    if teacher is not None:
        rows.append(("teacher", teacher, teacher_eval or {}, dense_export_bytes(teacher)))
    table = []
    for name, model, evals, size in rows:
        cpu_model = model.to("cpu")
        table.append(
            {
                "model": name,
                "params": parameter_count(cpu_model),
                "bytes": size,
                "val_loss": evals.get("eval/val_loss", float("nan")),
                "accuracy": evals.get("eval/accuracy"),
                "latency_ms": cpu_latency_ms(cpu_model, example.cpu(), report_cfg.latency_repeats),
            }
        )
    summary = {
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "models": table,
        "export_ratio": table[0]["bytes"] / table[1]["bytes"],
    }
    lines = [
        f"# Run report: {title}",
        "",
        f"- steps: {steps}",
        f"- training time: {train_seconds:.1f} s",
        f"- {setup}",
        f"- latency: median of {report_cfg.latency_repeats} CPU forward passes on a fixed batch of shape "
        f"{tuple(example.shape)}",
        f"- export: {summary['export_ratio']:.2f}x smaller on disk than the fp32 dense student; the fp32 row's"
        " val loss is the trained model's (with its masks and fake-quant, if any)",
        "",
        "| model | params | bytes on disk | val loss | accuracy | CPU latency (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['bytes']:,} | {r['val_loss']:.4f} | {acc} | {r['latency_ms']:.2f} |"
        )
    if layer_table is not None:
        columns, layer_rows = layer_table
        lines += ["", "## Compression by layer", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in layer_rows]
    if samples:  # on-policy distillation: what the student wrote at the last evaluation
        lines += ["", "## On-policy samples", "", "| step | sample | prompt | completion | tokens |"]
        lines += ["|---|---:|---|---|---:|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in samples]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    (run_dir / "report.json").write_text(json.dumps(summary, indent=1))
    return summary


def _cell(value: object) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return str(value).replace("|", "\\|").replace("\n", "\\n")


def closing_table(summary: dict) -> str:
    """The table printed when a run ends."""
    header = f"{'model':<26}{'params':>10}{'bytes':>12}{'val loss':>10}{'latency ms':>12}"
    rows = [
        f"{r['model']:<26}{r['params']:>10,}{r['bytes']:>12,}{r['val_loss']:>10.4f}{r['latency_ms']:>12.2f}"
        for r in summary["models"]
    ]
    return "\n".join(
        [
            header,
            "-" * len(header),
            *rows,
            f"steps {summary['steps']}, training {summary['train_seconds']} s, "
            f"export {summary['export_ratio']:.2f}x smaller than fp32 dense",
        ]
    )
