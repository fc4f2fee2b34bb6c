"""Benchmark suite hooks: the ``bench`` marker and a header line naming what this session
measures. The options ``--bench-size`` / ``--bench-device`` / ``--bench-dtype`` are registered
in the root conftest.py (pytest must see them before it parses the command line).

Sizes (details in ``harness.SIZE_CONFIGS``):

* ``small``: CI smoke. Tiny shapes, every backend and structure, three densities; meant for
  ``--benchmark-disable`` (each benchmark runs once, its output checked against dense).
* ``default``: about 10 minutes on 2 CPU cores: 2048 x 2048 weights at every batch, 4096 x 4096
  at decode batches.
* ``large``: GPU-scale: 4096 x 4096 at N up to 4096, decode at 8192 x 8192 and 4096 x 16384.

Without ``--bench-size`` the size is ``default`` when benchmarks are run for their numbers
(``--benchmark-only`` or ``--benchmark-json``) and ``small`` otherwise, so that a plain
``pytest`` from the root stays a quick smoke test of the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import bench_devices, bench_size

BENCH_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)  # cpu_csr_matmul / cpu_bsr_matmul follow torch's setting
    config.addinivalue_line("markers", "bench: a benchmark under bench/ (deselect with -m 'not bench')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BENCH_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.bench)


def pytest_report_header(config: pytest.Config) -> str:
    devices = bench_devices(config)
    note = "" if torch.cuda.is_available() else " (no CUDA: Triton, cuBLAS and torch Triton BSR cases not generated)"
    return (f"sparse_lth bench: size={bench_size(config)}, devices={','.join(devices) or 'none'}{note}, "
            f"torch threads={torch.get_num_threads()}")
