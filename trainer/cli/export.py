"""Post-training export: ``python -m trainer.export SOURCE quantize=int8_dynamic [out=DIR] [targets=PATTERN,...]``.

SOURCE is a run folder, a checkpoint folder or an export. The model (trained without QAT) gets
its Linear layers quantized — ``int8_dynamic`` (int8 weights per channel, int8 activations per
token), ``int8_weight`` (weights only) or ``int4_weight`` (int4 per group of 32) — and is written
as a compressed export (default ``<run_dir>/final_<scheme>``), loadable with ``trainer.export.load``: a Hugging Face
student's in the compressed-tensors format, which transformers loads (see ``trainer.compress.compressed_tensors``),
any other in Stillroom's compressed format.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch.nn as nn

from trainer import export, models
from trainer.compress import compressed_tensors
from trainer.compress.stats import quant_specs
from trainer.compress.stillroom_format import export_compressed, linear_targets, quantize_dense
from trainer.distill import teacher as source_io
from trainer.failure import INTERRUPTED_EXIT, os_error_line
from trainer.models.protocol import family_of
from trainer.report import folder_bytes

SCHEMES = {
    "int8_dynamic": dict(weight_bits=8, act_bits=8),
    "int8_weight": dict(weight_bits=8, act_bits=0),
    "int4_weight": dict(weight_bits=4, act_bits=0, group_size=32),
}
USAGE = (
    f"usage: python -m trainer.export SOURCE quantize={{{'|'.join(SCHEMES)}}} [out=DIR] "
    "[targets=PATTERN,...] (default: the Linear layers of the decoder layers)"
)


def parse(argv: list[str]) -> tuple[Path, dict[str, str]]:
    if not argv or "=" in argv[0]:
        raise ValueError("SOURCE (a run folder, checkpoint or export) is required")
    options = {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("quantize", "out", "targets"):
            raise ValueError(f"unknown argument {arg!r}")
        options[key] = value
    if options.get("quantize") not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)} (got {options.get('quantize')!r})")
    return Path(argv[0]), options


def main(argv: list[str]) -> int:
    try:
        source, options = parse(argv)
        kind, folder = source_io.resolve(source)
    except (ValueError, source_io.TeacherPathError) as e:
        print(f"error: {e} ({USAGE})", file=sys.stderr)
        return 2
    try:  # a Hugging Face student's export is a Hugging Face folder: loaded as that student's family
        model = export.load(folder) if kind == "hf" else source_io.load(folder)
    except (export.ExportError, source_io.TeacherPathError) as e:
        print(f"error: SOURCE: {e}", file=sys.stderr)
        return 2
    scheme = options["quantize"]
    targets = options["targets"].split(",") if "targets" in options else [f"{family_of(model).layers_prefix(model)}.*"]
    run_dir = folder.parent.parent if kind == "checkpoint" else folder.parent
    out = Path(options.get("out", run_dir / f"final_{scheme}"))
    problem = targets_problem(model, targets) or out_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        dense = folder_bytes(models.save_dense(model, Path(scratch)))
    staging = export.staging_dir(out)
    quantized = quantize_dense(model, targets=targets, **SCHEMES[scheme])
    specs = quant_specs(quantized)
    try:
        if family_of(model).pretrained_format:
            compressed_tensors.save(quantized, staging, specs, masks={})
        else:
            export_compressed(quantized, staging, masks={}, quant={})
        export.publish(staging, out)
    except KeyboardInterrupt:  # nothing half written is left: the staging folder goes
        shutil.rmtree(staging, ignore_errors=True)
        print("interrupted by Ctrl-C; nothing was written", file=sys.stderr)
        return INTERRUPTED_EXIT
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: out: {os_error_line(e)}; nothing was written", file=sys.stderr)
        return 1
    size = folder_bytes(out)
    weights = [module.weight for name, module in quantized.named_modules() if name in specs]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
    print(
        f"wrote {out}: {size:,} bytes ({dense / size:.2f}x smaller than the fp32 export, {dense:,} bytes); "
        f"{len(weights)} Linear weights quantized ({scheme}), {zeros:.1%} of their values zero (pruned)"
    )
    return 0


def targets_problem(model: nn.Module, targets: list[str]) -> str | None:
    """Why ``targets`` cannot be quantized: a pattern that matches no Linear layer (an export that quantized
    nothing would only look done)."""
    for pattern, names in linear_targets(model, targets).items():
        if not names:
            linears = linear_targets(model, None)["*"][:3]
            return f"targets: {pattern!r} matches no Linear layer (the model's are e.g. {', '.join(linears)})"
    return None


def out_problem(out: Path) -> str | None:
    """Why the export cannot be written at ``out``: it exists (an export is never written over another), or the
    nearest folder that exists is a file or read-only."""
    if out.exists():
        return f"out: {out} already exists (an export is never written over another; choose another out=DIR)"
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not existing.is_dir():
        return f"out: {out} cannot be made: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"out: {out} cannot be written: {existing} is read-only"
    return None
