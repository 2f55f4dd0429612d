"""Teacher and student side by side, each as its users run it (``report.side_by_side=true``): the teacher as the run
reads it, the student's export and a dense Hugging Face copy of it (``final_dense/``) as transformers alone loads
them. Per model: val loss, top-1 agreement with the teacher, parameters, bytes on disk, forward tokens/s, the loss on
``report.heldout_files`` (a second held-out set unlike the training files); the greedy completions of
``report.prompts``; and, when the run evaluated its student before the first step (``train.eval_at_start``), the
share of the gap between that student and the teacher the training closed. Written to ``side_by_side.json`` and
appended to ``report.md``."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import data, export, models, report
from trainer.config import DataConfig, ReportConfig, TeacherConfig
from trainer.data import tokenizer as tokenizers
from trainer.distill import teacher as teacher_io
from trainer.models import hf
from trainer.models.hf import gguf

DENSE_DIR = "final_dense"


def save_dense_folder(student: nn.Module, run_dir: Path, data_cfg: DataConfig) -> Path:
    """The trained student's float weights (no fake-quant, no compression) as ``run_dir/final_dense``, with the
    run's tokenizer."""
    final = run_dir / DENSE_DIR
    staging = export.staging_dir(final)
    models.save_dense(report.dense_copy(student), staging)
    data.save_tokenizer(data_cfg, staging)
    export.publish(staging, final)
    return final


def load_teacher(path: str, dtype: str) -> hf.TransformersLM:
    """The teacher (a Hugging Face folder, or a GGUF file dequantized to ``dtype``) as transformers loads it."""
    kind, found = teacher_io.resolve(path)
    return hf.TransformersLM(gguf.load(found, dtype)).eval() if kind == "gguf" else hf.load_transformers(found)


def weight_count(model: nn.Module) -> int:
    """The model's parameters, less a quantized export's scales and zero points (compressed-tensors' names)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(("_scale", "_zero_point")))


@torch.no_grad()
def measure(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], teacher_top1: list[torch.Tensor]):
    """Val loss (nats/token), top-1 agreement with ``teacher_top1``, forward tokens/s (after one untimed forward);
    and this model's top-1."""
    model(batches[0][0])  # the first call sets up what later ones reuse (compressed-tensors' decompression)
    loss, tokens, seconds, top1 = 0.0, 0, 0.0, []
    for x, y in batches:
        start = time.perf_counter()
        logits = model(x).float()
        seconds += time.perf_counter() - start
        loss += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        top1.append(logits.argmax(-1))
        tokens += y.numel()
    agree = sum(int((mine == ref).sum()) for mine, ref in zip(top1, teacher_top1 or top1, strict=True))
    return {"val_loss": loss / tokens, "agreement": agree / tokens, "tokens_per_s": tokens / seconds}, top1


@torch.no_grad()
def complete(model: hf.TransformersLM, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (``new_tokens`` tokens at most)."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    generate: Any = model.hf_model.generate
    out = generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True)


def heldout_batches(files: list[str], tokenizer: Any, like: torch.Tensor, most: int = 16) -> list:
    """(inputs, targets) batches of ``like``'s shape from the text of ``files`` (globs, sorted), tokenized and joined
    by the end-of-text token, in windows one token longer than a row: at most ``most`` batches."""
    rows, width = like.shape
    ids: list[int] = []
    for path in sorted({p for pattern in files for p in glob.glob(pattern, recursive=True)}):
        ids += [*tokenizer.encode(Path(path).read_text(errors="replace")), tokenizer.eos_token_id]
    windows = torch.tensor(ids[: len(ids) // (width + 1) * (width + 1)], dtype=torch.long).view(-1, width + 1)
    batches = [windows[i : i + rows] for i in range(0, min(len(windows), most * rows), rows)]
    return [(b[:, :-1], b[:, 1:]) for b in batches if len(b) == rows]


def gap_recovered(run_dir: Path, table: list[dict]) -> dict | None:
    """The student's val loss before the first step (``metrics.jsonl``'s step 0) and the share of its gap to the
    teacher the training closed: (before - after) / (before - teacher), after = the export's; None without it."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    before = next((row["eval/val_loss"] for row in rows if row["step"] == 0 and "eval/val_loss" in row), None)
    losses = {row["model"]: row["val_loss"] for row in table}
    if before is None or before <= losses["teacher"]:
        return None
    share = (before - losses["student (export)"]) / (before - losses["teacher"])
    return {"val_loss_before": before, "share": share}


def run(
    teacher_cfg: TeacherConfig,
    data_cfg: DataConfig,
    report_cfg: ReportConfig,
    run_dir: Path,
    student: nn.Module,
    val_batches: list,
) -> dict:
    """Write ``final_dense/``, measure the teacher and both student folders on ``val_batches``, complete
    ``report_cfg.prompts``, write the results; the summary."""
    assert teacher_cfg.checkpoint is not None  # the preflight asks for a teacher
    dense = save_dense_folder(student, run_dir, data_cfg)
    teacher = load_teacher(teacher_cfg.checkpoint, teacher_cfg.param_dtype)
    rows: list[tuple[str, hf.TransformersLM, int]] = [
        ("teacher", teacher, 4 * sum(p.numel() for p in teacher.parameters())),
        ("student (export)", hf.load_transformers(run_dir / "final"), report.folder_bytes(run_dir / "final")),
        ("student (dense)", hf.load_transformers(dense), report.folder_bytes(dense)),
    ]
    tokenizer = tokenizers.load(data_cfg.tokenizer)
    batches = [(x.cpu(), y.cpu()) for x, y in val_batches]
    heldout = heldout_batches(report_cfg.heldout_files, tokenizer, batches[0][0]) if report_cfg.heldout_files else []
    table, completions = [], []
    teacher_top1: list[torch.Tensor] = []
    for name, model, size in rows:
        figures, top1 = measure(model, batches, teacher_top1)
        teacher_top1 = teacher_top1 or top1
        if heldout:
            figures["heldout_loss"] = measure(model, heldout, [])[0]["val_loss"]
        table.append({"model": name, "params": weight_count(model), "bytes": size, **figures})
        completions.append([complete(model, tokenizer, p, report_cfg.new_tokens) for p in report_cfg.prompts])
    summary = {
        "models": table,
        "completions": {p: {r[0]: c[i] for r, c in zip(rows, completions)} for i, p in enumerate(report_cfg.prompts)},
        "val_tokens": sum(y.numel() for _, y in batches),
        "heldout_tokens": sum(y.numel() for _, y in heldout),
        "gap_recovered": gap_recovered(run_dir, table),
    }
    (run_dir / "side_by_side.json").write_text(json.dumps(summary, indent=1))
    with (run_dir / "report.md").open("a") as f:
        f.write("\n## Teacher and student as transformers loads them\n\n" + markdown(summary) + "\n")
    return summary


def markdown(summary: dict) -> str:
    heldout = summary.get("heldout_tokens")
    lines = [
        "| model | params | bytes on disk | val loss | top-1 agreement | tokens/s |"
        + (" held-out loss |" if heldout else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if heldout else ""),
        *(
            f"| {r['model']} | {r['params']:,} | {r['bytes']:,} | {r['val_loss']:.4f} | {r['agreement']:.4f} "
            f"| {r['tokens_per_s']:.0f} |" + (f" {r['heldout_loss']:.4f} |" if heldout else "")
            for r in summary["models"]
        ),
    ]
    lines += ["", gap_line(summary)] if summary.get("gap_recovered") else []
    for prompt, by_model in summary["completions"].items():
        lines += ["", f"Prompt: `{prompt!r}`", ""]
        lines += [f"- {name}: `{text!r}`" for name, text in by_model.items()]
    return "\n".join(lines)


def gap_line(summary: dict) -> str:
    gap = summary["gap_recovered"]
    return (
        f"The training closed {gap['share']:.1%} of the gap between the student before its first step "
        f"({gap['val_loss_before']:.4f}) and the teacher: (before - after) / (before - teacher)."
    )


def closing_text(summary: dict) -> str:
    """The table and completions printed when the run ends."""
    heldout = bool(summary.get("heldout_tokens"))
    header = f"{'model':<20}{'params':>13}{'bytes':>14}{'val loss':>10}{'agree':>8}{'tok/s':>8}"
    lines = [header + (f"{'held-out':>10}" if heldout else "")]
    lines.append("-" * len(lines[0]))
    lines += [
        f"{r['model']:<20}{r['params']:>13,}{r['bytes']:>14,}{r['val_loss']:>10.4f}{r['agreement']:>8.3f}"
        f"{r['tokens_per_s']:>8.0f}" + (f"{r['heldout_loss']:>10.4f}" if heldout else "")
        for r in summary["models"]
    ]
    lines += [gap_line(summary)] if summary.get("gap_recovered") else []
    for prompt, by_model in summary["completions"].items():
        lines += [f"prompt {prompt!r}"] + [f"  {name:<18}{text!r}" for name, text in by_model.items()]
    return "\n".join(lines)
