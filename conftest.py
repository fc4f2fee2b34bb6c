"""Root conftest: registers the benchmark suite's command-line options (bench/conftest.py has
the rest of its hooks).

They live here because pytest reads options only from conftests it loads before parsing the
command line, and it picks those from the paths given: ``pytest --bench-size small`` would
read ``small`` as a path and never load bench/conftest.py. This file is loaded for any path in
the repository.
"""


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
