"""Benchmark report: pytest-benchmark JSON -> tables (speed-up and bytes over dense, crossover
densities) and PNG plots. The logic behind ``sparse-lth report BENCH.json [--out DIR]``.

The JSON is what ``pytest bench/ --benchmark-json BENCH.json`` writes; each benchmark of
bench/ records what it measured in ``extra_info``:

* ``kind="kernel"``: one ``W @ X`` product (shape, batch N, dtype, device, backend, structure,
  density, bytes of the weight representation). Each is compared with the dense baseline of
  the same shape, batch, dtype and device (``baseline=True``): speed-up = dense time / time.
* ``kind="model"``: a whole model's forward pass, dense or sparsified.
* ``kind="masked_step"``: a training step with and without the mask multiply.

The crossover density of a series (one backend and structure at one shape, batch, dtype and
device) is where sparse starts to beat dense, coming down from dense: between the densest
point that wins and the next denser point (which loses), with log speed-up interpolated
linearly in log density. A series that wins at every measured density crosses "at or above"
its densest point; one that never wins has none.

Only json, math and matplotlib (Agg) are used: the report runs anywhere the JSON can be read.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KernelResult",
    "Crossover",
    "load_results",
    "kernel_results",
    "crossover_density",
    "crossovers",
    "format_report",
    "write_plots",
    "make_report",
]

BASELINE_BACKEND = "torch_dense"  # bench/backends.py's BASELINE, for JSON without the flag
STATS = ("median", "min", "mean")


@dataclass(frozen=True)
class KernelResult:
    """One kernel benchmark, with its dense baseline's time when the JSON has one."""

    shape: str
    N: int
    dtype: str
    device: str
    backend: str
    structure: str
    density: float        # nominal: the grid value (actual density is within a fraction of it)
    seconds: float
    weight_bytes: int
    dense_bytes: int
    flops: int
    baseline: bool
    dense_seconds: float | None = None
    actual_density: float | None = None  # stored entries / entries, as measured

    @property
    def speedup(self) -> float | None:
        """Dense time / this time (> 1: sparse wins)."""
        return None if self.dense_seconds is None else self.dense_seconds / self.seconds

    @property
    def bytes_ratio(self) -> float:
        """Bytes of this representation / bytes of the dense weight."""
        return self.weight_bytes / self.dense_bytes

    @property
    def gflops(self) -> float:
        """Useful GFLOP/s: 2 * nnz * N / time."""
        return self.flops / self.seconds / 1e9

    @property
    def series(self) -> str:
        """The label of the line this point belongs to: backend and structure."""
        return self.backend if self.structure == "dense" else f"{self.backend}/{self.structure}"

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.shape, self.dtype, self.device)


@dataclass(frozen=True)
class Crossover:
    """Where a series starts to beat dense: ``density`` and how it was found.

    ``kind`` is ``"interpolated"`` (between two measured densities), ``"at_or_above"``
    (wins at the densest point measured, ``density`` is that point) or ``"never"``
    (``density`` is None).
    """

    density: float | None
    kind: str

    def __str__(self) -> str:
        if self.kind == "never":
            return "never"
        prefix = ">=" if self.kind == "at_or_above" else ""
        return f"{prefix}{100 * self.density:.3g}%"


# -- reading -------------------------------------------------------------------------------------
def load_results(path: str | Path) -> dict[str, Any]:
    """The pytest-benchmark JSON (plain or gzipped) as a dict; ValueError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark JSON at {path} (write one with pytest --benchmark-json {path})")
    try:  # .json, or .json.gz as kept in the repository
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not pytest-benchmark output (no 'benchmarks' list)")
    return data


def _seconds(bench: Mapping[str, Any], stat: str) -> float | None:
    stats = bench.get("stats") or {}
    value = stats.get(stat)
    return float(value) if value else None


def kernel_results(data: Mapping[str, Any], stat: str = "median") -> list[KernelResult]:
    """The kernel benchmarks of ``data``, each joined to its dense baseline."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    raw = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        seconds = _seconds(bench, stat)
        if info.get("kind") != "kernel" or seconds is None:
            continue
        raw.append(KernelResult(
            shape=str(info["shape"]), N=int(info["N"]), dtype=str(info["dtype"]), device=str(info["device"]),
            backend=str(info["backend"]), structure=str(info["structure"]),
            density=float(info.get("density_nominal", info["density"])), seconds=seconds,
            weight_bytes=int(info["weight_bytes"]), dense_bytes=int(info["dense_bytes"]),
            flops=int(info["flops"]), baseline=bool(info.get("baseline", info["backend"] == BASELINE_BACKEND)),
            actual_density=float(info["density"]),
        ))
    dense = {(r.shape, r.N, r.dtype, r.device): r.seconds for r in raw if r.baseline}
    return [KernelResult(**{**r.__dict__, "dense_seconds": dense.get((r.shape, r.N, r.dtype, r.device))})
            for r in raw]


# -- crossovers ----------------------------------------------------------------------------------
def crossover_density(points: Iterable[tuple[float, float]]) -> Crossover:
    """Where sparse starts to win, from (density, speed-up) points of one series.

    >>> c = crossover_density([(0.01, 8.0), (0.1, 2.0), (0.2, 0.5)])  # between 10% and 20%
    >>> round(c.density, 4), c.kind
    (0.1414, 'interpolated')
    """
    pts = sorted((float(d), float(s)) for d, s in points if s and s > 0)
    wins = [i for i, (_, s) in enumerate(pts) if s >= 1.0]
    if not wins:
        return Crossover(None, "never")
    i = wins[-1]  # the densest point that wins
    if i == len(pts) - 1:
        return Crossover(pts[i][0], "at_or_above")
    (d0, s0), (d1, s1) = pts[i], pts[i + 1]
    t = math.log(s0) / (math.log(s0) - math.log(s1))  # s0 >= 1 > s1, so t in [0, 1)
    return Crossover(math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))), "interpolated")


def crossovers(results: Sequence[KernelResult]) -> dict[tuple[str, str, str, int, str], Crossover]:
    """(shape, dtype, device, N, series) -> crossover, for every sparse series with a baseline."""
    series: dict[tuple[str, str, str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        if not r.baseline and r.speedup is not None:
            series[(*r.group, r.N, r.series)].append((r.density, r.speedup))
    return {key: crossover_density(pts) for key, pts in sorted(series.items())}


# -- tables --------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (readable as plain text too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _pct(density: float) -> str:
    return f"{100 * (1 - density):g}%"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g} ms" if seconds >= 1e-4 else f"{1e6 * seconds:.3g} us"


def _by_group(results: Sequence[KernelResult]) -> dict[tuple[str, str, str], list[KernelResult]]:
    """Results by (shape, dtype, device): one table and one figure each."""
    groups: dict[tuple[str, str, str], list[KernelResult]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    return groups


def _kernel_tables(results: Sequence[KernelResult]) -> list[str]:
    out: list[str] = []
    cross = crossovers(results)
    by_group = _by_group(results)
    for (shape, dtype, device), group in sorted(by_group.items()):
        sparse = [r for r in group if not r.baseline]
        densities = sorted({r.density for r in sparse}, reverse=True)
        head = ["N", "backend/structure", "dense time", *(f"{_pct(d)} sparse" for d in densities),
                "sparse wins below density"]
        rows = []
        for N in sorted({r.N for r in group}):
            base = next((r for r in group if r.baseline and r.N == N), None)
            cells: dict[str, dict[float, KernelResult]] = defaultdict(dict)
            for r in sparse:
                if r.N == N:
                    cells[r.series][r.density] = r
            for name in sorted(cells):
                row = [str(N), name, _ms(base.seconds) if base else "-"]
                for d in densities:
                    r = cells[name].get(d)
                    row.append("-" if r is None or r.speedup is None else f"{r.speedup:.2f}x")
                c = cross.get((shape, dtype, device, N, name))
                rows.append(row + [str(c) if c else "-"])
        out.append(f"### Speed-up over dense: W {shape} @ X [K, N], {dtype}, {device}\n"
                   f"(dense time / time; > 1 means sparse wins; the last column is the crossover density)\n\n{_table(head, rows)}")

        # Bytes depend on the representation only; every backend of a structure shares it.
        reps: dict[str, dict[float, float]] = defaultdict(dict)
        for r in sparse:
            reps[r.structure].setdefault(r.density, r.bytes_ratio)
        if reps:
            head = ["structure", *(f"{_pct(d)} sparse" for d in densities)]
            rows = [[s, *(f"{reps[s][d]:.3f}" if d in reps[s] else "-" for d in densities)] for s in sorted(reps)]
            out.append(f"### Weight bytes over dense: {shape}, {dtype}\n"
                       f"(CSR / BSR with int32 indices, as stored by SparseLinear)\n\n{_table(head, rows)}")
    return out


def _model_table(benchmarks: Sequence[Mapping[str, Any]], stat: str) -> str | None:
    rows_by_key: dict[tuple, dict[str, tuple[float, Mapping]]] = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info") or {}
        seconds = _seconds(b, stat)
        if info.get("kind") == "model" and seconds:
            key = (info["model"], info.get("density_target", ""), info["batch"], info["device"])
            rows_by_key[key][info["variant"]] = (seconds, info)
    if not rows_by_key:
        return None
    head = ["model", "batch", "device", "variant", "density", "latency", "speed-up", "weight bytes", "bytes / dense",
            "sparse layers"]
    rows = []
    for key in sorted(rows_by_key, key=str):
        variants = rows_by_key[key]
        dense = variants.get("dense")
        for variant in sorted(variants, key=lambda v: (v != "dense", v)):
            seconds, info = variants[variant]
            speed = f"{dense[0] / seconds:.2f}x" if dense else "-"
            ratio = f"{info['weight_bytes'] / dense[1]['weight_bytes']:.3f}" if dense else "-"
            rows.append([info["model"], str(info["batch"]), info["device"], variant, f"{info['density']:.4f}",
                         _ms(seconds), speed, f"{info['weight_bytes']:,}", ratio,
                         str(len(info["sparse_layers"])) if "sparse_layers" in info else "-"])
    return f"### Models: dense against sparsify(...)\n\n{_table(head, rows)}"


def _masked_step_table(benchmarks: Sequence[Mapping[str, Any]], stat: str) -> str | None:
    steps: dict[tuple, dict[str, tuple[float, Mapping]]] = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info") or {}
        seconds = _seconds(b, stat)
        if info.get("kind") == "masked_step" and seconds:
            steps[(info["model"], info["batch"], info["device"])][info["variant"]] = (seconds, info)
    if not steps:
        return None
    head = ["model", "batch", "device", "plain step", "masked step", "ratio (these runs)",
            "ratio (interleaved)", "target"]
    rows = []
    for (model, batch, device), v in sorted(steps.items(), key=str):
        plain, masked = v.get("plain"), v.get("masked")
        ratio = f"{masked[0] / plain[0]:.3f}" if plain and masked else "-"
        inter = masked[1].get("ratio_interleaved") if masked else None
        target = masked[1].get("ratio_target", 1.3) if masked else 1.3
        rows.append([model, str(batch), device, _ms(plain[0]) if plain else "-", _ms(masked[0]) if masked else "-",
                     ratio, f"{inter:.3f}" if inter else "-", f"<= {target}"])
    return f"### Masked training step against a plain torch step\n\n{_table(head, rows)}"


def format_report(data: Mapping[str, Any], stat: str = "median") -> str:
    """The whole report as markdown text: machine, then kernel, model and masked-step tables."""
    machine = data.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw", machine.get("processor", "?"))
    parts = [f"Benchmarks from {data.get('datetime', '?')} on {machine.get('node', '?')} "
             f"({cpu}, {(machine.get('cpu') or {}).get('count', '?')} CPUs); times are the {stat}."]
    results = kernel_results(data, stat)
    parts += _kernel_tables(results)
    for table in (_model_table(data["benchmarks"], stat), _masked_step_table(data["benchmarks"], stat)):
        if table:
            parts.append(table)
    if len(parts) == 1:
        parts.append("(no benchmarks with timings: was the suite run with --benchmark-disable?)")
    return "\n\n".join(parts) + "\n"


# -- plots ---------------------------------------------------------------------------------------
def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _structure_order(structure: str) -> tuple[int, int]:
    """unstructured first, then blocks by size."""
    return (0, 0) if not structure.startswith("block") else (1, int(structure[5:] or 0))


def write_plots(results: Sequence[KernelResult], out_dir: str | Path) -> list[Path]:
    """PNG plots per (shape, dtype, device): speed-up against density for each batch size,
    weight bytes against density, and crossover density against batch size per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    cross = crossovers(results)
    by_group = _by_group(results)

    for (shape, dtype, device), group in sorted(by_group.items()):
        sparse = [r for r in group if not r.baseline and r.speedup is not None]
        if not sparse:
            continue
        backends = sorted({r.backend for r in sparse})
        structures = sorted({r.structure for r in sparse}, key=_structure_order)
        color = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
        batches = sorted({r.N for r in sparse})

        # speed-up against density: a row of panels per structure, a column per batch size
        fig, axes = plt.subplots(len(structures), len(batches),
                                 figsize=(3.6 * len(batches) + 1, 2.9 * len(structures) + 1.0),
                                 squeeze=False, sharex=True, sharey=True)
        for row, structure in zip(axes, structures):
            for ax, N in zip(row, batches):
                for backend in backends:
                    pts = sorted((r.density, r.speedup) for r in sparse
                                 if r.N == N and r.structure == structure and r.backend == backend)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, label=backend, color=color[backend])
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set(xscale="log", yscale="log", title=f"{structure}, N = {N}")
                ax.grid(True, which="both", alpha=0.3)
            row[0].set_ylabel("speed-up over dense")
        for ax in axes[-1]:
            ax.set_xlabel("density (log; sparser to the right)")
        axes[0][0].invert_xaxis()  # shared x: inverting once inverts all
        handles = [plt.Line2D([], [], color=color[b], marker="o", ms=3) for b in backends]
        height = fig.get_figheight()
        fig.suptitle(f"W {shape} @ X [K, N], {dtype}, {device}: speed-up over dense (> 1: sparse wins)",
                     y=1 - 0.1 / height)
        fig.legend(handles, backends, loc="upper center", ncol=len(backends), fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, 1 - 0.4 / height))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
        paths.append(out / f"speedup_{_slug(shape, dtype, device)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        # bytes against density (one line per structure; backends share the representation)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_structure: dict[str, dict[float, float]] = defaultdict(dict)
        for r in sparse:  # the measured density here: bytes follow what was stored
            by_structure[r.structure].setdefault(r.actual_density or r.density, r.bytes_ratio)
        for structure, pts in sorted(by_structure.items()):
            ax.plot(*zip(*sorted(pts.items())), marker="o", ms=3, label=structure)
        ds = sorted({r.density for r in sparse})
        ax.plot(ds, ds, color="gray", ls=":", label="values only (= density)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="density (log)", ylabel="weight bytes / dense bytes",
               title=f"{shape}, {dtype}: bytes of the representation")
        ax.invert_xaxis()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"bytes_{_slug(shape, dtype, device)}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        # crossover density against batch size: a panel per structure, a line per backend
        fig, axes = plt.subplots(1, len(structures), figsize=(3.8 * len(structures) + 0.5, 4.0),
                                 squeeze=False, sharey=True)
        for ax, structure in zip(axes[0], structures):
            for backend in backends:
                pts = [(N, cross.get((shape, dtype, device, N, f"{backend}/{structure}"))) for N in batches]
                pts = [(N, c) for N, c in pts if c is not None]
                found = [(N, c) for N, c in pts if c.density is not None]
                never = [N for N, c in pts if c.density is None]
                if not pts:
                    continue
                label = backend + (f" (never: N={','.join(map(str, never))})" if never else "")
                ax.plot([N for N, _ in found], [c.density for _, c in found], color=color[backend], label=label)
                for N, c in found:  # triangle: wins at every density measured, so "at or above"
                    ax.plot([N], [c.density], marker="^" if c.kind == "at_or_above" else "o", ms=5,
                            color=color[backend])
            ax.set(xscale="log", yscale="log", xlabel="batch N (columns of X)", title=structure)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        axes[0][0].set_ylabel("crossover density (sparse wins below)")
        fig.suptitle(f"{shape}, {dtype}, {device}: where sparse starts to win "
                     "(triangle: wins at every density measured)")
        fig.tight_layout()
        paths.append(out / f"crossover_{_slug(shape, dtype, device)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def make_report(json_path: str | Path, out_dir: str | Path | None = None, stat: str = "median") -> tuple[str, list[Path]]:
    """Read ``json_path``; return the report text and the plots written to ``out_dir`` (if any)."""
    data = load_results(json_path)
    text = format_report(data, stat)
    paths = write_plots(kernel_results(data, stat), out_dir) if out_dir is not None else []
    return text, paths
