"""Plain-text tables of a search's rounds, for the terminal and the README."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def rounds_table(records: Sequence[Mapping], controls: Mapping[str, Sequence[Mapping]] | None = None,
                 markdown: bool = False) -> str:
    """One row per round: weights remaining, ticket test accuracy and early-stop iteration at
    early stop, the same for each control trained on that round's mask."""
    controls = controls or {}
    header = ["round", "weights left %", "ticket acc %", "ticket stop it"]
    for name in controls:
        header += [f"{name} acc %", f"{name} stop it"]
    by_round = {name: {r["round"]: r for r in rows} for name, rows in controls.items()}
    rows = []
    for rec in records:
        row = [str(rec["round"]), f"{100 * rec['weights_remaining']:.2f}",
               f"{100 * rec['early_stop_test_accuracy']:.2f}", str(rec["early_stop_iteration"])]
        for name in controls:
            c = by_round[name].get(rec["round"])
            row += [f"{100 * c['early_stop_test_accuracy']:.2f}", str(c["early_stop_iteration"])] if c else ["", ""]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
