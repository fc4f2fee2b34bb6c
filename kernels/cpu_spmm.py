"""CPU products of a trainable sparse linear layer, compiled with numba.

A layer ``y = x @ W.T`` with ``W`` [M, K] stored as CSR costs three products per training step;
this module computes each in proportion to the stored values, for a batch of rows:

- :func:`cpu_csr_linear`: ``x @ W.T`` (the forward);
- :func:`cpu_csr_linear_t`: ``dy @ W`` (the input gradient), over a transposed pattern built
  once per pattern: no transposed copy of the values is made per step;
- :func:`cpu_csr_sddmm`: ``(dy.T @ x)`` at the stored positions only (the values' gradient);
- :func:`cpu_csr_linear_backward`: the last two in one sweep, what a layer's backward runs.

How they run: the dense operand is packed once per call into a *panel*, ``x.T`` zero-padded to a
multiple of 64 columns and cut into tiles of 64 batch entries, each tile's [K, 64] block
contiguous (``_pack``), so every stored weight touches one contiguous run of 64 batch entries
and a kernel working on one tile reads one block (for K = 4096, 1 MB: a core's L2).

- Forward: 64 outputs of one row stay in registers (4 zmm of fp32) while the loop runs over that
  row's stored weights: per weight 4 vector loads and 4 fused multiply-adds (the register
  blocking of ``cpu_conv``; a 1x1 sparse conv is the same product). Rows are split over the
  threads in ranges of equal stored values; results are staged 16 rows at a time and written
  straight into the [N, M] output.
- Input gradient: the forward's loop over the transposed pattern, with ``W``'s rows cut into
  blocks of ``SLAB_ROWS`` rows or ``ENTRIES_PER_BLOCK`` stored values, whichever is more
  (:func:`_blocked_pattern`, built once per pattern). For each block, each column of ``W``
  accumulates that block's entries in registers, their values read through an index from a
  slice of ``values`` that stays in L2 and their ``dy`` rows from a slab that stays in L1 / L2,
  on top of the earlier blocks' sums kept in a [K, P] work panel; each thread owns a range of
  columns (ranges of equal stored values). Measured against adding each entry's scaled ``dy``
  row into the work panel straight from ``W``'s rows (four loads and four stores per weight),
  1.2-1.7x faster; against the transposed product reading ``values[perm]`` over the whole
  matrix (a cache miss per value), faster still.
- SDDMM: one dot product of two panel rows per stored weight, the row's ``dy`` held in registers
  across the row's weights.
- Both gradients (:func:`_backward_tb`): the input gradient's sweep, each column's ``x`` held in
  registers as well, so each ``dy`` row loaded for the input gradient also gives that entry's
  dot product: one pass over the indices and ``dy`` instead of two; 0.80-0.86x the two kernels'
  time at 10 %, 0.84-0.89x at 5 %, 0.81-0.97x at 2 % (4096 x 4096, batch 64, fp32).
- The forward and the SDDMM prefetch the panel row of the weight ``PREFETCH_AHEAD`` entries on
  (``_numba.prefetch_row``): a row picked by a column index, which no hardware prefetcher guesses.

Measured on the 2-core AMD EPYC VM of bench/RESULTS.md (4096 x 4096, batch 64, fp32,
2 threads): the forward at 10 / 5 / 2 % density in 3.0-3.7 / 1.2-1.8 / 0.5-0.6 ms against
7.3 / 3.8 / 1.7 ms for torch's MKL CSR product; the SDDMM in 3.0 / 1.4 / 0.55 ms against
7.0 / 3.7 / 1.9 ms for ``torch.sparse.sampled_addmm``; the input gradient in 2.7-2.8 /
1.45-1.6 / 0.65 ms; at 1,024 rows (16 tiles) the three in 44 / 43 / 47 ms at 10% against
125 ms for MKL's forward. Tiling the forward's columns so a slab of the panel stays in L2 or L1
measured slower (the whole 1 MB panel stays in a Zen 4 core's L2 already; per (row, slab) the
accumulators go out and back).
The kernels use numba's thread pool, a second OpenMP runtime beside torch's: the panel is packed
by numba, since a torch op just before a kernel leaves torch's threads spinning on its cores.

Sums are IEEE fp32 / fp64 with multiply-adds fused (``fastmath={"contract"}``; the SDDMM's dot
product also reassociates, so it vectorizes): results match torch's products to rounding, not
bitwise. fp32 and fp64 only; numba compiles each kernel on its first call per dtype (seconds),
then keeps it on disk (``_numba.njit_cached``).

This module imports torch, numpy and numba only.
"""

from __future__ import annotations

import weakref

import numba
import numpy as np
import torch
from numba import prange

from ._numba import (BLOCK, PREFETCH_AHEAD, THREADS_LOCK, is_kept, kept_empty, njit_cached, prefetch_row,
                     register_block, threads)

__all__ = ["cpu_csr_linear", "cpu_csr_linear_t", "cpu_csr_sddmm", "cpu_csr_linear_backward", "DTYPES"]

#: The value dtypes computed natively.
DTYPES = (torch.float32, torch.float64)
#: Output rows staged before they are written: 16 fp32 results make one 64-byte line of out.
ROWS_OUT = 16
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
#: slot -> (tensor, its version and layout, panel): a backward pass packs ``dy`` for the input
#: gradient and again for the SDDMM, and ``x`` packed by the forward; each is packed once.
_PACKED: dict[int, tuple[weakref.ref, tuple, np.ndarray]] = {}
#: Scratch slots: the forward's input, the gradient's dy, the input gradient's work panel.
_X, _DY, _WORK = 0, 1, 2
#: Rows per block of the backward's transposed pattern: their ``dy`` rows (40 KB of fp32 at batch
#: 64) stay in L1 / L2 while the block's columns are swept, and the block's slice of the values in L2 ...
SLAB_ROWS = 160
#: ... but at least this many stored values per block: each block sweeps the [K, 64] work panel
#: once more. Both measured with the fused backward at 2-10 % (4096 x 4096): fixed blocks of
#: 65,536 values ran 1.1-1.25x slower at 5 %, of 16,384 1.1-1.15x slower at 2 and 10 %.
ENTRIES_PER_BLOCK = 32768
#: col_indices -> (its version and layout, the row-blocked transposed pattern built from it)
_BLOCKED = torch.utils.weak.WeakIdKeyDictionary()


@njit_cached(parallel=True, fastmath={"contract"})
def _spmm(ranges, crow, col, vals, panel, width, out):
    """out[n, m] = sum over row m's entries j of vals[j] * x[n, col[j]], n < N (out [N, M]), x
    given as a tile-major panel (``_pack``); items are (row range, tile of 64 batch entries)."""
    n_ = out.shape[0]
    ntiles = width // BLOCK
    k_ = np.uint64(panel.shape[0] // width)
    for item in prange((ranges.shape[0] - 1) * ntiles):
        r = item // ntiles
        p0 = (item - r * ntiles) * BLOCK
        tile = np.uint64(item - r * ntiles)
        acc = numba.carray(register_block(vals.dtype), BLOCK)
        # ROWS_OUT rows of results, written out together: out's rows are M apart, so one row
        # of results alone would touch 64 pages (measured 2x slower at 2 % density)
        stage = np.empty((ROWS_OUT, BLOCK), dtype=out.dtype)
        lo, hi = ranges[r], ranges[r + 1]
        last = crow[hi] - 1
        for m0 in range(lo, hi, ROWS_OUT):
            m1 = min(m0 + ROWS_OUT, hi)
            for m in range(m0, m1):
                for q in range(BLOCK):
                    acc[q] = 0
                for j in range(crow[m], crow[m + 1]):
                    prefetch_row(panel, (tile * k_ + np.uint64(col[min(j + PREFETCH_AHEAD, last)])) * np.uint64(BLOCK))
                    w = vals[j]
                    base = (tile * k_ + np.uint64(col[j])) * np.uint64(BLOCK)
                    for q in range(BLOCK):
                        acc[q] += w * panel[base + np.uint64(q)]
                for q in range(BLOCK):
                    stage[m - m0, q] = acc[q]
            for q in range(min(BLOCK, n_ - p0)):
                for i in range(m1 - m0):
                    out[p0 + q, m0 + i] = stage[i, q]


@numba.njit(inline="always")
def _resume(acc, work, at, first):
    """Start a column's ``BLOCK`` accumulators for a block of rows: zero in the first block, else
    the sum the earlier blocks left in ``work`` from ``at`` on."""
    if first:
        for q in range(BLOCK):
            acc[q] = 0
    else:
        for q in range(BLOCK):
            acc[q] = work[at + np.uint64(q)]


@njit_cached(parallel=True, fastmath={"contract"})
def _spmm_tb(kranges, ptr, rows, src, vals, panel, width, nblocks, k_, work, out):
    """out[n, k] = sum over entries j = (m, k) of vals[j] * dy[n, m], n < N (out [N, K]), dy given
    as a tile-major panel (``_pack``), over the row-blocked transposed pattern of
    ``_blocked_pattern``: for each block of rows, each column k of the item's range accumulates
    that block's entries in registers (their values gathered through ``src`` from a slice of
    ``vals`` that stays in L2, their ``panel`` rows in L1) on top of the previous blocks' sum
    kept in ``work`` (tile-major like the panel)."""
    n_ = out.shape[0]
    ntiles = width // BLOCK
    m_ = np.uint64(panel.shape[0] // width)
    for item in prange((kranges.shape[0] - 1) * ntiles):
        r = item // ntiles
        tile = np.uint64(item - r * ntiles)
        p0 = tile * np.uint64(BLOCK)
        k0, k1 = kranges[r], kranges[r + 1]
        acc = numba.carray(register_block(vals.dtype), BLOCK)
        for b in range(nblocks):
            for k in range(k0, k1):
                lo, hi = ptr[b * k_ + k], ptr[b * k_ + k + 1]
                if b > 0 and lo == hi:
                    continue  # nothing of this column in this block: its sum stays in work
                wb = (tile * np.uint64(k_) + np.uint64(k)) * np.uint64(BLOCK)
                _resume(acc, work, wb, b == 0)
                for j in range(lo, hi):
                    w = vals[src[j]]
                    base = (tile * m_ + np.uint64(rows[j])) * np.uint64(BLOCK)
                    for q in range(BLOCK):
                        acc[q] += w * panel[base + np.uint64(q)]
                for q in range(BLOCK):
                    work[wb + np.uint64(q)] = acc[q]
        for q in range(min(np.uint64(BLOCK), np.uint64(n_) - p0)):
            for k in range(k0, k1):
                out[p0 + q, k] = work[(tile * np.uint64(k_) + np.uint64(k)) * np.uint64(BLOCK) + q]


@njit_cached(parallel=True, fastmath={"contract", "reassoc"})
def _backward_tb(kranges, ptr, rows, src, vals, panel, xpanel, width, nblocks, k_, work, out, grad):
    """``_spmm_tb`` (``out`` = dy @ W) and the SDDMM (``grad[j]`` = dy[:, m] . x[:, k] for each
    entry j = (m, k), in ``vals``' order) in one sweep over the row-blocked transposed pattern:
    column k's ``x`` (from ``xpanel``) stays in registers beside its accumulators, and each
    ``dy`` row loaded for the input gradient also gives that entry's dot product. Items are
    column ranges (each entry's gradient is written by one item), tiles of 64 batch entries
    inside them, their dot products summed in ``grad``."""
    n_ = out.shape[0]
    m_ = np.uint64(panel.shape[0] // width)
    zero = np.zeros(1, dtype=vals.dtype)[0]  # a literal 0 would make the dot products fp64
    for r in prange(kranges.shape[0] - 1):
        k0, k1 = kranges[r], kranges[r + 1]
        acc = numba.carray(register_block(vals.dtype), BLOCK)
        xk = numba.carray(register_block(vals.dtype), BLOCK)
        for p0 in range(0, width, BLOCK):
            tile = np.uint64(p0 // BLOCK)
            for b in range(nblocks):
                for k in range(k0, k1):
                    lo, hi = ptr[b * k_ + k], ptr[b * k_ + k + 1]
                    if b > 0 and lo == hi:
                        continue
                    wb = (tile * np.uint64(k_) + np.uint64(k)) * np.uint64(BLOCK)
                    _resume(acc, work, wb, b == 0)
                    for q in range(BLOCK):
                        xk[q] = xpanel[wb + np.uint64(q)]
                    for j in range(lo, hi):
                        at = src[j]
                        w = vals[at]
                        base = (tile * m_ + np.uint64(rows[j])) * np.uint64(BLOCK)
                        g = zero
                        for q in range(BLOCK):
                            d = panel[base + np.uint64(q)]
                            acc[q] += w * d
                            g += d * xk[q]
                        if p0 == 0:
                            grad[at] = g
                        else:
                            grad[at] += g
                    for q in range(BLOCK):
                        work[wb + np.uint64(q)] = acc[q]
            for q in range(min(np.uint64(BLOCK), np.uint64(n_) - np.uint64(p0))):
                for k in range(k0, k1):
                    out[np.uint64(p0) + q, k] = work[(tile * np.uint64(k_) + np.uint64(k)) * np.uint64(BLOCK) + q]


@njit_cached()
def _fill_blocks(crow, col, k_, rows_per_block, ptr, rows, src):
    """The row-blocked transposed pattern: entries ordered by (block of rows, column, row);
    ptr[b * K + k] is where block b's entries of column k start (a counting sort, O(nnz))."""
    m_ = crow.shape[0] - 1
    for m in range(m_):
        b = m // rows_per_block
        for j in range(crow[m], crow[m + 1]):
            ptr[b * k_ + col[j] + 1] += 1
    for i in range(1, ptr.shape[0]):
        ptr[i] += ptr[i - 1]
    cursor = ptr[:-1].copy()
    for m in range(m_):
        b = m // rows_per_block
        for j in range(crow[m], crow[m + 1]):
            i = b * k_ + col[j]
            pos = cursor[i]
            cursor[i] = pos + 1
            rows[pos] = m
            src[pos] = j


@njit_cached(parallel=True)
def _pack(x, panel, width, lane):
    """panel[(t * K + k) * 64 + q] = x[t * 64 + q, k], zero for t * 64 + q >= N: ``x.T`` padded to
    ``width`` and cut into tiles of 64 batch entries, each tile's [K, 64] block contiguous (a
    kernel working on one tile reads a 1 MB block for K = 4096, not every 64th part of a row
    of 4 KB and more). Columns go 16 at a time, so each row of x is read in runs of 64 bytes.
    ``lane`` is BLOCK, passed in: with the constant, LLVM vectorized the strided stores and
    packed 1.8x slower."""
    n_, k_ = x.shape
    for kb in prange((k_ + 15) // 16):
        k0, k1 = kb * 16, min(k_, kb * 16 + 16)
        for n in range(n_):
            un = np.uint64(n)
            at = (un // np.uint64(BLOCK)) * np.uint64(k_ * BLOCK) + un % np.uint64(BLOCK)  # tile, lane
            for k in range(k0, k1):
                panel[np.uint64(k) * np.uint64(lane) + at] = x[n, k]
        for n in range(n_, width):
            un = np.uint64(n)
            at = (un // np.uint64(BLOCK)) * np.uint64(k_ * BLOCK) + un % np.uint64(BLOCK)
            for k in range(k0, k1):
                panel[np.uint64(k) * np.uint64(lane) + at] = 0


@njit_cached(parallel=True, fastmath={"contract", "reassoc"})
def _sddmm(ranges, crow, col, a, b, width, out):
    """out[j] = sum_n dy[n, m] * x[n, col[j]] for each entry j of row m, ``a`` and ``b`` the
    tile-major panels of dy and x (``_pack``). Row m's
    64 entries of ``a`` stay in registers across the row's entries (reloading them per entry
    measured 1.4x slower), one tile of 64 batch entries at a time. Each sum starts from a zero of
    a's dtype and runs over all 64 terms: 4 vector multiply-adds and one horizontal sum (started
    from the first term, LLVM split the other 63 into 8-, 4- and 1-wide pieces: 2x slower)."""
    m_, k_ = np.uint64(a.shape[0] // width), np.uint64(b.shape[0] // width)
    for r in prange(ranges.shape[0] - 1):
        zero = np.zeros(1, dtype=a.dtype)[0]  # a literal 0 would make the sum fp64
        d = numba.carray(register_block(a.dtype), BLOCK)
        # tiles outermost: each tile's block of b is read by all of the range's rows while it is
        # in cache (tiles innermost, 1,024 rows ran 2.5x slower)
        last = crow[ranges[r + 1]] - 1
        for p0 in range(0, width, BLOCK):
            tile = np.uint64(p0 // BLOCK)
            for m in range(ranges[r], ranges[r + 1]):
                row = (tile * m_ + np.uint64(m)) * np.uint64(BLOCK)
                for q in range(BLOCK):
                    d[q] = a[row + np.uint64(q)]
                for j in range(crow[m], crow[m + 1]):
                    prefetch_row(b, (tile * k_ + np.uint64(col[min(j + PREFETCH_AHEAD, last)])) * np.uint64(BLOCK))
                    base = (tile * k_ + np.uint64(col[j])) * np.uint64(BLOCK)
                    s = zero
                    for q in range(BLOCK):
                        s += d[q] * b[base + np.uint64(q)]
                    if p0 == 0:
                        out[j] = s
                    else:
                        out[j] += s


def _width(n: int) -> int:
    """Panel columns for a batch of ``n``: the next multiple of 64."""
    return -(-max(n, 1) // BLOCK) * BLOCK


def _scratch(slot: int, size: int, dtype: torch.dtype) -> np.ndarray:
    """Scratch ``slot``'s work array (:func:`~._numba.kept_empty`); callers hold THREADS_LOCK."""
    _PACKED.pop(slot, None)  # whatever panel the slot held is about to be overwritten
    return kept_empty(("cpu_spmm", slot), size, _NUMPY[dtype])


def _panel(x: torch.Tensor, slot: int) -> np.ndarray:
    """``x`` [N, K] as a flat tile-major panel (``_pack``: ``x.T`` zero-padded to ``_width(N)``
    columns, [P / 64, K, 64]) in scratch ``slot``. Packed by numba, not torch: a torch op just
    before a numba kernel leaves torch's OpenMP threads spinning on the cores the kernel needs."""
    n, k = x.shape
    # an inference tensor keeps no version counter: in-place changes would go unseen, so it is
    # packed afresh every call
    key = None if x.is_inference() else (x._version, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
    packed = _PACKED.get(slot)
    if key is not None and packed is not None and packed[0]() is x and packed[1] == key:
        return packed[2]  # the same tensor, unchanged since it was packed here
    panel = _scratch(slot, k * _width(n), x.dtype)
    _pack(x.detach().numpy(), panel, _width(n), BLOCK)
    if key is not None and is_kept(panel.size, panel.dtype):  # a kept array: remember what it holds
        _PACKED[slot] = (weakref.ref(x), key, panel)
    return panel


def _blocked_pattern(crow_indices: torch.Tensor, col_indices: torch.Tensor, in_features: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(ptr, rows, src, blocks)``: the transposed pattern of the CSR pattern, its entries
    ordered by (block of rows, column, row) (:func:`_fill_blocks`), built once per pattern and
    kept while ``col_indices`` lives and is unchanged (callers hold THREADS_LOCK)."""
    # indices made under torch.inference_mode() keep no version counter: kept by place and shape
    versions = tuple(None if t.is_inference() else t._version for t in (crow_indices, col_indices))
    key = (versions, crow_indices.data_ptr(), col_indices.data_ptr(), tuple(col_indices.shape), in_features)
    kept = _BLOCKED.get(col_indices)
    if kept is not None and kept[0] == key:
        return kept[1]
    crow, col = crow_indices.numpy(), col_indices.numpy()
    rows_, stored = crow.shape[0] - 1, col.shape[0]
    per_row = max(1, stored // max(rows_, 1))
    rows_per_block = max(1, min(rows_, max(SLAB_ROWS, ENTRIES_PER_BLOCK // per_row)))
    blocks = -(-rows_ // rows_per_block)
    index = np.int32 if max(rows_, stored) < 2**31 else np.int64
    ptr = np.zeros(blocks * in_features + 1, dtype=np.int64)
    rows, src = np.empty(stored, dtype=index), np.empty(stored, dtype=index)
    _fill_blocks(crow, col, in_features, rows_per_block, ptr, rows, src)
    built = (ptr, rows, src, blocks)
    _BLOCKED[col_indices] = (key, built)
    return built


def _ranges(crow: np.ndarray, parts: int) -> np.ndarray:
    """Row boundaries of ``parts`` ranges holding about equal numbers of stored values."""
    targets = np.arange(parts + 1, dtype=np.int64) * int(crow[-1]) // parts  # np.linspace: 40 us a call
    bounds = np.searchsorted(crow, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, crow.shape[0] - 1
    return np.maximum.accumulate(bounds)


def _check(name: str, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, **matrices: torch.Tensor) -> None:
    for t in (crow, col, values, *matrices.values()):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: every operand must be on the CPU, got {t.device}")
    dtypes = {t.dtype for t in (values, *matrices.values())}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise ValueError(f"{name}: values and dense operands must share one dtype of {DTYPES}, got "
                         f"{sorted(str(d) for d in dtypes)}")
    for label, t in matrices.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: {label} must be 2-D, got shape {tuple(t.shape)}")


def cpu_csr_linear(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                   values: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for ``x`` [N, K] and a CSR ``W`` [out_features, K] given by ``crow_indices``,
    ``col_indices`` and ``values``: a new contiguous [N, out_features] tensor of ``x``'s dtype.
    The indices are not checked (the layer that owns them checks once).

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0.], [1., 0., 3.]]).to_sparse_csr()
    >>> cpu_csr_linear(torch.ones(1, 3), W.crow_indices(), W.col_indices(), W.values(), 2)
    tensor([[2., 4.]])
    """
    _check("cpu_csr_linear", crow_indices, col_indices, values, x=x)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    if x.shape[0] == 0 or out_features == 0:
        return out
    crow = crow_indices.numpy()
    with THREADS_LOCK:
        numba.set_num_threads(threads())
        panel = _panel(x, _X)
        _spmm(_ranges(crow, threads()), crow, col_indices.numpy(), values.detach().numpy(), panel,
              _width(x.shape[0]), out.numpy())
    return out


def cpu_csr_linear_t(dy: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                     values: torch.Tensor, crow_t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``dy @ W`` for ``dy`` [N, M] and a CSR ``W`` [M, in_features]: the input gradient of
    :func:`cpu_csr_linear`, from the same pattern and values. ``crow_t``: the row pointers of
    ``W.T`` (the stored values per column, cumulated), which split the columns over the threads.
    The row-blocked transposed pattern it runs over is built on the first call for a pattern
    (O(stored values)) and kept while ``col_indices`` lives unchanged.

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0.], [1., 0., 3.]]).to_sparse_csr()
    >>> crow_t = torch.tensor([0, 1, 2, 3])  # one stored value in each column
    >>> cpu_csr_linear_t(torch.ones(1, 2), W.crow_indices(), W.col_indices(), W.values(), crow_t, 3)
    tensor([[1., 2., 3.]])
    """
    _check("cpu_csr_linear_t", crow_indices, col_indices, values, dy=dy)
    out = torch.empty(dy.shape[0], in_features, dtype=dy.dtype)
    if dy.shape[0] == 0 or in_features == 0:
        return out
    width = _width(dy.shape[0])
    with THREADS_LOCK:
        numba.set_num_threads(threads())
        panel = _panel(dy, _DY)
        work = _scratch(_WORK, in_features * width, dy.dtype)
        ptr, rows, src, blocks = _blocked_pattern(crow_indices, col_indices, in_features)
        _spmm_tb(_ranges(crow_t.numpy(), threads()), ptr, rows, src, values.detach().numpy(), panel, width,
                 blocks, in_features, work, out.numpy())
    return out


def cpu_csr_sddmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, dy: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` [M, K] at the stored positions of a CSR pattern [M, K]: one value per entry
    of ``col_indices``, for ``dy`` [N, M] and ``x`` [N, K] of one floating dtype.

    >>> import torch
    >>> crow, col = torch.tensor([0, 1, 2]), torch.tensor([1, 0])
    >>> dy, x = torch.tensor([[1., 2.]]), torch.tensor([[3., 4.]])
    >>> cpu_csr_sddmm(crow, col, dy, x)  # (dy.T @ x)[0, 1], [1, 0]
    tensor([4., 6.])
    """
    _check("cpu_csr_sddmm", crow_indices, col_indices, x, dy=dy, x=x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"cpu_csr_sddmm: dy [N, M] and x [N, K] must share N, got {tuple(dy.shape)} "
                         f"and {tuple(x.shape)}")
    out = torch.empty(col_indices.shape[0], dtype=x.dtype)
    if out.numel() == 0:
        return out
    crow = crow_indices.numpy()
    with THREADS_LOCK:
        numba.set_num_threads(threads())
        a, b = _panel(dy, _DY), _panel(x, _X)
        _sddmm(_ranges(crow, threads()), crow, col_indices.numpy(), a, b, _width(x.shape[0]), out.numpy())
    return out


def cpu_csr_linear_backward(dy: torch.Tensor, x: torch.Tensor, crow_indices: torch.Tensor,
                            col_indices: torch.Tensor, values: torch.Tensor, crow_t: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy @ W, (dy.T @ x) at the stored positions)``: both gradients of :func:`cpu_csr_linear`
    (the input's and the values') in one sweep, for ``dy`` [N, M], ``x`` [N, K] and a CSR ``W``
    [M, K]; what :func:`cpu_csr_linear_t` and :func:`cpu_csr_sddmm` give, computed together.

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0.], [1., 0., 3.]]).to_sparse_csr()
    >>> crow_t = torch.tensor([0, 1, 2, 3])  # one stored value in each column
    >>> dy, x = torch.tensor([[1., 2.]]), torch.tensor([[3., 4., 5.]])
    >>> cpu_csr_linear_backward(dy, x, W.crow_indices(), W.col_indices(), W.values(), crow_t)
    (tensor([[2., 2., 6.]]), tensor([ 4.,  6., 10.]))
    """
    _check("cpu_csr_linear_backward", crow_indices, col_indices, values, dy=dy, x=x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"cpu_csr_linear_backward: dy [N, M] and x [N, K] must share N, got {tuple(dy.shape)} "
                         f"and {tuple(x.shape)}")
    in_features = x.shape[1]
    out = torch.empty(dy.shape[0], in_features, dtype=dy.dtype)
    grad = torch.empty(col_indices.shape[0], dtype=x.dtype)
    if dy.shape[0] == 0 or in_features == 0 or grad.numel() == 0:
        return out.zero_(), grad.zero_()
    width = _width(dy.shape[0])
    with THREADS_LOCK:
        numba.set_num_threads(threads())
        panel, xpanel = _panel(dy, _DY), _panel(x, _X)
        work = _scratch(_WORK, in_features * width, dy.dtype)
        ptr, rows, src, blocks = _blocked_pattern(crow_indices, col_indices, in_features)
        _backward_tb(_ranges(crow_t.numpy(), threads()), ptr, rows, src, values.detach().numpy(), panel, xpanel,
                     width, blocks, in_features, work, out.numpy(), grad.numpy())
    return out, grad
