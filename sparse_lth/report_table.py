"""Plain-text tables of a search's rounds, for the terminal and the README."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
