"""The backends the kernel benchmarks compare: one registry entry each.

An entry says which weight layouts, devices and dtypes it takes, how to turn a masked dense
weight into the representation it multiplies (``prepare``, untimed) and how to multiply
(``run``, timed). To benchmark a new kernel, add one entry here; bench_kernels.py generates
its cases.

Layouts: ``"dense"`` (the baseline, measured at density 1 only: a dense product's cost does not
depend on the values), ``"csr"`` (unstructured masks) and ``"bsr"`` (block masks; an
unstructured mask in BSR stores nearly every block, see PAPER.md, so that pair is not made).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparse_lth import kernels
from sparse_lth.backends import sparse_matmul
from sparse_lth.formats import nbytes, to_bsr, to_csr, to_scipy

HALVES = frozenset({torch.float16, torch.bfloat16})
FLOATS = frozenset({torch.float32, torch.float64})
ALL_DTYPES = HALVES | FLOATS


@dataclass(frozen=True)
class Weight:
    """One benchmark weight: the masked dense matrix, its mask and the layout wanted."""

    dense: torch.Tensor          # [M, K], pruned entries zero, on the benchmark's device
    mask: torch.Tensor           # bool [M, K]
    layout: str                  # "dense" | "csr" | "bsr"
    blocksize: int | None = None


@dataclass(frozen=True)
class Backend:
    """One way to compute ``W @ X``.

    ``prepare(weight)`` returns the operand ``run`` reads (untimed); ``run(operand, X)``
    returns the product as a torch tensor or numpy array. ``peer`` marks other people's code:
    when it refuses a case (``RuntimeError`` / ``NotImplementedError`` on the first call) the
    case is skipped with torch's message; the project's own backends must never refuse.
    """

    name: str
    label: str
    layouts: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    prepare: Callable[[Weight], Any]
    run: Callable[[Any, torch.Tensor], Any]
    peer: bool = False
    needs_triton: bool = False
    blocksizes: frozenset[int] | None = None  # BSR block sizes it takes (None: any)
    notes: str = field(default="", compare=False)

    def supports(self, layout: str, device: str, dtype: torch.dtype, blocksize: int | None = None) -> bool:
        """Whether a (layout, device, dtype, block) case makes sense for this backend."""
        if layout not in self.layouts or device not in self.devices or dtype not in self.dtypes:
            return False
        if self.needs_triton and not kernels.has_triton():
            return False
        return not (layout == "bsr" and self.blocksizes is not None and blocksize not in self.blocksizes)


# -- representations -----------------------------------------------------------------------------
def torch_sparse(weight: Weight) -> torch.Tensor:
    """The canonical torch CSR / BSR tensor (int32 indices, as SparseLinear stores it)."""
    if weight.layout == "csr":
        return to_csr(weight.dense, mask=weight.mask, index_dtype=torch.int32)
    return to_bsr(weight.dense, weight.blocksize, mask=weight.mask, index_dtype=torch.int32)


def scipy_sparse(weight: Weight):
    """A scipy csr_array / bsr_array sharing the torch tensor's buffers (CPU only)."""
    return to_scipy(torch_sparse(weight))


def operand_bytes(operand: Any) -> int:
    """Bytes of the weight representation a backend multiplies (formats.nbytes)."""
    return nbytes(operand)


def to_torch(out: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(out)) if not isinstance(out, torch.Tensor) else out


# -- runners -------------------------------------------------------------------------------------
# Ours run with check_invariants=False: the weight is built canonical by torch_sparse, and a
# deployed layer (SparseLinear) checks its indices once when built, not per call. The check is
# O(rows + nnz) (~36 us on 4096^2 at 1% on the CPU, ~100 us with its host sync on an H200):
# timed per call it would be measured here as kernel time that no deployed model pays.
def _dense_mm(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return torch.mm(W, X)


def _ours_cpu(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    matmul = kernels.cpu_csr_matmul if W.layout == torch.sparse_csr else kernels.cpu_bsr_matmul
    return matmul(W, X, check_invariants=False)


def _ours_auto(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    # What a user calls: the library's dispatcher (kernels.auto_cpu_backend on the CPU).
    return sparse_matmul(W, X, backend="auto", check_invariants=False)


def _ours_triton(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    matmul = kernels.triton_csr_matmul if W.layout == torch.sparse_csr else kernels.triton_bsr_matmul
    return matmul(W, X, check_invariants=False)


def _torch_sparse_mm(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse BSR is in beta" on every call
        warnings.simplefilter("ignore", UserWarning)
        return W @ X


def _scipy_mm(A, X: torch.Tensor) -> np.ndarray:
    # scipy's own single-threaded product, one public call (the yardstick for ours).
    return A @ X.numpy()


def _torch_triton_bsr(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    from torch.sparse._triton_ops import bsr_dense_mm

    return bsr_dense_mm(W, X)


# -- the registry --------------------------------------------------------------------------------
BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("torch_dense", "dense torch.mm (MKL/oneDNN on CPU, cuBLAS on CUDA)", frozenset({"dense"}),
            frozenset({"cpu", "cuda"}), ALL_DTYPES, prepare=lambda w: w.dense, run=_dense_mm),
    Backend("ours_cpu", "sparse_lth cpu_csr_matmul / cpu_bsr_matmul (scipy, threaded rows)",
            frozenset({"csr", "bsr"}), frozenset({"cpu"}), ALL_DTYPES, prepare=torch_sparse, run=_ours_cpu),
    Backend("ours_auto", "sparse_lth sparse_matmul(backend='auto') (auto_cpu_backend's pick)",
            frozenset({"csr", "bsr"}), frozenset({"cpu"}), ALL_DTYPES, prepare=torch_sparse, run=_ours_auto),
    Backend("ours_triton", "sparse_lth triton_csr_matmul / triton_bsr_matmul", frozenset({"csr", "bsr"}),
            frozenset({"cuda"}), frozenset({torch.float32}) | HALVES, prepare=torch_sparse, run=_ours_triton,
            needs_triton=True),
    Backend("torch_sparse", "torch sparse CSR / BSR @ dense (MKL on CPU, cuSPARSE on CUDA)",
            frozenset({"csr", "bsr"}), frozenset({"cpu", "cuda"}), ALL_DTYPES, prepare=torch_sparse,
            run=_torch_sparse_mm, peer=True),
    Backend("scipy", "scipy.sparse csr_array / bsr_array @ ndarray (one call, one thread)",
            frozenset({"csr", "bsr"}), frozenset({"cpu"}), FLOATS, prepare=scipy_sparse, run=_scipy_mm, peer=True),
    Backend("torch_triton_bsr", "torch.sparse._triton_ops.bsr_dense_mm (Triton, tuned for A100)",
            frozenset({"bsr"}), frozenset({"cuda"}), frozenset({torch.float32}) | HALVES,
            prepare=torch_sparse, run=_torch_triton_bsr, peer=True, needs_triton=True,
            blocksizes=frozenset({16, 32, 64, 128})),
]}

BASELINE = "torch_dense"
