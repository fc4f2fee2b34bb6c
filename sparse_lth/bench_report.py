"""Benchmark report: pytest-benchmark JSON -> tables (speed-up and bytes over dense, crossover
densities) and PNG plots. The logic behind ``sparse-lth report BENCH.json [--out DIR]``.

The JSON is what ``pytest bench/ --benchmark-json BENCH.json`` writes; each benchmark of
bench/ records what it measured in ``extra_info``:

* ``kind="kernel"``: one ``W @ X`` product (shape, batch N, dtype, device, backend, structure,
  density, bytes of the weight representation).
* ``kind="model"``: a whole model's forward pass, dense or sparsified.
* ``kind="masked_step"``: a training step with and without the mask multiply.

Speed-ups come from one run: each sparse benchmark times dense and sparse calls alternated in
short bursts and records ``speedup_interleaved`` (the median of bursts, ``ratio_stat``), and
that is the figure every table, crossover and plot uses. JSON written before that existed
falls back to dense time / time of two separate benchmarks (the baseline ``baseline=True`` of
the same shape, batch, dtype and device), in the statistic ``stat`` names, and says so: the
two were timed minutes apart, under whatever load each met. Every table and plot names the
statistic it shows, and the report's header and plot titles name the CPU and its vector ISA
(AVX2 / AVX-512), on which dense GEMM, and so every speed-up, depends.

The crossover density of a series (one backend and structure at one shape, batch, dtype and
device) is where sparse starts to beat dense, coming down from dense: between the densest
point that wins and the next denser point (which loses), with log speed-up interpolated
linearly in log density. A series that wins at every measured density crosses "at or above"
its densest point; one that never wins has none.

Only the standard library and matplotlib (Agg) are used: the report runs anywhere the JSON can be read.
"""

from __future__ import annotations

import gzip
import json
import math
import platform
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KernelResult",
    "Crossover",
    "Machine",
    "machine_summary",
    "vector_isa",
    "ratio_caption",
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
INTERLEAVED = "interleaved"  # a speed-up measured in the same run, dense and sparse alternated
SEPARATE = "separate"        # dense time / time of two benchmarks (JSON from before interleaving)
#: The x86 vector ISAs a report names, widest first, by the /proc/cpuinfo flag that shows each.
ISA_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))


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
    speedup_interleaved: float | None = None  # dense / sparse, alternated in one run
    ratio_stat: str | None = None             # the statistic of speedup_interleaved ("median")
    device_name: str | None = None

    @property
    def speedup(self) -> float | None:
        """Over dense (> 1: sparse wins): the interleaved ratio when measured, else dense time /
        this time from the separate benchmarks (see ``speedup_method``)."""
        if self.speedup_interleaved is not None:
            return self.speedup_interleaved
        return None if self.dense_seconds is None else self.dense_seconds / self.seconds

    @property
    def speedup_method(self) -> str | None:
        """``"interleaved"``, ``"separate"`` or None (no baseline to compare with)."""
        if self.speedup_interleaved is not None:
            return INTERLEAVED
        return None if self.dense_seconds is None else SEPARATE

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


def _float(value: Any) -> float | None:
    return float(value) if value else None


def kernel_results(data: Mapping[str, Any], stat: str = "median") -> list[KernelResult]:
    """The kernel benchmarks of ``data``, each joined to its dense baseline (whose ``stat`` time
    is the fallback speed-up's numerator and the tables' dense time)."""
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
            actual_density=float(info["density"]), speedup_interleaved=_float(info.get("speedup_interleaved")),
            ratio_stat=info.get("ratio_stat"), device_name=info.get("device_name"),
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


# -- the machine and the statistic ---------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name where Linux says it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_isa(flags: Iterable[str]) -> str | None:
    """The widest x86 vector ISA among a CPU's flags ("AVX-512", "AVX2", "AVX"), else None.

    >>> vector_isa(["sse4_2", "avx", "avx2", "avx512f"]), vector_isa(["avx2"]), vector_isa(["neon"])
    ('AVX-512', 'AVX2', None)
    """
    have = set(flags)
    return next((name for flag, name in ISA_FLAGS if flag in have), None)


@dataclass(frozen=True)
class Machine:
    """Where the benchmarks ran: the CPU, its vector ISA, cores, torch threads and the load."""

    cpu: str
    isa: str | None
    cores: int | None
    threads: tuple[int, ...]   # the torch thread counts the benchmarks ran with
    loads: tuple[float, ...]   # the 1-minute load average as each benchmark started

    @property
    def label(self) -> str:
        """Short, for plot titles: ``AMD EPYC, AVX-512, 2 threads``."""
        threads = f", {'/'.join(map(str, self.threads))} threads" if self.threads else ""
        return f"{self.cpu}, {self.isa or 'vector ISA unknown'}{threads}"

    def describe(self) -> str:
        """The report header's sentence about the machine."""
        cores = f", {self.cores} cores" if self.cores else ""
        threads = f"; torch threads {'/'.join(map(str, self.threads))}" if self.threads else ""
        if self.loads:
            load = (f"; load average (1 min) as the benchmarks started: {min(self.loads):.2f}-"
                    f"{max(self.loads):.2f}, median {statistics.median(self.loads):.2f}")
        else:
            load = "; load not recorded"
        return f"CPU: {self.cpu} ({self.isa or 'vector ISA unknown'}{cores}){threads}{load}."


def machine_summary(data: Mapping[str, Any]) -> Machine:
    """The machine of ``data``: from the benchmarks' ``extra_info`` (``cpu_model``, ``cpu_isa``,
    ``threads``, ``loadavg_1m``), else from pytest-benchmark's ``machine_info`` (py-cpuinfo's
    brand and flags), so older JSON still names its ISA."""
    infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
    machine = data.get("machine_info") or {}
    cpuinfo = machine.get("cpu") or {}

    def first(key: str) -> Any:
        return next((i[key] for i in infos if i.get(key)), None)

    return Machine(
        cpu=str(first("cpu_model") or cpuinfo.get("brand_raw") or machine.get("processor") or "?"),
        isa=first("cpu_isa") or vector_isa(cpuinfo.get("flags") or ()),
        cores=first("cpu_count") or cpuinfo.get("count"),
        threads=tuple(sorted({int(i["threads"]) for i in infos if i.get("threads")})),
        loads=tuple(float(i["loadavg_1m"]) for i in infos if i.get("loadavg_1m") is not None),
    )


def ratio_caption(methods: Iterable[str | None], stat: str, ratio_stat: str | None = None) -> str:
    """What a set of speed-ups is: the interleaved ratio's statistic, the fallback's, or both
    (then the fallback cells carry a ``*``)."""
    kinds = {m for m in methods if m}
    interleaved = f"{ratio_stat or 'median'} of interleaved bursts (dense and sparse alternated in one run)"
    separate = f"dense {stat} / sparse {stat} from separate benchmarks (older method, not interleaved)"
    if kinds == {INTERLEAVED}:
        return interleaved
    if kinds == {SEPARATE}:
        return separate
    if not kinds:
        return "no speed-ups (no dense baseline)"
    return f"{interleaved}; cells marked * are {separate}"


def _ratio_short(methods: Iterable[str | None], stat: str, ratio_stat: str | None = None) -> str:
    """The statistic in a few words, for plot titles and axes."""
    kinds = {m for m in methods if m}
    if kinds == {SEPARATE}:
        return f"dense {stat} / {stat}, separate runs"
    short = f"{ratio_stat or 'median'} of interleaved bursts"
    return short if kinds == {INTERLEAVED} else f"{short} (* separate runs)"


def _ratio_stat(results: Iterable[KernelResult]) -> str | None:
    return next((r.ratio_stat for r in results if r.ratio_stat), None)


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


def _times(ratio: float, marked: bool) -> str:
    """A speed-up cell; ``marked``: from the fallback in a table that mixes both methods."""
    return f"{ratio:.2f}x" + ("*" if marked else "")


def _by_group(results: Sequence[KernelResult]) -> dict[tuple[str, str, str], list[KernelResult]]:
    """Results by (shape, dtype, device): one table and one figure each."""
    groups: dict[tuple[str, str, str], list[KernelResult]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    return groups


def _device_label(group: Sequence[KernelResult], machine: Machine) -> str:
    """The device a group ran on, for captions: the GPU's name, or the CPU with its ISA."""
    device = group[0].device
    if device == "cpu":
        return f"cpu: {machine.label}"
    return f"{device}: {next((r.device_name for r in group if r.device_name), device)}"


def _kernel_tables(results: Sequence[KernelResult], machine: Machine, stat: str) -> list[str]:
    out: list[str] = []
    cross = crossovers(results)
    by_group = _by_group(results)
    for (shape, dtype, device), group in sorted(by_group.items()):
        sparse = [r for r in group if not r.baseline]
        methods = {r.speedup_method for r in sparse}
        mixed = {INTERLEAVED, SEPARATE} <= methods
        densities = sorted({r.density for r in sparse}, reverse=True)
        head = ["N", "backend/structure", f"dense time ({stat})", *(f"{_pct(d)} sparse" for d in densities),
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
                    row.append("-" if r is None or r.speedup is None
                               else _times(r.speedup, mixed and r.speedup_method == SEPARATE))
                c = cross.get((shape, dtype, device, N, name))
                rows.append(row + [str(c) if c else "-"])
        caption = ratio_caption(methods, stat, _ratio_stat(sparse))
        out.append(f"### Speed-up over dense: W {shape} @ X [K, N], {dtype}, {_device_label(group, machine)}\n"
                   f"(speed-up = dense time / sparse time, the {caption}; > 1 means sparse wins; "
                   f"the last column is the crossover density, from the same speed-ups)\n\n{_table(head, rows)}")

        # Bytes depend on the representation only; every backend of a structure shares it.
        reps: dict[str, dict[float, float]] = defaultdict(dict)
        for r in sparse:
            reps[r.structure].setdefault(r.density, r.bytes_ratio)
        if reps:
            head = ["structure", *(f"{_pct(d)} sparse" for d in densities)]
            rows = [[s, *(f"{reps[s][d]:.3f}" if d in reps[s] else "-" for d in densities)] for s in sorted(reps)]
            out.append(f"### Weight bytes over dense: {shape}, {dtype}\n"
                       f"(CSR / BSR with int32 indices, as stored by SparseLinear; counted, not timed)\n\n"
                       f"{_table(head, rows)}")
    return out


def _model_speedup(seconds: float, info: Mapping[str, Any], dense: tuple[float, Mapping] | None
                   ) -> tuple[float | None, str | None]:
    """(speed-up over the dense model, method): the interleaved ratio when recorded."""
    if info.get("speedup_interleaved"):
        return float(info["speedup_interleaved"]), INTERLEAVED
    if dense:
        return dense[0] / seconds, SEPARATE
    return None, None


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
    speedups: dict[tuple, tuple[float | None, str | None]] = {}
    for key, variants in rows_by_key.items():
        for variant, (seconds, info) in variants.items():
            if variant != "dense":
                speedups[(key, variant)] = _model_speedup(seconds, info, variants.get("dense"))
    methods = {method for _, method in speedups.values()}
    mixed = {INTERLEAVED, SEPARATE} <= methods
    ratio_stat = next((i.get("ratio_stat") for v in rows_by_key.values() for _, i in v.values()
                       if i.get("ratio_stat")), None)
    head = ["model", "batch", "device", "variant", "density", f"latency ({stat})", "speed-up", "weight bytes",
            "bytes / dense", "sparse layers"]
    rows = []
    for key in sorted(rows_by_key, key=str):
        variants = rows_by_key[key]
        dense = variants.get("dense")
        for variant in sorted(variants, key=lambda v: (v != "dense", v)):
            seconds, info = variants[variant]
            ratio, method = speedups.get((key, variant), (1.0, None))
            speed = "-" if ratio is None else _times(ratio, mixed and method == SEPARATE)
            ratio_bytes = f"{info['weight_bytes'] / dense[1]['weight_bytes']:.3f}" if dense else "-"
            rows.append([info["model"], str(info["batch"]), info["device"], variant, f"{info['density']:.4f}",
                         _ms(seconds), speed, f"{info['weight_bytes']:,}", ratio_bytes,
                         str(len(info["sparse_layers"])) if "sparse_layers" in info else "-"])
    return (f"### Models: dense against sparsify(...)\n"
            f"(speed-up = dense forward / sparse forward, the {ratio_caption(methods, stat, ratio_stat)})"
            f"\n\n{_table(head, rows)}")


def _masked_step_table(benchmarks: Sequence[Mapping[str, Any]], stat: str) -> str | None:
    steps: dict[tuple, dict[str, tuple[float, Mapping]]] = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info") or {}
        seconds = _seconds(b, stat)
        if info.get("kind") == "masked_step" and seconds:
            steps[(info["model"], info["batch"], info["device"])][info["variant"]] = (seconds, info)
    if not steps:
        return None
    ratio_stat = next((i.get("ratio_stat") for v in steps.values() for _, i in v.values() if i.get("ratio_stat")),
                      None) or "median"
    head = ["model", "batch", "device", f"plain step ({stat})", f"masked step ({stat})",
            f"ratio ({stat}s, separate benchmarks)", f"ratio ({ratio_stat} of interleaved bursts)", "target"]
    rows = []
    for (model, batch, device), v in sorted(steps.items(), key=str):
        plain, masked = v.get("plain"), v.get("masked")
        ratio = f"{masked[0] / plain[0]:.3f}" if plain and masked else "-"
        inter = masked[1].get("ratio_interleaved") if masked else None
        target = masked[1].get("ratio_target", 1.3) if masked else 1.3
        rows.append([model, str(batch), device, _ms(plain[0]) if plain else "-", _ms(masked[0]) if masked else "-",
                     ratio, f"{inter:.3f}" if inter else "-", f"<= {target}"])
    return (f"### Masked training step against a plain torch step\n"
            f"(ratio = masked / plain; the interleaved one, plain and masked steps alternated in one run, "
            f"is the figure to quote)\n\n{_table(head, rows)}")


def format_report(data: Mapping[str, Any], stat: str = "median") -> str:
    """The whole report as markdown text: machine and statistics, then kernel, model and
    masked-step tables."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    machine = machine_summary(data)
    results = kernel_results(data, stat)
    node = (data.get("machine_info") or {}).get("node", "?")
    parts = [f"Benchmarks from {data.get('datetime', '?')} on {node}. {machine.describe()}\n"
             f"Times are the {stat} of each benchmark's rounds; each speed-up table says which statistic "
             f"its ratios are (interleaved: dense and sparse alternated in short bursts in one run, the "
             f"median of bursts; --stat does not change those)."]
    parts += _kernel_tables(results, machine, stat)
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


def write_plots(results: Sequence[KernelResult], out_dir: str | Path, machine: Machine | None = None,
                stat: str = "median") -> list[Path]:
    """PNG plots per (shape, dtype, device): speed-up against density for each batch size,
    weight bytes against density, and crossover density against batch size per backend.

    Titles name the statistic of the speed-ups (see :func:`ratio_caption`; ``stat`` is the
    fallback's) and the device: the CPU with its vector ISA (``machine``) or the GPU."""
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
        how = _ratio_short({r.speedup_method for r in sparse}, stat, _ratio_stat(sparse))
        where = _device_label(group, machine or Machine("?", None, None, (), ()))
        backends = sorted({r.backend for r in sparse})
        structures = sorted({r.structure for r in sparse}, key=_structure_order)
        color = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
        batches = sorted({r.N for r in sparse})

        # speed-up against density: a row of panels per structure, a column per batch size
        fig, axes = plt.subplots(len(structures), len(batches),
                                 figsize=(3.6 * len(batches) + 1, 2.9 * len(structures) + 1.3),
                                 squeeze=False, sharex=True, sharey=True)
        for row, structure in zip(axes, structures):
            for ax, N in zip(row, batches):
                for backend in backends:
                    pts = sorted((r.density, r.speedup) for r in sparse
                                 if r.N == N and r.structure == structure and r.backend == backend)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, label=backend, color=color[backend])
                    separate = [(r.density, r.speedup) for r in sparse if r.speedup_method == SEPARATE and
                                r.N == N and r.structure == structure and r.backend == backend]
                    if separate and len(separate) < len(pts):  # mixed: mark the fallback points
                        ax.plot(*zip(*separate), ls="none", marker="*", ms=7, color=color[backend])
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set(xscale="log", yscale="log", title=f"{structure}, N = {N}")
                ax.grid(True, which="both", alpha=0.3)
            row[0].set_ylabel("speed-up over dense")
        for ax in axes[-1]:
            ax.set_xlabel("density (log; sparser to the right)")
        axes[0][0].invert_xaxis()  # shared x: inverting once inverts all
        handles = [plt.Line2D([], [], color=color[b], marker="o", ms=3) for b in backends]
        height = fig.get_figheight()
        fig.suptitle(f"W {shape} @ X [K, N], {dtype}, {where}\nspeed-up over dense ({how}; > 1: sparse wins)",
                     y=1 - 0.1 / height)
        fig.legend(handles, backends, loc="upper center", ncol=len(backends), fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, 1 - 0.6 / height))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
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
        fig.suptitle(f"{shape}, {dtype}, {where}: where sparse starts to win\n"
                     f"(speed-ups: {how}; triangle: wins at every density measured)", fontsize=10)
        fig.tight_layout()
        paths.append(out / f"crossover_{_slug(shape, dtype, device)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def make_report(json_path: str | Path, out_dir: str | Path | None = None, stat: str = "median") -> tuple[str, list[Path]]:
    """Read ``json_path``; return the report text and the plots written to ``out_dir`` (if any)."""
    data = load_results(json_path)
    text = format_report(data, stat)
    paths = (write_plots(kernel_results(data, stat), out_dir, machine_summary(data), stat)
             if out_dir is not None else [])
    return text, paths
