"""Plots people would rather look at than read: accuracy and early stopping against sparsity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sparse_lth import run_files
from sparse_lth.report_table import metric_value, report_metric

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
    fig.tight_layout()
    try:
        # Through a temporary file and a rename: never half a PNG, never written through a
        # symbolic link planted at ``path`` (the rename replaces the link).
        return run_files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
