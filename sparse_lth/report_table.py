"""Plain-text tables of a search's rounds, for the terminal and the README."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparse_lth.run_report import RunCosts


def report_metric(records: Sequence[Mapping], preferred: str | None = None) -> str | None:
    """Which metric a table or plot of user-loop records shows: ``preferred``, else
    ``"accuracy"`` when ``train_fn`` returned one, else its first metric. None for the built-in
    loop's records, which show test accuracy at the early-stop iteration."""
    user = [r for r in records if "metrics" in r]
    if not user:
        return None
    if preferred is not None:
        return preferred
    names = list(user[0]["metrics"])
    return "accuracy" if "accuracy" in names else names[0]


def metric_value(record: Mapping, metric: str | None) -> float | None:
    """The number a table or plot shows for one round (see :func:`report_metric`)."""
    if metric is None:
        return 100 * record["early_stop_test_accuracy"]
    return record.get("metrics", {}).get(metric)


def _cells(record: Mapping, metric: str | None) -> list[str]:
    value = metric_value(record, metric)
    shown = "-" if value is None else (f"{value:.2f}" if metric is None else f"{value:.4g}")
    return [shown, str(record.get("early_stop_iteration", "-"))]


def rounds_table(records: Sequence[Mapping], controls: Mapping[str, Sequence[Mapping]] | None = None,
                 markdown: bool = False, metric: str | None = None) -> str:
    """One row per round: weights remaining, then for the ticket and each control trained on
    that round's mask its test accuracy and early-stop iteration (the built-in loop), or the
    ``metric`` a user's ``train_fn`` returned and the early-stop step it logged (see
    :func:`report_metric`)."""
    controls = controls or {}
    metric = report_metric([*records, *(r for rows in controls.values() for r in rows)], metric)
    label = "acc %" if metric is None else metric
    header = ["round", "weights left %", f"ticket {label}", "ticket stop it"]
    for name in controls:
        header += [f"{name} {label}", f"{name} stop it"]
    by_round = {name: {r["round"]: r for r in rows} for name, rows in controls.items()}
    rows = []
    for rec in records:
        row = [str(rec["round"]), f"{100 * rec['weights_remaining']:.2f}", *_cells(rec, metric)]
        for name in controls:
            c = by_round[name].get(rec["round"])
            row += _cells(c, metric) if c else ["", ""]
        rows.append(row)
    return _layout(header, rows, markdown)


def _layout(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Right-aligned columns for a terminal, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _micro(seconds: float) -> str:
    us = 1e6 * seconds
    return f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def costs_table(costs: RunCosts, markdown: bool = False) -> str:
    """One row per round of :func:`~sparse_lth.run_report.measure_run`: weights left, test
    accuracy at early stop, bytes dense (state dict) and sparse (convert's file) with their
    ratio, the layers ``sparsify`` swapped, and microseconds per forward pass dense and sparse
    at each batch size with the speedup (dense / sparse: above 1, the sparse model is faster).
    A first line says what the latencies were measured on."""
    header = ["round", "weights left %", "test acc %", "dense B", "sparse B", "bytes d/s", "sparse layers"]
    for b in costs.batch_sizes:
        header += [f"b{b} dense us", f"b{b} sparse us", f"b{b} d/s"]
    total = len(costs.pruned_weights)
    rows = []
    for r in costs.rounds:
        acc = "-" if r.test_accuracy is None else f"{100 * r.test_accuracy:.2f}"
        row = [str(r.round), f"{100 * r.weights_remaining:.2f}", acc, f"{r.dense_bytes:,}", f"{r.sparse_bytes:,}",
               f"{r.bytes_ratio:.2f}", f"{len(r.sparse_layers)}/{total}" if total else str(len(r.sparse_layers))]
        for b in costs.batch_sizes:
            row += [_micro(r.dense_seconds[b]), _micro(r.sparse_seconds[b]), f"{r.speedup(b):.2f}"]
        rows.append(row)
    note = (f"{costs.run_dir}: {costs.model}, input {list(costs.input_shape)}; CPU {costs.machine}, "
            f"{costs.threads} thread{'s' if costs.threads != 1 else ''}, torch {costs.torch_version}; "
            f"latency: median of {costs.reps} interleaved repetitions; test accuracy at the early-stop iteration")
    return note + "\n\n" + _layout(header, rows, markdown)
