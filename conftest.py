"""Root conftest: the benchmark suite's command-line options and hooks (bench/ has no conftest).

They live here because pytest reads options only from conftests it loads before parsing the
command line, and picks those from the paths given: ``pytest --bench-size small`` would read
``small`` as a path and never load a bench/conftest.py. This file is loaded for any path in the
repository. (A bench/conftest.py would also shadow tests/conftest.py for test modules that
``from conftest import ...``: rootless conftests share the module name ``conftest``.)

Options: ``--bench-size small|default|large``, ``--bench-device``, ``--bench-dtype``,
``--bench-threads`` (bench/harness.py reads them). Every item under bench/ gets the ``bench``
marker, so ``pytest -m "not bench"`` runs the tests alone.
"""

from pathlib import Path

import pytest
import torch

# Read before tests/conftest.py pins torch to one thread (for the tests' sake): the benchmarks
# run on torch's default, every core, unless --bench-threads says otherwise.
DEFAULT_THREADS = torch.get_num_threads()
BENCH_DIR = Path(__file__).resolve().parent / "bench"
_THREADS_BEFORE = pytest.StashKey[int]()


def pytest_addoption(parser):
    group = parser.getgroup("sparse_lth bench")
    group.addoption("--bench-size", choices=("small", "default", "large"), default=None,
                    help="benchmark sizes: small (CI smoke), default (~10 min on 2 CPU cores), large "
                         "(GPU-scale); default: 'default' with --benchmark-only / --benchmark-json, else 'small'")
    group.addoption("--bench-device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                    help="benchmark devices: auto = cuda when available, else cpu; all = cpu and cuda")
    group.addoption("--bench-dtype", default=None,
                    help="benchmark dtypes, comma-separated, e.g. float32,bfloat16 (default: float32 on "
                         "the CPU, bfloat16,float16 on CUDA)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the benchmarks (the CPU kernels follow it; default: torch's)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a benchmark under bench/ (deselect with -m 'not bench')")


def _is_bench(item) -> bool:
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def pytest_runtest_setup(item):
    if _is_bench(item):  # cpu_csr_matmul / cpu_bsr_matmul follow torch's setting too
        item.stash[_THREADS_BEFORE] = torch.get_num_threads()
        torch.set_num_threads(item.config.getoption("--bench-threads") or DEFAULT_THREADS)


def pytest_runtest_teardown(item):
    if _THREADS_BEFORE in item.stash:
        torch.set_num_threads(item.stash[_THREADS_BEFORE])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_bench(item):
            item.add_marker(pytest.mark.bench)


def pytest_report_header(config):
    size = config.getoption("--bench-size") or (
        "default" if config.getoption("benchmark_only", False) or config.getoption("benchmark_json", None)
        else "small")
    threads = config.getoption("--bench-threads") or DEFAULT_THREADS
    return (f"sparse_lth bench: --bench-size {size}, --bench-device {config.getoption('--bench-device')}, "
            f"{threads} torch threads (Triton, cuBLAS and torch Triton BSR cases only with CUDA)")
