"""CPU sparse x dense: scipy.sparse's CSR / BSR products, row blocks on a thread pool.

``cpu_csr_matmul(W, X)`` and ``cpu_bsr_matmul(W, X)`` take a torch sparse CSR / BSR tensor
``W`` [M, K] and a dense torch tensor ``X`` [K, N] and return the dense ``W @ X`` [M, N].

How it runs:
- No copies of ``W``: scipy's compiled loops read numpy views of ``crow_indices``,
  ``col_indices`` and ``values`` directly, and write into one preallocated output that is
  returned through ``torch.from_numpy``.
- scipy's sparse product is single-threaded but releases the GIL, so the rows are cut into
  blocks of about equal nonzeros and the blocks run on a thread pool (two threads were measured
  at ~1.8x one on a 2-core machine). Small products run on the calling thread only: handing work
  to a pool costs tens of microseconds, more than the product itself below ``MIN_WORK_PER_THREAD``.
- fp32 and fp64 are computed natively. fp16 and bf16 are accepted, computed in fp32 (scipy has
  no bf16 and its fp16 loops accumulate in fp16) and cast back to the input dtype.

Choosing between this path, torch's own (MKL) CSR product and the numba kernel of
``cpu_spmm`` lives in ``auto_cpu_backend`` below; the measurements behind it are in
``bench/cpu_crossover.md`` and bench/RESULTS.md.

This module imports torch, numpy and scipy only.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .invariants import check_index_invariants


@functools.cache
def _scipy_loops():
    """The compiled loops behind ``csr_matrix @ X``, or None. Private, but their signatures have
    been stable since scipy 1.8; calling them directly skips scipy's per-call validation and index
    dtype coercion (an O(nnz) copy of int64 indices) and lets each thread read the shared arrays
    in place. Without them the public constructors are used instead (same results). Imported on
    the first product: scipy.sparse costs 0.2 s of every command's start-up otherwise."""
    try:
        from scipy.sparse import _sparsetools
    except ImportError:  # pragma: no cover - depends on the scipy build
        return None
    return _sparsetools

__all__ = [
    "CpuSparseProduct",
    "cpu_csr_matmul",
    "cpu_bsr_matmul",
    "auto_cpu_backend",
    "MIN_WORK_PER_THREAD",
    "TORCH_MIN_BATCH",
    "NUMBA_MIN_ROWS",
    "NUMBA_MIN_STORED",
]

#: Multiply-adds (nnz x N) per thread below which adding a thread does not pay.
#: Measured on 2 cores: a pool hand-off costs ~30-60 us; one thread does ~1-2 GMAC/s.
MIN_WORK_PER_THREAD = 200_000

#: From this batch size (columns of X) on, torch's MKL CSR / BSR product beats scipy (fp32 /
#: fp64): scipy's multi-vector loop costs ~4x its single-vector one already at 2 columns, MKL's
#: barely more. Measured on a 2-core machine, 4096 x 4096 at 1-30% density, batch 1-128:
#: see bench/cpu_crossover.md.
TORCH_MIN_BATCH = 2
#: CSR products with more columns of X (rows of a linear layer's input) than this run on the
#: numba kernel (kernels/cpu_spmm.py: 64 outputs held in registers per row), fp32 / fp64.
#: Measured on 2 cores against torch's MKL product (4096 x 4096 at 10 / 30 %, 300 x 784,
#: 100 x 300): at 60-64 columns 1.0-1.9x, at 32 columns 0.7-1.0x, at 8 columns 0.3-0.4x.
NUMBA_MIN_ROWS = 40
#: ... and at least this many stored values: below, the kernel's fixed cost (a parallel launch,
#: the packing of x) outweighs its speed (batch 48-1024: 300 x 64 at 11%, 2,030 values,
#: 0.76-0.83x MKL at 48-64 rows; 10 x 100, 97 values, 0.57-0.94x; 300 x 784 at 7%, 16,550
#: values, 1.3-2.3x; 1024 x 1024 at 10% 1.6-2.2x).
NUMBA_MIN_STORED = 8192

_FLOATS = (torch.float32, torch.float64)
_UPCAST = (torch.float16, torch.bfloat16)
_ALL_FLOATS = _FLOATS + _UPCAST
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


# -- checks ------------------------------------------------------------------------------------
def _check(W: torch.Tensor, X: torch.Tensor, layout: torch.layout, fn: str, check_invariants: bool,
           threads: int | None) -> None:
    lname = {torch.sparse_csr: "sparse CSR", torch.sparse_bsr: "sparse BSR"}[layout]
    if not isinstance(W, torch.Tensor) or not isinstance(X, torch.Tensor):
        raise ValueError(f"{fn}: W and X must be torch tensors, got {type(W).__name__} and {type(X).__name__}")
    if W.layout != layout:
        raise ValueError(f"{fn}: W must be a {lname} tensor (torch.{layout}), got layout {W.layout}")
    if X.layout != torch.strided:
        raise ValueError(f"{fn}: X must be a dense (strided) tensor, got layout {X.layout}")
    if W.device.type != "cpu" or X.device.type != "cpu":
        raise ValueError(f"{fn}: W and X must be on the CPU, got W on {W.device} and X on {X.device}")
    if W.dim() != 2 or X.dim() != 2:  # also refuses batched and hybrid sparse tensors
        raise ValueError(
            f"{fn}: W and X must be 2-D, got W of shape {tuple(W.shape)} and X of shape {tuple(X.shape)}"
        )
    if W.shape[1] != X.shape[0]:
        raise ValueError(
            f"{fn}: shapes do not chain: W is {tuple(W.shape)}, X is {tuple(X.shape)} "
            f"(W.shape[1] must equal X.shape[0])"
        )
    if W.dtype != X.dtype:
        raise ValueError(f"{fn}: W and X must share a dtype, got W {W.dtype} and X {X.dtype}")
    if W.dtype not in _ALL_FLOATS:
        raise ValueError(f"{fn}: dtype {W.dtype} is not supported (float32, float64, float16, bfloat16)")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"{fn}: threads must be a positive int or None, got {threads!r}")
    if check_invariants:  # scipy's loops follow the indices unchecked: a bad one reads out of bounds
        check_index_invariants(W, f"{fn}: W")


def _np(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view (a copy only when ``t`` is not contiguous)."""
    # The guards skip no-op calls: at batch 1 on a small layer, per-call overhead is the cost.
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


# -- threading ---------------------------------------------------------------------------------
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="sparse_lth_cpu")
        return pool


def _num_threads(threads: int | None, work: int, rows: int) -> int:
    if threads is None:
        # Follow torch's own setting so one knob (torch.set_num_threads) governs both paths.
        threads = min(torch.get_num_threads(), max(1, work // MIN_WORK_PER_THREAD))
    return max(1, min(threads, rows))


def _row_blocks(indptr: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Cut rows 0..len(indptr)-1 into ``parts`` ranges of about equal nonzeros."""
    rows = len(indptr) - 1
    if parts <= 1 or rows <= 1:
        return [(0, rows)]
    targets = np.linspace(0, indptr[-1], parts + 1)[1:-1]
    cuts = np.searchsorted(indptr, targets, side="left").tolist()
    bounds = sorted({0, rows, *(min(max(c, 0), rows) for c in cuts)})
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run(blocks: list[tuple[int, int]], job: Callable[[int, int], None]) -> None:
    if len(blocks) == 1:
        job(*blocks[0])
        return
    # The caller runs the first block itself: one pool hand-off fewer.
    futures = [_pool(len(blocks) - 1).submit(job, a, b) for a, b in blocks[1:]]
    job(*blocks[0])
    for f in futures:
        f.result()


# -- products ----------------------------------------------------------------------------------
class CpuSparseProduct:
    """``W @ X`` with scipy's compiled loops for one CPU CSR / BSR ``W``, prepared once: numpy
    views of its arrays (float32 values for a float16 / bfloat16 ``W``) and the row blocks per
    thread count are kept, so a layer that multiplies by the same ``W`` on every call pays only
    the product. ``W`` is not checked here (see :func:`cpu_csr_matmul`); its arrays are read in
    place, so values changed in place are seen, and a half-precision ``W`` is copied once.

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0.], [0., 0., 0.], [1., 0., 3.]]).to_sparse_csr()
    >>> CpuSparseProduct(W)(torch.ones(3, 1)).flatten()
    tensor([2., 0., 4.])
    """

    def __init__(self, W: torch.Tensor) -> None:
        self.dtype = W.dtype
        self.compute = W.dtype if W.dtype in _FLOATS else torch.float32
        values = W.values().detach()
        self.data = _np(values if self.compute == W.dtype else values.float()).reshape(-1)
        self.indptr, self.indices = _np(W.crow_indices()), _np(W.col_indices())
        self.shape = (int(W.shape[0]), int(W.shape[1]))
        self.csr = W.layout == torch.sparse_csr
        self._loops = _scipy_loops()
        self.block = (1, 1) if self.csr else tuple(int(b) for b in values.shape[1:3])
        self.stored = int(self.indptr[-1]) if len(self.indptr) > 1 else 0
        self._blocks: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, X: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """``W @ X`` for a dense CPU ``X`` [K, N] of ``W``'s dtype: a new [M, N] tensor."""
        N = X.shape[1]
        if self.compute != X.dtype:
            X = X.detach().float()
        y = np.zeros((self.shape[0], N), dtype=_NP_DTYPES[self.compute])
        if N:
            self._into(_np(X).reshape(-1), N, y, threads)
        out = torch.from_numpy(y)
        return out if self.compute == self.dtype else out.to(self.dtype)

    def add_matvec(self, x: np.ndarray, y: np.ndarray, threads: int | None = None) -> None:
        """``y += W @ x`` for C-contiguous numpy vectors ``x`` [K] and ``y`` [M] of the compute
        dtype (float32 for a half-precision ``W``), rows split over threads: the lean path of a
        layer at batch 1, where converting tensors costs more than the product."""
        self._into(x, 1, y, threads)

    def vector_loop(self, threads: int | None = None) -> Callable[[np.ndarray, np.ndarray], None] | None:
        """``(x, y) -> None`` adding ``W @ x`` into ``y`` for one vector, bound to scipy's loop
        with every argument but the two vectors, when one thread does that product whatever
        torch's setting (too little work to split, or ``threads=1``); None otherwise. What a
        layer replays at batch 1, where each Python call on the way costs a share of the product."""
        (M, K), (R, C) = self.shape, self.block
        work = self.stored * R * C
        if threads is None:  # torch's thread count may change; one thread below 2 x the floor
            single = work < 2 * MIN_WORK_PER_THREAD
        else:
            single = _num_threads(threads, work, M // R) == 1
        loops = self._loops
        if loops is None or not (self.stored and R and C) or not single:
            return None
        indptr, indices, data = self.indptr, self.indices, self.data
        if self.csr:
            return functools.partial(loops.csr_matvec, M, K, indptr, indices, data)
        return functools.partial(loops.bsr_matvec, M // R, K // C, R, C, indptr, indices, data)

    def _into(self, x: np.ndarray, N: int, y: np.ndarray, threads: int | None) -> None:
        """The product of ``x`` (flat [K, N]) added into ``y``, its rows split over threads."""
        M, (R, C) = self.shape[0], self.block
        if not (self.stored and R and C):
            return
        parts = _num_threads(threads, self.stored * R * C * N, M // R)
        if parts == 1:  # most small products: no pool, no row blocks
            self._rows(0, M // R, x, N, y)
            return
        blocks = self._blocks.get(parts)
        if blocks is None:
            blocks = self._blocks[parts] = _row_blocks(self.indptr, parts)
        _run(blocks, lambda r0, r1: self._rows(r0, r1, x, N, y))

    def _rows(self, r0: int, r1: int, x: np.ndarray, N: int, y: np.ndarray) -> None:
        """Rows (BSR: block rows) r0:r1 of the product added into ``y``."""
        (M, K), (R, C) = self.shape, self.block
        indptr, indices, data = self.indptr, self.indices, self.data
        out = y[r0 * R:r1 * R].reshape(-1)  # a view: y is C-contiguous
        csr, loops = self.csr, self._loops
        if loops is None:  # public API: rebased copy of this block's row pointers
            import scipy.sparse as sp

            lo, hi = int(indptr[r0]), int(indptr[r1])
            if csr:
                part = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr[r0:r1 + 1] - lo), shape=(r1 - r0, K))
            else:
                part = sp.bsr_matrix((data.reshape(-1, R, C)[lo:hi], indices[lo:hi], indptr[r0:r1 + 1] - lo),
                                     shape=((r1 - r0) * R, K))
            out += (part @ x.reshape(K, N)).reshape(-1)  # accumulate, as the loops below do
        # indptr[r0:r1+1] keeps absolute offsets into the full indices / data arrays, so
        # nothing is rebased or copied; the loops accumulate into out.
        elif csr and N == 1:
            loops.csr_matvec(r1 - r0, K, indptr[r0:r1 + 1], indices, data, x, out)
        elif csr:
            loops.csr_matvecs(r1 - r0, K, N, indptr[r0:r1 + 1], indices, data, x, out)
        elif N == 1:
            loops.bsr_matvec(r1 - r0, K // C, R, C, indptr[r0:r1 + 1], indices, data, x, out)
        else:
            loops.bsr_matvecs(r1 - r0, K // C, N, R, C, indptr[r0:r1 + 1], indices, data, x, out)


def cpu_csr_matmul(W: torch.Tensor, X: torch.Tensor, threads: int | None = None, *,
                   check_invariants: bool = True) -> torch.Tensor:
    """``W @ X`` for a sparse CSR ``W`` [M, K] and a dense ``X`` [K, N], with scipy on the CPU.

    Rows are split into blocks of about equal nonzeros and run on ``threads`` threads (default:
    ``torch.get_num_threads()``, but one thread for products too small to gain from more).
    Indices may be int32 or int64 (int32 reads less memory and is faster). float32 / float64 are
    computed natively; float16 / bfloat16 are computed in float32 and the result is cast back to
    the input dtype. The result is a new dense, contiguous CPU tensor of W's dtype.

    Raises ValueError for a W that is not a 2-D CPU CSR tensor, an X that is not a 2-D dense CPU
    tensor, shapes that do not chain, mismatched or unsupported dtypes, or a bad ``threads``.
    W's index arrays are checked first (row pointers from 0, never decreasing, ending at the
    number of values; columns in range: :func:`~sparse_lth.kernels.check_index_invariants`),
    so a malformed tensor is refused instead of read out of bounds. That costs O(rows + nnz);
    a caller that has checked W already may pass ``check_invariants=False``.

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0.], [0., 0., 0.], [1., 0., 3.]])
    >>> X = torch.arange(6.).reshape(3, 2)
    >>> cpu_csr_matmul(W.to_sparse_csr(), X)
    tensor([[ 4.,  6.],
            [ 0.,  0.],
            [12., 16.]])
    """
    _check(W, X, torch.sparse_csr, "cpu_csr_matmul", check_invariants, threads)
    return CpuSparseProduct(W)(X, threads)


def cpu_bsr_matmul(W: torch.Tensor, X: torch.Tensor, threads: int | None = None, *,
                   check_invariants: bool = True) -> torch.Tensor:
    """``W @ X`` for a sparse BSR ``W`` [M, K] and a dense ``X`` [K, N], with scipy on the CPU.

    Block rows are split into groups of about equal nonzero blocks and run on ``threads`` threads
    (default: ``torch.get_num_threads()``, but one thread for small products). Any block shape
    (R, C) that divides (M, K), as torch requires. float32 / float64 are computed natively;
    float16 / bfloat16 are computed in float32 and the result is cast back to the input dtype.

    Raises ValueError like :func:`cpu_csr_matmul`, for a BSR ``W``; its block indices are
    checked the same way (``check_invariants=False`` to skip).

    >>> import torch
    >>> W = torch.zeros(4, 4); W[:2, 2:] = torch.tensor([[1., 2.], [3., 4.]])
    >>> cpu_bsr_matmul(W.to_sparse_bsr((2, 2)), torch.ones(4, 1))
    tensor([[3.],
            [7.],
            [0.],
            [0.]])
    """
    _check(W, X, torch.sparse_bsr, "cpu_bsr_matmul", check_invariants, threads)
    return CpuSparseProduct(W)(X, threads)


# -- choice ------------------------------------------------------------------------------------
def auto_cpu_backend(layout: torch.layout, dtype: torch.dtype, batch: int, nnz: int | None = None) -> str:
    """The faster CPU path, ``"scipy"``, ``"torch"`` or ``"numba"``, for a product with ``batch`` columns.

    A CSR product in fp32 / fp64 with more than ``NUMBA_MIN_ROWS`` (40) columns and at least
    ``NUMBA_MIN_STORED`` stored values (or an unknown ``nnz``) runs on the numba kernel.
    Otherwise torch's CSR / BSR products (MKL, multi-threaded) win from ``TORCH_MIN_BATCH`` (2)
    columns on, and for BSR at every batch; for CSR, scipy (threaded row blocks) wins at a
    single column (a matrix-vector product) once the ``nnz`` stored values give two threads
    ``MIN_WORK_PER_THREAD`` each. scipy is the only path for float16 / bfloat16, which torch's
    CPU sparse product refuses. Measurements: bench/cpu_crossover.md, bench/cpu_goals.py.

    >>> import torch
    >>> [auto_cpu_backend(torch.sparse_csr, torch.float32, n) for n in (1, 16, 128)]
    ['scipy', 'torch', 'numba']
    >>> auto_cpu_backend(torch.sparse_csr, torch.bfloat16, 128)
    'scipy'
    """
    if dtype not in _FLOATS:
        return "scipy"
    if layout == torch.sparse_csr and batch > NUMBA_MIN_ROWS and (nnz is None or nnz >= NUMBA_MIN_STORED):
        return "numba"
    if batch >= TORCH_MIN_BATCH or layout == torch.sparse_bsr:
        # BSR at one column too: MKL's BSR product beat threaded scipy for 32 and 64 blocks
        # (4096^2: 0.35 vs 0.41-0.51 ms at 10%); scipy won only with 16 blocks from 10% dense.
        return "torch"
    # A matrix-vector product: scipy's threaded rows win once each of two threads has work;
    # below that torch's single call is cheaper (4096^2 at 1%: 0.084 ms vs 0.112 ms).
    return "scipy" if nnz is None or nnz >= 2 * MIN_WORK_PER_THREAD else "torch"
