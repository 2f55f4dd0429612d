"""The quality benchmark's plots (``python -m benchmarks.quality`` draws them from its JSON): validation loss and
compression against steps."""

from __future__ import annotations

import statistics
from pathlib import Path


def mean_curve(curves: list[list[list[float]]], column: int) -> tuple[list[float], list[float]]:
    """Steps and the mean over seeds of ``column`` (curves of the same run shape share their steps)."""
    steps = [row[0] for row in curves[0]]
    return steps, [statistics.fmean(curve[i][column] for curve in curves) for i in range(len(steps))]


def plot_val_loss(shakespeare: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for v in shakespeare["variants"]:
        ax.plot(*mean_curve([r["val_curve"] for r in v["runs"]], 1), label=v["label"], marker=".")
    ax.axhline(
        shakespeare["teacher"]["val_loss"]["mean"],
        color="black",
        linestyle="--",
        label=f"teacher ({shakespeare['teacher']['steps']} steps)",
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / character)")
    ax.set_title(f"Tiny Shakespeare, tiny student, mean over {len(shakespeare['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compression(shakespeare: dict, path: Path) -> None:
    """Sparsity, the export's bits per weight and its size against steps; dotted: where fake-quant starts."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for v in shakespeare["variants"]:
        if "compress_curve" not in v["runs"][0]:
            continue
        curves = [r["compress_curve"] for r in v["runs"]]
        for ax, column in zip(axes, (1, 2, 3)):
            steps, values = mean_curve(curves, column)
            (line,) = ax.plot(steps, [y / 1024 for y in values] if column == 3 else values, label=v["label"])
        qat_start = next((row[0] for row in curves[0] if row[4]), None)
        if qat_start is not None:
            for ax in axes:
                ax.axvline(qat_start, color=line.get_color(), linestyle=":")
    for ax, label in zip(axes, ("sparsity of the pruned weights", "export bits per weight", "export size (KiB)")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
