"""The kernels issue's CPU goals on one table: 4096 x 4096 fp32 weight, density 1-20%, batch 1-128.

For each point: scipy's own single call, this project's threaded scipy path (2 threads),
torch's CSR product (MKL), dense torch, and ``sparse_matmul(backend="auto")``; then auto over
the faster of scipy and torch (goal: never above 1, up to noise) and threaded over single
scipy (goal: 1.8x). Median of 30 calls each. Run on a quiet machine:

    python bench/cpu_goals.py > goals.md
"""

import statistics
import time
import warnings

import scipy.sparse as sp
import torch

from sparse_lth.backends import sparse_matmul
from sparse_lth.kernels import cpu_csr_matmul

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


def median_ms(fn, reps: int = 30) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(size: int = 4096) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{size} x {size} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; ms (median)\n")
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
            single = median_ms(lambda: A @ Xn)
            threaded = median_ms(lambda: cpu_csr_matmul(W32, X, threads=2))
            torch_csr = median_ms(lambda: W @ X)
            dense_ms = median_ms(lambda: dense @ X)
            auto = median_ms(lambda: sparse_matmul(W32, X))
            print(f"| {density:.0%} | {n} | {single:.3f} | {threaded:.3f} | {torch_csr:.3f} | {dense_ms:.3f} | "
                  f"{auto:.3f} | {auto / min(single, torch_csr):.2f} | {single / threaded:.2f} |")


if __name__ == "__main__":
    main()
