"""When the Triton kernels beat dense cuBLAS on CUDA: the measured density x N rule behind
``backend="auto"`` on a GPU (the CPU's twin is :func:`sparse_lth.kernels.cpu.auto_cpu_backend`).

The table holds, per format (CSR, or BSR by block rows) and per bucket of N (columns of X, rows
of a linear layer's input), the highest stored density at which our kernel was faster than
cuBLAS's dense product at every shape measured: NVIDIA H200, torch 2.11, triton 3.6, fp16 / bf16,
M x K in {4096 x 4096, 8192 x 8192, 4096 x 16384}, densities 1-50%, kernel time only
(bench/results/gpu-h200-2026-11-27-run2.json.gz; bench/RESULTS.md, "second run"). Each
bucket takes what was measured at its upper bound (N = 1, 16, 128, 1024; 4096 above): the side
that favours dense, since a CSR product's gathers do not amortise over N and for BSR N = 128
was the weakest point measured.

Per-call launch costs (tens of microseconds, bench/launch_cost.py) are not in these kernel-only
figures: for small layers, the calibrated choice (``sparsify(..., example_inputs=...)``) times
the whole call and decides.

>>> auto_cuda_backend("csr", batch=1, density=0.05), auto_cuda_backend("csr", batch=128, density=0.01)
('triton', 'dense')
>>> auto_cuda_backend("bsr", batch=4096, density=0.1, blocksize=(64, 64))
'triton'
"""

from __future__ import annotations

__all__ = ["auto_cuda_backend", "max_sparse_density"]

#: N buckets: the first bound >= N picks the column (N = 0 counts as 1).
_N_BOUNDS = (1, 16, 128, 1024)
#: format -> highest stored density where Triton won, per N bucket (N <= 1, <= 16, <= 128,
#: <= 1024, larger). CSR at N = 128 lost to dense even at 1% (0.49x): dense from there on.
_TABLE: dict[str, tuple[float, float, float, float, float]] = {
    "csr": (0.30, 0.05, 0.0, 0.0, 0.0),
    "bsr16": (0.05, 0.05, 0.02, 0.10, 0.10),
    "bsr32": (0.10, 0.05, 0.05, 0.10, 0.20),
    "bsr64": (0.10, 0.10, 0.10, 0.30, 0.30),
    "bsr128": (0.10, 0.20, 0.10, 0.30, 0.30),
}


def _row(layout: str, blocksize: tuple[int, int] | None) -> str:
    if layout == "csr":
        return "csr"
    rows = blocksize[0] if blocksize else 32
    for size in (128, 64, 32):
        if rows >= size:
            return f"bsr{size}"
    return "bsr16"  # smaller blocks: at best what 16-row blocks measured


def max_sparse_density(layout: str, batch: int, blocksize: tuple[int, int] | None = None) -> float:
    """The highest stored density at which ``auto`` takes the Triton kernel on CUDA.

    >>> max_sparse_density("bsr", 1, (32, 32)), max_sparse_density("csr", 16)
    (0.1, 0.05)
    """
    if layout not in ("csr", "bsr"):
        raise ValueError(f"layout must be 'csr' or 'bsr', got {layout!r}")
    row = _TABLE[_row(layout, blocksize)]
    for i, bound in enumerate(_N_BOUNDS):
        if batch <= bound:
            return row[i]
    return row[-1]


def auto_cuda_backend(layout: str, batch: int, density: float, blocksize: tuple[int, int] | None = None) -> str:
    """``"triton"`` where the measured rule says our kernel beats cuBLAS at this stored
    ``density`` and ``batch`` (N), else ``"dense"``."""
    return "triton" if density <= max_sparse_density(layout, batch, blocksize) else "dense"
