"""The kernels issue's CPU goals on one table: 4096 x 4096 fp32 weight, density 1-20%, batch 1-128.

For each point: scipy's own single call, this project's threaded scipy path (2 threads),
torch's CSR product (MKL), dense torch, and ``sparse_matmul(backend="auto")``; then auto over
the faster of scipy and torch (goal: never above 1, up to noise) and threaded over single
scipy (goal: 1.8x). The five calls of a point are timed interleaved, in alternating short
bursts (the benchmarks' harness.interleaved), and each figure is the median of its bursts, so
the ratios compare calls that met the same load. Run on a quiet machine:

    python bench/cpu_goals.py > goals.md
"""

import warnings
from collections.abc import Callable
from dataclasses import replace

import scipy.sparse as sp
import torch

from harness import SIZE_CONFIGS, burst_plan, interleaved, warm_time
from sparse_lth.backends import sparse_matmul
from sparse_lth.kernels import cpu_csr_matmul

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

#: Half a second per point for all five calls together, in up to 7 bursts each.
TIMING = replace(SIZE_CONFIGS["default"], interleaved_s=0.5, bursts=7)


def medians_ms(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Milliseconds per call of each of ``fns``, the median of interleaved bursts."""
    once = {name: warm_time(fn, "cpu", TIMING) for name, fn in fns.items()}
    bursts, calls = burst_plan(once, TIMING)
    return {name: 1e3 * s for name, s in interleaved(fns, "cpu", bursts, calls).seconds.items()}


def main(size: int = 4096) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{size} x {size} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "ms (median of interleaved bursts)\n")
    print("| density | N | scipy single | ours threaded | torch CSR | dense | auto | auto / best | threaded / single |")
    print("|---|---|---|---|---|---|---|---|---|")
    for density in (0.01, 0.05, 0.2):
        dense = torch.randn(size, size, generator=g) * (torch.rand(size, size, generator=g) < density)
        W = dense.to_sparse_csr()
        W32 = torch.sparse_csr_tensor(W.crow_indices().int(), W.col_indices().int(), W.values(), W.shape)
        A = sp.csr_array((W.values().numpy(), W.col_indices().numpy(), W.crow_indices().numpy()), shape=W.shape)
        for n in (1, 4, 16, 128):
            X = torch.randn(size, n, generator=g)
            Xn = X.numpy()
            ms = medians_ms({
                # ours without the per-call index check: a deployed layer checks once, when built
                "single": lambda: A @ Xn, "threaded": lambda: cpu_csr_matmul(W32, X, threads=2, check_invariants=False),
                "torch_csr": lambda: W @ X, "dense": lambda: dense @ X,
                "auto": lambda: sparse_matmul(W32, X, check_invariants=False),
            })
            single, threaded, torch_csr, dense_ms, auto = (ms[k] for k in ("single", "threaded", "torch_csr",
                                                                             "dense", "auto"))
            print(f"| {density:.0%} | {n} | {single:.3f} | {threaded:.3f} | {torch_csr:.3f} | {dense_ms:.3f} | "
                  f"{auto:.3f} | {auto / min(single, torch_csr):.2f} | {single / threaded:.2f} |")


if __name__ == "__main__":
    main()
