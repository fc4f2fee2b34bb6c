#!/usr/bin/env python
"""Where a sparse call's fixed cost goes on a GPU: one decode-sized product timed layer by layer,
from an empty Triton launch up to the public kernel, against cuBLAS on the same shape.

The first GPU run found ~60-90 us per call with the index check off against ~15 us for a whole
cuBLAS call; this splits that figure so the lean launch fixes the right part. Each line is the
median over ``--reps`` bursts of host wall time per call (``--calls`` calls, then one
synchronize): at decode sizes that is the launch-bound cost a model pays per layer. A CUDA-graph
replay of the public call is the floor a captured model would see.

    python3 bench/launch_cost.py --out $OUT     # on the GPU machine; writes launch_cost.json

On a CPU machine ``--dry-run`` runs the same steps under TRITON_INTERPRET=1 on tiny CPU
tensors (the numbers mean nothing; it proves the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def per_call_us(fn, calls: int, reps: int, sync) -> float:
    """Median over ``reps`` bursts of wall time per call, ``calls`` calls per burst."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    import triton.language as tl

    from sparse_lth.kernels import csr as csr_mod
    from sparse_lth.kernels import triton_bsr_matmul, triton_csr_matmul

    @triton.jit
    def empty_kernel(x_ptr, n):
        pass

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    m = k = 4096 if cuda else 128
    calls, reps = (args.calls, args.reps) if cuda else (3, 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    dense = torch.randn(m, k, device=dev, dtype=dtype) * (torch.rand(m, k, device=dev) < 0.1)
    W = dense.to_sparse_csr()
    Wb = dense.to_sparse_bsr((64, 64)) if cuda else dense.to_sparse_bsr((16, 16))
    X = torch.randn(k, 16, device=dev, dtype=dtype)
    Y = torch.empty(m, 16, device=dev, dtype=dtype)
    crow, col, val = W.crow_indices(), W.col_indices(), W.values()
    triton_csr_matmul(W, X, check_invariants=False)  # autotune once
    best = csr_mod.csr_kernel.cache  # the autotuner's choice, keyed by its key
    cfg = next(iter(best.values())) if best else csr_mod.CSR_CONFIGS[0]
    fixed = dict(BLOCK_N=cfg.kwargs["BLOCK_N"], BLOCK_NNZ=cfg.kwargs["BLOCK_NNZ"],
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def raw_fixed():
        csr_mod._csr_kernel[(m, triton.cdiv(16, fixed["BLOCK_N"]))](
            crow, col, val, X, Y, m, 16, k, 16, 16, 16, 16, X_T=False, Y_T=False, **fixed)

    steps = {
        "empty triton kernel": lambda: empty_kernel[(1,)](X, 1),
        "csr kernel, one config (no autotuner)": raw_fixed,
        "csr kernel through triton.autotune (choice cached)": lambda: csr_mod.csr_kernel[
            lambda meta: (m, triton.cdiv(16, meta["BLOCK_N"]))](
            crow, col, val, X, Y, m, 16, k, 16, 16, 16, 16, X_T=False, Y_T=False),
        "csr kernel through TunedLaunch (ours)": lambda: csr_mod._launch(
            W, X, Y, N=16, x_t=False, stride_x=16, y_t=False, stride_y=16),
        "triton_csr_matmul, check off": lambda: triton_csr_matmul(W, X, check_invariants=False),
        "triton_csr_matmul, check on": lambda: triton_csr_matmul(W, X),
        "triton_bsr_matmul (64), check off": lambda: triton_bsr_matmul(Wb, X,
                                                                       check_invariants=False),
        "sparse accessors (crow, col, values)": lambda: (W.crow_indices(), W.col_indices(),
                                                         W.values()),
        "dense cuBLAS (torch.mm)": lambda: torch.mm(dense, X),
        "torch CSR (cuSPARSE)": lambda: W @ X,
    }
    if cuda:
        graph = torch.cuda.CUDAGraph()
        static = triton_csr_matmul(W, X, check_invariants=False)
        sync()
        with torch.cuda.graph(graph):
            static = triton_csr_matmul(W, X, check_invariants=False)
        steps["triton_csr_matmul replayed from a CUDA graph"] = graph.replay
    results = {name: per_call_us(fn, calls, reps, sync) for name, fn in steps.items()}
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "torch": torch.__version__, "triton": triton.__version__, "shape": [m, k, 16],
            "dtype": str(dtype), "density": 0.1, "config": fixed, "us_per_call": results,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "launch_cost.json").write_text(json.dumps(info, indent=1))
    for name, us in results.items():
        print(f"{us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
