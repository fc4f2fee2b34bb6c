"""What every benchmark module shares: the sizes, the session's devices and dtypes, timing, and
the correctness check each benchmark makes before it is timed.

Benchmark modules import it by name (bench/ is not a package, and pytest puts bench/ on
``sys.path``). The command-line options are registered in the root conftest.py.

Sizes (``--bench-size``, see ``SIZE_CONFIGS``):

* ``small``: CI smoke. Tiny shapes, every backend and structure, three densities; meant for
  ``--benchmark-disable`` (each benchmark runs once, its output checked against dense).
* ``default``: about 8-10 minutes on 2 CPU cores: 2048 x 2048 weights at N = 1..1024,
  4096 x 4096 at decode batches (N = 1, 16).
* ``large``: GPU-scale: 4096 x 4096 at N up to 4096, decode at 8192 x 8192 and 4096 x 16384.

Ratios (sparse over dense, masked over plain) are measured in one run with the variants
alternated in short bursts (:func:`interleaved`, :func:`run_interleaved`): on a shared
machine, load from other processes then hits both sides alike, and both come from the same
rounds and the same statistic (the median of bursts). pytest-benchmark's own rounds still give
each benchmark's plain time. Interleaving does not undo steady load: a busy core stalls every
call of a 2-thread product by about the same time, which shrinks the ratios of short calls most.
So each benchmark records the load it met (``loadavg_1m``) and every burst
(``interleaved_bursts_s``).

Without ``--bench-size`` the size is ``default`` when the run is for numbers
(``--benchmark-only`` or ``--benchmark-json``) and ``small`` otherwise, so a plain ``pytest``
from the root stays a quick smoke test of the benchmarks.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sparse_lth.bench_report import cpu_model, vector_isa

SIZES = ("small", "default", "large")
BENCH_DIR = Path(__file__).resolve().parent

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# allclose tolerance per dtype, relative, and absolute as a share of max |reference|: the check
# has to catch a wrong kernel (errors of order 1), not grade rounding (tests/ does that).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class SizeConfig:
    """What one ``--bench-size`` measures, and how long each benchmark may take."""

    # kernel level: (M, K) -> batches N
    shapes: dict[tuple[int, int], tuple[int, ...]]
    densities: tuple[float, ...]          # sparse densities; 1.0 (dense) is always the baseline
    structures: tuple[str, ...]           # "unstructured", "block16", "block32", "block64"
    # model level
    mlp_width: int
    mlp_densities: tuple[float, ...]
    model_batches: tuple[int, ...]
    lenet_rounds: int
    lenet_iterations: int
    # timing: each benchmark runs about ``target_s`` (rounds in [min_rounds, max_rounds])
    target_s: float
    min_rounds: int
    max_rounds: int
    # interleaved ratios: about ``interleaved_s`` for all variants together, in at most
    # ``bursts`` alternating bursts per variant (fewer, down to MIN_BURSTS, for slow calls)
    interleaved_s: float
    bursts: int


#: A call slower than this gets one timed round of its own (it loses to dense by a wide margin,
#: five rounds of it would take most of the default suite's time budget, and its interleaved
#: ratio times it MIN_BURSTS more times).
SLOW_CALL_S = 1.0
#: The fewest bursts per variant of an interleaved ratio: a median of three still drops one
#: stalled burst; slow calls (seconds each) get this many, one call per burst.
MIN_BURSTS = 3
#: The statistic every interleaved ratio is computed from, named in extra_info and the report.
RATIO_STAT = "median"

ALL_DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)  # 50, 80, 90, 95, 98, 99 % sparsity
ALL_STRUCTURES = ("unstructured", "block16", "block32", "block64")

SIZE_CONFIGS: dict[str, SizeConfig] = {
    "small": SizeConfig(
        shapes={(256, 512): (1, 16, 128)},
        densities=(0.5, 0.1, 0.01), structures=ALL_STRUCTURES,
        mlp_width=256, mlp_densities=(0.1,), model_batches=(1, 64),
        lenet_rounds=2, lenet_iterations=40,
        target_s=0.02, min_rounds=1, max_rounds=20,
        interleaved_s=0.02, bursts=3,
    ),
    "default": SizeConfig(
        shapes={(2048, 2048): (1, 16, 128, 1024), (4096, 4096): (1, 16)},
        densities=ALL_DENSITIES, structures=ALL_STRUCTURES,
        mlp_width=4096, mlp_densities=(0.1, 0.02), model_batches=(1, 64, 1024),
        lenet_rounds=10, lenet_iterations=300,
        target_s=0.1, min_rounds=5, max_rounds=300,
        interleaved_s=0.15, bursts=7,
    ),
    "large": SizeConfig(
        shapes={(4096, 4096): (1, 16, 128, 1024, 4096), (8192, 8192): (1, 16), (4096, 16384): (1, 16)},
        densities=ALL_DENSITIES, structures=ALL_STRUCTURES,
        mlp_width=4096, mlp_densities=(0.1, 0.02), model_batches=(1, 64, 1024, 4096),
        lenet_rounds=15, lenet_iterations=500,
        target_s=0.3, min_rounds=5, max_rounds=1000,
        interleaved_s=0.4, bursts=9,
    ),
}


# -- the session's choices -----------------------------------------------------------------------
def bench_size(config: pytest.Config) -> str:
    """The size this session measures: ``--bench-size``, else ``default`` when the run is for
    numbers (``--benchmark-only`` / ``--benchmark-json``), else ``small`` (a plain ``pytest``)."""
    size = config.getoption("--bench-size", default=None)
    if size:
        return size
    timed = config.getoption("benchmark_only", default=False) or config.getoption("benchmark_json", default=None)
    return "default" if timed else "small"


def size_config(config: pytest.Config) -> SizeConfig:
    return SIZE_CONFIGS[bench_size(config)]


def bench_devices(config: pytest.Config) -> list[str]:
    """Devices to measure: ``--bench-device`` (auto: CUDA when there is one, else the CPU)."""
    choice = config.getoption("--bench-device", default="auto")
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return ["cuda"] if cuda else ["cpu"]
    if choice == "all":
        return ["cpu", "cuda"] if cuda else ["cpu"]
    if choice == "cuda" and not cuda:
        return []
    return [choice]


def bench_dtypes(config: pytest.Config, device: str) -> list[torch.dtype]:
    """``--bench-dtype``, else fp32 on the CPU (torch's sparse CPU product refuses halves) and
    bf16 and fp16 on CUDA (fp16 is what torch's Triton BSR was tuned on)."""
    text = config.getoption("--bench-dtype", default=None)
    if text:
        try:
            return [DTYPES[name.strip()] for name in text.split(",") if name.strip()]
        except KeyError as e:
            raise pytest.UsageError(f"--bench-dtype: unknown dtype {e}; choose from {', '.join(DTYPES)}") from None
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


def cpu_isa() -> str:
    """The widest x86 vector ISA the CPU reports: "AVX-512" (``avx512f``), "AVX2", "AVX", else
    the architecture (e.g. "aarch64"). Dense GEMM's speed, and so every speed-up over dense,
    depends on it: the same product differs about 2x between an AVX2 and an AVX-512 machine."""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return vector_isa(flags) or platform.machine() or "unknown"


def device_name(device: str) -> str:
    """A human name for the machine a figure was measured on: the GPU, or the CPU with its cores
    and vector ISA."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores, {cpu_isa()})"


def machine_info(device: str) -> dict[str, Any]:
    """What every benchmark records about where and under what load it ran (``extra_info``).

    The CPU fields describe the host also for CUDA figures. ``loadavg_1m`` is the 1-minute load
    average as the benchmark starts: on a shared machine it says how much else was running.
    """
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "device_name": device_name(device), "cpu_model": cpu_model(), "cpu_isa": cpu_isa(),
        "torch_cpu_capability": capability, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# -- timing --------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured whole in a CUDA graph (after three warm-up calls on a side stream, which
    also run Triton's compiler and autotuner outside the capture): its replay. What a model run
    under CUDA graphs pays per call: the GPU's time, not the host's launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def add_graphed(fns: dict[str, Callable[[], object]], names: tuple[str, ...]) -> dict[str, str]:
    """Add ``<name>_graph``, the :func:`graphed` replay of ``fns[name]``, for each of ``names``;
    returns the captures that failed, by key, with their errors (the eager calls still run)."""
    errors = {}
    for name in names:
        try:
            fns[f"{name}_graph"] = graphed(fns[name])
        except Exception as exc:  # noqa: BLE001 - recorded, the rest still timed
            errors[f"{name}_graph"] = f"{type(exc).__name__}: {exc}"[:400]
            torch.cuda.synchronize()
    return errors


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call takes, the device synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def warm_time(fn: Callable[[], object], device: str, cfg: SizeConfig) -> float:
    """Seconds of one warm call of ``fn`` (it also warms caches and allocators): the least of
    three when calls are cheap, so one stall does not size the rounds."""
    once = timed_call(fn, device)
    if once < cfg.target_s / 10:
        once = min(once, timed_call(fn, device), timed_call(fn, device))
    return max(once, 1e-7)


def run_benchmark(benchmark, fn: Callable[[], object], device: str, cfg: SizeConfig,
                  once: float | None = None) -> float | None:
    """Time ``fn`` with pytest-benchmark for about ``cfg.target_s``; return the median (s).

    Rounds are sized from one warm call (``once``, measured here unless given), so a 10 us
    kernel and a 1 s one both get a stable figure in bounded time (pytest-benchmark's own
    calibration can spend many seconds on slow ones). Under ``--benchmark-disable`` ``fn`` runs
    once and None comes back.
    """
    def call() -> None:
        fn()
        synchronize(device)  # a GPU figure covers the kernel, not just its launch

    if benchmark.disabled:
        benchmark.pedantic(call, rounds=1, iterations=1)
        return None
    once = once if once is not None else warm_time(fn, device, cfg)
    rounds = int(min(cfg.max_rounds, max(cfg.min_rounds, math.ceil(cfg.target_s / once))))
    if once > SLOW_CALL_S:  # seconds per call (scipy's BSR at N=1024): far off dense, one round tells enough
        rounds = 1
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 3 else 0)
    return float(benchmark.stats.stats.median)


# -- interleaved ratios --------------------------------------------------------------------------
@dataclass(frozen=True)
class Interleaved:
    """Per-call seconds of several variants timed in alternating bursts.

    ``burst_seconds[name]`` holds each burst's seconds per call, in order; ``calls[name]`` how
    many calls each of its bursts made. A variant's figure is the median over its bursts.
    """

    burst_seconds: dict[str, list[float]]
    calls: dict[str, int]
    stat: str = RATIO_STAT

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per call of each variant: the median of its bursts."""
        return {name: statistics.median(t) for name, t in self.burst_seconds.items()}

    @property
    def bursts(self) -> int:
        return min(len(t) for t in self.burst_seconds.values())

    def ratio(self, numerator: str, denominator: str) -> float:
        seconds = self.seconds
        return seconds[numerator] / seconds[denominator]

    def extra_info(self) -> dict[str, Any]:
        """What a benchmark records: ``<name>_interleaved_s`` per variant, ``ratio_stat``,
        ``interleaved_rounds``, ``interleaved_calls`` and every burst (``interleaved_bursts_s``),
        so a ratio taken under load can be recognised afterwards by its spread."""
        return {**{f"{name}_interleaved_s": s for name, s in self.seconds.items()},
                "ratio_stat": self.stat, "interleaved_rounds": self.bursts, "interleaved_calls": dict(self.calls),
                "interleaved_bursts_s": {name: list(t) for name, t in self.burst_seconds.items()}}


def time_burst(fn: Callable[[], object], calls: int, device: str) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn`` (one burst)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def interleaved(fns: Mapping[str, Callable[[], object]], device: str, bursts: int,
                calls: Mapping[str, int]) -> Interleaved:
    """Time the ``fns`` in turn, ``calls[name]`` calls a burst, ``bursts`` times round; the
    median over bursts of each variant's seconds per call.

    Alternating short bursts is what makes the ratio fair on a shared machine: a stall from
    another process lands on one burst of one variant, and the median drops it; a slow phase
    of the machine slows both variants' neighbouring bursts alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(bursts):
        for name, fn in fns.items():
            times[name].append(time_burst(fn, calls[name], device))
    return Interleaved(times, dict(calls))


def burst_plan(once: Mapping[str, float], cfg: SizeConfig) -> tuple[int, dict[str, int]]:
    """(bursts, calls per burst for each variant) so that all bursts together take about
    ``cfg.interleaved_s``.

    Each variant's burst lasts about the same time (a 10 us call gets hundreds of calls, a
    3 ms one a few), so each is timed in its steady state. Calls too slow for the budget get one
    call per burst and only MIN_BURSTS bursts.
    """
    burst_s = cfg.interleaved_s / (cfg.bursts * len(once))
    calls = {name: max(1, round(burst_s / max(t, 1e-7))) for name, t in once.items()}
    per_round = sum(calls[name] * t for name, t in once.items())
    bursts = int(min(cfg.bursts, max(min(MIN_BURSTS, cfg.bursts), round(cfg.interleaved_s / max(per_round, 1e-9)))))
    return bursts, calls


def run_interleaved(benchmark, fns: Mapping[str, Callable[[], object]], timed: str, device: str,
                    cfg: SizeConfig) -> Interleaved | None:
    """Benchmark ``fns[timed]`` with pytest-benchmark and measure every variant of ``fns``
    interleaved (sized by :func:`burst_plan`); record in ``benchmark.extra_info`` what
    :meth:`Interleaved.extra_info` lists. The caller records the ratio it means (a speed-up, a
    slowdown).

    When ``timed`` gets one call per burst (a slow call), pytest-benchmark's rounds are the
    interleaved bursts themselves, the other variants' bursts run (and timed here) as each
    round's setup: a call of seconds is not timed twice. Otherwise the bursts are timed first
    and pytest-benchmark's rounds follow (:func:`run_benchmark`).

    Under ``--benchmark-disable`` ``fns[timed]`` runs once and None comes back: the smoke run
    checks outputs, it measures nothing.
    """
    if benchmark.disabled:
        run_benchmark(benchmark, fns[timed], device, cfg)
        return None
    once = {name: warm_time(fn, device, cfg) for name, fn in fns.items()}
    bursts, calls = burst_plan(once, cfg)
    if calls[timed] == 1:
        result = _interleaved_in_rounds(benchmark, fns, timed, device, bursts, calls)
    else:
        result = interleaved(fns, device, bursts, calls)
        run_benchmark(benchmark, fns[timed], device, cfg, once=once[timed])
    benchmark.extra_info.update(result.extra_info())
    return result


def _interleaved_in_rounds(benchmark, fns: Mapping[str, Callable[[], object]], timed: str, device: str,
                           bursts: int, calls: Mapping[str, int]) -> Interleaved:
    """Interleaved bursts where ``fns[timed]`` (one call a burst) is pytest-benchmark's round and
    the other variants' bursts are its setup: both statistics come from the same calls."""
    others = {name: fn for name, fn in fns.items() if name != timed}
    times: dict[str, list[float]] = {name: [] for name in others}

    def other_bursts() -> None:  # pytest-benchmark does not time a round's setup; this does
        for name, fn in others.items():
            times[name].append(time_burst(fn, calls[name], device))

    def call() -> None:
        fns[timed]()
        synchronize(device)

    benchmark.pedantic(call, setup=other_bursts, rounds=bursts, iterations=1)
    times[timed] = [float(t) for t in benchmark.stats.stats.data]  # pytest-benchmark's own rounds
    return Interleaved(times, dict(calls))


def run_speedup(benchmark, dense: Callable[[], object], sparse: Callable[[], object], device: str,
                cfg: SizeConfig) -> float | None:
    """Benchmark ``sparse`` and its speed-up over ``dense`` (:func:`run_interleaved`, variants
    "dense" and "sparse"), recorded as ``extra_info["speedup_interleaved"]`` (> 1: sparse wins)."""
    result = run_interleaved(benchmark, {"dense": dense, "sparse": sparse}, "sparse", device, cfg)
    if result is None:
        return None
    speedup = result.ratio("dense", "sparse")
    benchmark.extra_info["speedup_interleaved"] = speedup
    return speedup


# -- correctness ---------------------------------------------------------------------------------
def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """The check every benchmark makes once before it is timed, so a wrong kernel cannot score."""
    tol = CHECK_TOLERANCE[dtype]
    out = out.to(device=ref.device, dtype=ref.dtype)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=tol, atol=tol * max(scale, 1e-30)):
        err = float((out - ref).abs().max()) if out.shape == ref.shape else float("nan")
        pytest.fail(f"{what}: output differs from dense (shape {tuple(out.shape)} vs {tuple(ref.shape)}, "
                    f"max abs error {err:.3g}, max |ref| {scale:.3g}, tolerance {tol:g} relative to it)")
