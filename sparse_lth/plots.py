"""Plots people would rather look at than read: accuracy and early stopping against sparsity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_lth import run_files
from sparse_lth.report_table import metric_value, report_metric

if TYPE_CHECKING:
    from sparse_lth.run_report import RunCosts

_PERCENT_TICKS = [100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1]


def plot_rounds(series: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = "",
                metric: str | None = None) -> Path:
    """Test accuracy at early stop, and the early-stop iteration, against weights remaining.

    ``series`` maps a label ("ticket", "random_reinit", ...) to round records, each with
    ``weights_remaining``, ``early_stop_test_accuracy`` and ``early_stop_iteration``; for a
    user's loop, the ``metric`` it returned (:func:`~sparse_lth.report_table.report_metric`)
    and the early-stop step where it logged ``val_loss``, else the seconds each round took.
    The PNG is written atomically (a temporary file renamed into place).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_it) = plt.subplots(1, 2, figsize=(11, 4))
    lowest = min((100 * r["weights_remaining"] for rows in series.values() for r in rows), default=1.0)
    ticks = [t for t in _PERCENT_TICKS if t >= 0.7 * lowest]
    every = [r for rows in series.values() for r in rows]
    metric = report_metric(every, metric)
    right = "early_stop_iteration" if all("early_stop_iteration" in r for r in every) else "seconds"
    for label, records in series.items():
        if not records:
            continue
        x = [100 * r["weights_remaining"] for r in records]
        ax_acc.plot(x, [metric_value(r, metric) for r in records], marker="o", label=label)
        ax_it.plot(x, [r.get(right) for r in records], marker="o", label=label)
    left_label = "test accuracy at early stop (%)" if metric is None else metric
    right_label = "early-stop iteration" if right == "early_stop_iteration" else "training time per round (s)"
    for ax, ylabel in ((ax_acc, left_label), (ax_it, right_label)):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        # Through a temporary file and a rename: never half a PNG, never written through a
        # symbolic link planted at ``path`` (the rename replaces the link).
        return run_files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


LATENCY_PLOT = "accuracy_vs_latency.png"
BYTES_PLOT = "accuracy_vs_bytes.png"


def plot_costs(costs: RunCosts, out_dir: str | Path) -> list[Path]:
    """Test accuracy at early stop against what each round costs deployed
    (:func:`~sparse_lth.run_report.measure_run`): ``accuracy_vs_latency.png``, one panel per
    batch size, dense and sparse forward time; ``accuracy_vs_bytes.png``, the dense state dict
    against the sparse checkpoint. Each point is a round, labelled with its weights left (%);
    the machine and thread count are in the title. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = costs.rounds
    acc = [float("nan") if r.test_accuracy is None else 100 * r.test_accuracy for r in rounds]
    labels = [f"{100 * r.weights_remaining:.3g}%" for r in rounds]
    where = f"{costs.model}: {costs.machine}, {costs.threads} thread{'s' if costs.threads != 1 else ''}"

    def series(ax, xs: Sequence[float], marker: str, label: str, annotate: bool) -> None:
        ax.plot(xs, acc, marker=marker, label=label, linewidth=0.8, alpha=0.85)
        if annotate:
            for x, y, text in zip(xs, acc, labels):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)

    def x_scale(ax, *columns: Sequence[float]) -> None:  # log only where it spans a decade
        values = [v for column in columns for v in column if v > 0]
        ax.set_xscale("log" if values and max(values) > 10 * min(values) else "linear")

    batches = costs.batch_sizes
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        dense = [1e6 * r.dense_seconds[b] for r in rounds]
        sparse = [1e6 * r.sparse_seconds[b] for r in rounds]
        series(ax, dense, "o", "dense", False)
        series(ax, sparse, "s", "sparse (sparsify, calibrated)", True)
        x_scale(ax, dense, sparse)
        ax.set_xlabel(f"forward pass at batch {b} (us, median of {costs.reps})")
        ax.set_ylabel("test accuracy at early stop (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"accuracy against latency per round ({where})")
    paths = [_save(fig, out / LATENCY_PLOT)]

    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = [float(r.dense_bytes) for r in rounds]
    sparse = [float(r.sparse_bytes) for r in rounds]
    series(ax, dense, "o", "dense state dict", False)
    series(ax, sparse, "s", "sparse checkpoint (convert)", True)
    x_scale(ax, dense, sparse)
    ax.set_xlabel("bytes")
    ax.set_ylabel("test accuracy at early stop (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"accuracy against bytes per round ({costs.model})")
    paths.append(_save(fig, out / BYTES_PLOT))
    return paths
