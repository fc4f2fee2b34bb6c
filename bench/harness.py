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

Without ``--bench-size`` the size is ``default`` when the run is for numbers
(``--benchmark-only`` or ``--benchmark-json``) and ``small`` otherwise, so a plain ``pytest``
from the root stays a quick smoke test of the benchmarks.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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


#: A call slower than this gets only two timed rounds (it loses to dense by a wide margin, and
#: five rounds of it would take most of the default suite's time budget).
SLOW_CALL_S = 1.0

ALL_DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)  # 50, 80, 90, 95, 98, 99 % sparsity
ALL_STRUCTURES = ("unstructured", "block16", "block32", "block64")

SIZE_CONFIGS: dict[str, SizeConfig] = {
    "small": SizeConfig(
        shapes={(256, 512): (1, 16, 128)},
        densities=(0.5, 0.1, 0.01), structures=ALL_STRUCTURES,
        mlp_width=256, mlp_densities=(0.1,), model_batches=(1, 64),
        lenet_rounds=2, lenet_iterations=40,
        target_s=0.02, min_rounds=1, max_rounds=20,
    ),
    "default": SizeConfig(
        shapes={(2048, 2048): (1, 16, 128, 1024), (4096, 4096): (1, 16)},
        densities=ALL_DENSITIES, structures=ALL_STRUCTURES,
        mlp_width=4096, mlp_densities=(0.1, 0.02), model_batches=(1, 64, 1024),
        lenet_rounds=10, lenet_iterations=300,
        target_s=0.15, min_rounds=5, max_rounds=300,
    ),
    "large": SizeConfig(
        shapes={(4096, 4096): (1, 16, 128, 1024, 4096), (8192, 8192): (1, 16), (4096, 16384): (1, 16)},
        densities=ALL_DENSITIES, structures=ALL_STRUCTURES,
        mlp_width=4096, mlp_densities=(0.1, 0.02), model_batches=(1, 64, 1024, 4096),
        lenet_rounds=15, lenet_iterations=500,
        target_s=0.3, min_rounds=5, max_rounds=1000,
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


def device_name(device: str) -> str:
    """A human name for the machine a figure was measured on."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


# -- timing --------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call takes, the device synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def run_benchmark(benchmark, fn: Callable[[], object], device: str, cfg: SizeConfig) -> float | None:
    """Time ``fn`` with pytest-benchmark for about ``cfg.target_s``; return the median (s).

    Rounds are sized from one warm call, so a 10 us kernel and a 1 s one both get a stable figure
    in bounded time (pytest-benchmark's own calibration can spend many seconds on slow ones).
    Under ``--benchmark-disable`` ``fn`` runs once and None comes back.
    """
    def call() -> None:
        fn()
        synchronize(device)  # a GPU figure covers the kernel, not just its launch

    if benchmark.disabled:
        benchmark.pedantic(call, rounds=1, iterations=1)
        return None
    once = timed_call(fn, device)
    if once < cfg.target_s / 10:  # cheap: the least of a few calls, so one stall does not cut the rounds
        once = min(once, timed_call(fn, device), timed_call(fn, device))
    once = max(once, 1e-7)
    rounds = int(min(cfg.max_rounds, max(cfg.min_rounds, math.ceil(cfg.target_s / once))))
    if once > SLOW_CALL_S:  # seconds per call (scipy's BSR at N=1024): far off dense, 2 rounds tell enough
        rounds = 2
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 3 else 0)
    return float(benchmark.stats.stats.median)


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
