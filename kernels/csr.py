"""CSR x dense on the GPU (Triton): ``Y = W @ X`` and the linear layer's ``y = x @ W.T``.

One program per (row of W, tile of BLOCK_N columns of X). It walks the row's nonzeros
BLOCK_NNZ at a time: their column indices and values are read as contiguous vectors, the
matching rows of X are gathered as a [BLOCK_NNZ, BLOCK_N] tile, and products accumulate in
fp32 in a 2-D register tile that is reduced once at the end (no cross-thread reduction inside
the loop). The loop is software-pipelined by hand: the next chunk's indices and values are
loaded before the current chunk's gather and FMAs, so their latency hides behind that work.

- Decode (N = 1 .. 16): the bytes are the weight's (index + value per nonzero; X stays in L2),
  so the N = 1 configs give every thread 8 consecutive nonzeros (4 for BLOCK_N = 4). With rows
  padded to multiples of 8 (:func:`pad_csr`, the kernel's ``ALIGNED`` form) those are 16-byte
  loads: per 8 nonzeros fp16 / bf16 values one ``ld.global.v4.b32``, int32 columns two, int64
  columns four ``ld.global.v2.b64``. An unpadded torch CSR tensor works too, with scalar loads.
- Wide N: BLOCK_N = 32 .. 256, so each gathered row of X is one contiguous segment (row-major
  X, 16-byte loads along N); there X's bytes dominate (BLOCK_N values per nonzero against one
  index and one value), and the index / value loads stay in the tile's layout.
- Linear layout: X given as the transpose of a row-major [N, K] ``x`` (and Y written as [N, M])
  through strides; flags ``X_T`` / ``Y_T`` are constexpr so the unit stride is known at
  compile time. Gathering x[n, col] then reads one 32-byte sector per element: when that
  costs more than a copy, the launcher first transposes x into a [K, N] workspace (see
  :func:`transpose_pays`).

The sparse tensor's canonical form is torch's: crow_indices [M + 1], col_indices [nnz],
values [nnz]; indices int32 or int64; columns within a row need not be sorted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from ._triton import (
    INDEX_DTYPES,
    TunedLaunch,
    check_sparse,
    is_interpreting,
    linear_problem,
    matmul_problem,
    next_pow2,
    on_device,
    rounded_as_on_gpu,
)
from .invariants import _holds

__all__ = ["PaddedCSR", "pad_csr", "transpose_pays", "triton_csr_matmul", "triton_csr_linear"]

#: Rows of a :class:`PaddedCSR` start at multiples of this many entries: 8 fp16 values are one
#: 16-byte load, the widest a thread issues.
ROW_ALIGN = 8


# --- the padded form the kernel reads fastest ---------------------------------------------------

@dataclass(frozen=True, eq=False)
class PaddedCSR:
    """A CSR matrix [M, K] whose every row holds a multiple of ``multiple`` entries (8, 16, ..),
    so each row's segment of ``col`` / ``val`` starts 16-byte aligned and the kernel reads it
    with vector loads. Built by :func:`pad_csr`, once per weight (never per call).

    ``crow`` [M + 1], ``col`` and ``val`` [padded nnz], contiguous, on one device; ``nnz`` is
    the count before padding. A padding entry holds value 0 at its row's last stored column
    (an address the row reads anyway). Extra memory: at most ``multiple - 1`` entries per row,
    ``padding * (value + index bytes)`` in all (:attr:`padding_bytes`).
    """

    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    shape: tuple[int, int]
    nnz: int
    multiple: int = ROW_ALIGN

    def __post_init__(self) -> None:
        # Cheap structural checks only; index values are checked at launch (check_invariants).
        M = self.shape[0]
        if self.multiple < ROW_ALIGN or self.multiple % ROW_ALIGN:
            raise ValueError(f"multiple must be a positive multiple of {ROW_ALIGN}, "
                             f"got {self.multiple}")
        for name, t in (("crow", self.crow), ("col", self.col), ("val", self.val)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_contiguous():
                raise ValueError(f"PaddedCSR.{name} must be a contiguous 1-D tensor")
            if t.device != self.val.device:
                raise ValueError(f"PaddedCSR.{name} is on {t.device}, val on {self.val.device}")
        if self.crow.dtype not in INDEX_DTYPES or self.col.dtype != self.crow.dtype:
            raise ValueError(f"PaddedCSR indices must both be int32 or both int64, got crow "
                             f"{self.crow.dtype} and col {self.col.dtype}")
        if self.crow.numel() != M + 1 or self.col.numel() != self.val.numel():
            raise ValueError(f"PaddedCSR of shape {tuple(self.shape)} needs crow [{M + 1}] and "
                             f"col, val of one length, got {self.crow.numel()}, "
                             f"{self.col.numel()}, {self.val.numel()}")

    @property
    def dtype(self) -> torch.dtype:
        return self.val.dtype

    @property
    def device(self) -> torch.device:
        return self.val.device

    @property
    def padding(self) -> int:
        """Entries added by padding (at most ``multiple - 1`` per row)."""
        return self.val.numel() - self.nnz

    @property
    def padding_bytes(self) -> int:
        return self.padding * (self.val.element_size() + self.col.element_size())

    def check(self, name: str = "W") -> None:
        """Raise ValueError unless every index is one the kernel may follow: crow from 0, never
        decreasing, ending at the padded length, each entry a multiple of ``multiple``; columns
        in [0, K). O(M + nnz) and one host synchronization."""
        M, K = self.shape
        if not _holds(self.crow, self.col, self.col.numel(), K):
            raise ValueError(f"{name}: PaddedCSR indices are out of range or crow is not a "
                             f"running count from 0 to {self.col.numel()}")
        if bool((self.crow % self.multiple != 0).any()):
            raise ValueError(f"{name}: PaddedCSR crow entries must be multiples of "
                             f"{self.multiple}")


def pad_csr(W: torch.Tensor, multiple: int = ROW_ALIGN, *, index_dtype: torch.dtype | None = None,
            check_invariants: bool = True) -> PaddedCSR:
    """Pad each row of the CSR tensor ``W`` to a multiple of ``multiple`` entries: the form the
    Triton kernel streams with 16-byte loads (:func:`triton_csr_matmul` takes either).

    Indices become int32 unless ``index_dtype`` says otherwise or they would not fit: torch's
    default int64 columns are 8 of the 10 bytes an fp16 nonzero costs. The padding costs at most
    ``multiple - 1`` entries per row (``padding_bytes``); columns keep their order.

    >>> import torch
    >>> W = torch.tensor([[0., 2., 0., 3.], [0., 0., 0., 0.], [1., 0., 0., 0.]]).to_sparse_csr()
    >>> P = pad_csr(W)
    >>> P.crow.tolist(), P.col.tolist()[:10], P.nnz, P.padding
    ([0, 8, 8, 16], [1, 3, 3, 3, 3, 3, 3, 3, 0, 0], 3, 13)
    >>> P.val.tolist()[:3], P.padding_bytes  # 13 padding entries of fp32 + int32
    ([2.0, 3.0, 0.0], 104)
    """
    check_sparse(W, torch.sparse_csr, check_invariants)
    if multiple < ROW_ALIGN or multiple % ROW_ALIGN:
        raise ValueError(f"multiple must be a positive multiple of {ROW_ALIGN}, got {multiple}")
    if index_dtype is not None and index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    M, K = W.shape
    crow, col, val = W.crow_indices().long(), W.col_indices().long(), W.values()
    nnz = col.numel()
    lengths = crow.diff()
    padded = (lengths + multiple - 1) // multiple * multiple
    new_crow = torch.zeros(M + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(padded, 0, out=new_crow[1:])
    total = int(new_crow[-1])
    if index_dtype is None:
        index_dtype = torch.int32 if max(total, K) < 2**31 else torch.int64
    elif index_dtype == torch.int32 and max(total, K) >= 2**31:
        raise ValueError(f"int32 indices cannot hold {total} entries of {K} columns")
    new_col = torch.zeros(total, dtype=torch.int64, device=crow.device)
    new_val = torch.zeros(total, dtype=val.dtype, device=val.device)
    if nnz:
        # Every slot of a row first takes the row's last column, then its entries move in.
        last = col[(crow[1:] - 1).clamp(min=0)]
        new_col = last.repeat_interleave(padded, output_size=total)
        shift = (new_crow[:-1] - crow[:-1]).repeat_interleave(lengths, output_size=nnz)
        where = torch.arange(nnz, device=crow.device) + shift
        new_col[where] = col
        new_val[where] = val
    return PaddedCSR(new_crow.to(index_dtype), new_col.to(index_dtype), new_val, (M, K), nnz,
                     multiple)


# --- the kernel ---------------------------------------------------------------------------------

@triton.jit
def _csr_kernel(
    crow_ptr, col_ptr, val_ptr, x_ptr, y_ptr,
    M, N, K,
    stride_x,  # X[k, n] is at k * stride_x + n, or at n * stride_x + k when X_T
    stride_y,  # Y[m, n] is at m * stride_y + n, or at n * stride_y + m when Y_T
    N_BUCKET, NNZ_BUCKET,  # autotune keys only (next power of two of N and of nnz per row)
    X_T: tl.constexpr, Y_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every crow entry a multiple of 8 (a PaddedCSR)
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)  # n * stride can pass 2**31 on large problems
    if X_T:
        mask_xn = mask_n
    else:
        # A row-major X's rows hold stride_x >= N readable columns (the launcher's workspace
        # pads them to 16); reading them all keeps the mask constant over 16 columns, so the
        # loads along N vectorize, and the extra columns only reach outputs never stored.
        mask_xn = offs_n < stride_x

    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    # A chunk is addressed as (scalar pointer + lanes) and masked by 32-bit `lanes < left`:
    # per-element 64-bit offsets and bounds were loop invariants ptxas spilled to local memory.
    lanes = tl.arange(0, BLOCK_NNZ)
    left = (end - start).to(tl.int32)
    if ALIGNED:
        # Segment bounds at multiples of 8 keep `lanes < left` constant over 8 entries: with
        # the 16-byte aligned base every thread reads its 8 entries as vector loads.
        start = tl.multiple_of(start, 8)
        left = tl.multiple_of(left, 8)
    cols = tl.load(col_ptr + start + lanes, mask=lanes < left, other=0)
    vals = tl.load(val_ptr + start + lanes, mask=lanes < left, other=0.0)
    acc = tl.zeros((BLOCK_NNZ, BLOCK_N), dtype=tl.float32)
    # A while loop, not range(start, end): triton 3.6's interpreter (with numpy 2) cannot turn
    # a loaded scalar into a range bound.
    p = start
    while p < end:
        # Software pipeline, two stages in registers: issue the next chunk's index and value
        # loads first; the gather below needs only this chunk's, so both are in flight at once.
        nxt = p + BLOCK_NNZ
        left_next = left - BLOCK_NNZ  # <= 0 past the row's end: every lane masked
        if ALIGNED:
            nxt = tl.multiple_of(nxt, 8)
            left_next = tl.multiple_of(left_next, 8)
        cols_next = tl.load(col_ptr + nxt + lanes, mask=lanes < left_next, other=0)
        vals_next = tl.load(val_ptr + nxt + lanes, mask=lanes < left_next, other=0.0)
        c64 = cols.to(tl.int64)
        if X_T:
            x_ptrs = x_ptr + offs_n64[None, :] * stride_x + c64[:, None]
        else:
            x_ptrs = x_ptr + c64[:, None] * stride_x + offs_n64[None, :]
        mask = lanes < left
        xv = tl.load(x_ptrs, mask=mask[:, None] & mask_xn[None, :], other=0.0)
        acc += vals.to(tl.float32)[:, None] * xv.to(tl.float32)
        cols, vals, left, p = cols_next, vals_next, left_next, nxt
    out = tl.sum(acc, axis=0)

    if Y_T:
        y_ptrs = y_ptr + offs_n64 * stride_y + row
    else:
        y_ptrs = y_ptr + row.to(tl.int64) * stride_y + offs_n64
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def _cfg(block_n: int, block_nnz: int, warps: int, stages: int = 2) -> triton.Config:
    # maxnreg: without it ptxas sizes registers for occupancy from the block size (64 for 128
    # threads with ptxas 12.9, 96 for 64 with 12.8) and spills the pipelined tiles to local
    # memory; 128 keeps 16 warps per SM resident and every config below spill-free.
    return triton.Config({"BLOCK_N": block_n, "BLOCK_NNZ": block_nnz},
                         num_warps=warps, num_stages=stages, maxnreg=128)


# Hopper: memory-bound either way. N = 1 configs give each thread 8 consecutive nonzeros, so a
# padded row's indices and values are 16-byte loads. BLOCK_N 4 gives 4 (16-byte int32 / int64
# indices and fp32 values, 8-byte fp16 / bf16 values) and BLOCK_N 16 one (scalar): there the
# BLOCK_N gathered values per nonzero outweigh its index and value, and more per thread spilled
# (ptxas 12.9, x gathered in place, 16 .. 32 loads in flight per thread). Small programs
# (1 .. 4 warps) keep few lanes idle on rows of a few hundred nonzeros. Wide configs give each
# gathered X row a 64 .. 512-byte segment, <= 16 fp32 per thread.
CSR_CONFIGS: list[triton.Config] = [
    _cfg(1, 256, 1), _cfg(1, 512, 2), _cfg(1, 1024, 4), _cfg(1, 2048, 8),
    _cfg(4, 128, 1), _cfg(4, 256, 2), _cfg(4, 512, 4),
    _cfg(16, 32, 1), _cfg(16, 64, 2), _cfg(16, 128, 4),
    _cfg(32, 32, 4), _cfg(32, 64, 8),
    _cfg(64, 16, 4), _cfg(64, 32, 4), _cfg(64, 64, 8),
    _cfg(128, 16, 4), _cfg(128, 32, 8),
    _cfg(256, 16, 8),
]


def _prune_csr(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep tiles that fit the problem: BLOCK_N within 4x below next_pow2(N) (never above it),
    BLOCK_NNZ no more than 2x the typical row. The interpreter gets one config: it cannot time."""
    n = named_args["N_BUCKET"]
    nnz = named_args["NNZ_BUCKET"]
    fit_n = [c for c in configs
             if c.kwargs["BLOCK_N"] <= n and 4 * c.kwargs["BLOCK_N"] >= min(n, 128)]
    if not fit_n:  # only reachable if the table changes: fall back to the widest tile <= N
        widest = max(c.kwargs["BLOCK_N"] for c in configs if c.kwargs["BLOCK_N"] <= n)
        fit_n = [c for c in configs if c.kwargs["BLOCK_N"] == widest]
    smallest = {}
    for c in fit_n:
        bn = c.kwargs["BLOCK_N"]
        smallest[bn] = min(smallest.get(bn, c.kwargs["BLOCK_NNZ"]), c.kwargs["BLOCK_NNZ"])
    kept = [c for c in fit_n if c.kwargs["BLOCK_NNZ"] <= 2 * nnz
            or c.kwargs["BLOCK_NNZ"] == smallest[c.kwargs["BLOCK_N"]]]
    return kept[:1] if is_interpreting() else kept


csr_kernel = triton.autotune(
    configs=CSR_CONFIGS,
    key=["M", "K", "N_BUCKET", "NNZ_BUCKET", "X_T", "Y_T", "ALIGNED"],
    prune_configs_by={"early_config_prune": _prune_csr},
)(_csr_kernel)


tuned_csr = TunedLaunch(csr_kernel)


#: One more launch (the transpose) costs about 2.5 us on an H100, the time to stream ~8 MB.
TRANSPOSE_LAUNCH_BYTES = 8 << 20
SECTOR_BYTES = 32  # the unit L2 and L1 move: a scalar gather pays for all of it


def transpose_pays(nnz: int, N: int, K: int, elem_bytes: int) -> bool:
    """Whether a linear layer's ``x`` [N, K] should be copied to a [K, N] workspace first.

    Read in place, x[n, col] for the N inputs lie K apart: every stored entry gathers N
    sectors (32 bytes each for 2 or 4 bytes used). From a [K, N] copy its N values are
    contiguous, ``ceil(N * elem / 32)`` sectors. The copy reads and writes ``N * K * elem``
    bytes and costs a launch. Decode (N = 1) never copies: the layouts are the same; for
    N = 2 .. 16 the weight's own bytes (index + value per entry) are what the gathers compete
    with, so the copy pays on large layers only. An estimate from bytes, not a timing.

    >>> transpose_pays(nnz=1_700_000, N=2, K=4096, elem_bytes=2)  # 4096^2 layer, 10% dense
    True
    >>> transpose_pays(nnz=24_000, N=8, K=784, elem_bytes=2)  # LeNet's first layer, 10%
    False
    >>> transpose_pays(nnz=1_700_000, N=1, K=4096, elem_bytes=2)
    False
    """
    if N <= 1:
        return False
    contiguous = -(-N * elem_bytes // SECTOR_BYTES)
    saved = SECTOR_BYTES * nnz * (N - contiguous)
    return saved > 2 * N * K * elem_bytes + TRANSPOSE_LAUNCH_BYTES


def _parts(W: torch.Tensor | PaddedCSR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(crow, col, val, aligned) of a torch CSR tensor or a PaddedCSR."""
    if isinstance(W, PaddedCSR):
        return W.crow, W.col, W.val, True
    return W.crow_indices(), W.col_indices(), W.values(), False


def _launch(W: torch.Tensor | PaddedCSR, X: torch.Tensor, Y: torch.Tensor, *, N: int,
            x_t: bool, stride_x: int, y_t: bool, stride_y: int, kernel=None,
            transpose: bool | None = None, **meta) -> None:
    """Launch over an already checked problem: autotuned, or with ``kernel=_csr_kernel`` and
    explicit BLOCK_N / BLOCK_NNZ one config (tests use it to cover every tile shape).
    ``transpose`` forces (True) or forbids (False) the [K, N] workspace for a transposed X;
    None asks :func:`transpose_pays`."""
    if rounded_as_on_gpu(Y, lambda wide: _launch(W, X, wide, N=N, x_t=x_t, stride_x=stride_x,
                                                 y_t=y_t, stride_y=stride_y, kernel=kernel,
                                                 transpose=transpose, **meta)):
        return
    M, K = W.shape
    crow, col, val, aligned = _parts(W)
    if x_t and N > 1 and (transpose if transpose is not None
                          else transpose_pays(val.numel(), N, K, X.element_size())):
        # Rows padded to 16 columns: 16-byte aligned, so the gathers along N vectorize.
        width = -(-N // 16) * 16
        ws = torch.empty((K, width), dtype=X.dtype, device=X.device)
        ws[:, :N].copy_(X.as_strided((K, N), (1, stride_x)))
        ws[:, N:].zero_()  # read by the vector loads (into outputs never stored): keep finite
        X, x_t, stride_x = ws, False, width
    n_bucket, nnz_bucket = next_pow2(N), next_pow2(val.numel() // max(M, 1))
    args = (crow, col, val, X, Y, M, N, K, stride_x, stride_y, n_bucket, nnz_bucket)
    constants = dict(X_T=x_t, Y_T=y_t, ALIGNED=aligned, **meta)
    grid = lambda meta_: (M, triton.cdiv(N, meta_["BLOCK_N"]))  # noqa: E731
    with on_device(X):
        if kernel is not None:
            kernel[grid](*args, **constants)
        else:
            key = (M, K, n_bucket, nnz_bucket, x_t, y_t, aligned, crow.dtype, col.dtype,
                   val.dtype, X.dtype, Y.dtype, X.device)
            tuned_csr(key, grid, args, constants)


def _check_w(W: torch.Tensor | PaddedCSR, check_invariants: bool) -> None:
    if isinstance(W, PaddedCSR):
        if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"W.dtype must be one of float32, float16, bfloat16, got {W.dtype}")
        if check_invariants:
            W.check()
    else:
        check_sparse(W, torch.sparse_csr, check_invariants)


def triton_csr_matmul(W: torch.Tensor | PaddedCSR, X: torch.Tensor, *,
                      out: torch.Tensor | None = None,
                      check_invariants: bool = True) -> torch.Tensor:
    """``W @ X`` for a sparse CSR ``W`` [M, K] and a dense ``X`` [K, N], as dense [M, N].

    ``W`` is a torch sparse CSR tensor or, faster, its :func:`pad_csr` form (padded once, when
    the weight is built: its index and value streams are read with 16-byte loads). ``X`` is
    either row-major contiguous or the transpose of a contiguous [N, K] tensor (``x.t()``),
    read through strides, or copied to a [K, N] workspace first when the gathers would cost
    more than the copy (:func:`transpose_pays`). Values fp32 / fp16 / bf16 (W and X alike),
    accumulated in fp32, returned in X's dtype; indices int32 or int64. ``out``, if given, is a
    contiguous [M, N] tensor to write into. W's indices are checked before the launch
    (:func:`~sparse_lth.kernels.check_index_invariants` or :meth:`PaddedCSR.check`,
    O(rows + nnz) and one host sync); ``check_invariants=False`` skips that for a W checked
    already.

    Example (on a GPU, or anywhere with ``TRITON_INTERPRET=1`` set before triton is imported,
    using CPU tensors)::

        >>> import torch
        >>> from sparse_lth.kernels import triton_csr_matmul
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = (torch.randn(64, 48) * (torch.rand(64, 48) < 0.1)).to(dev).to_sparse_csr()
        >>> X = torch.randn(48, 5, device=dev)
        >>> torch.allclose(triton_csr_matmul(W, X), W.to_dense() @ X, atol=1e-5)
        True
        >>> from sparse_lth.kernels.csr import pad_csr
        >>> torch.allclose(triton_csr_matmul(pad_csr(W), X), W.to_dense() @ X, atol=1e-5)
        True
    """
    _check_w(W, check_invariants)
    out, layout = matmul_problem(W, X, out)
    if out.numel():
        _launch(W, X, out, **layout)
    return out


def triton_csr_linear(W: torch.Tensor | PaddedCSR, x: torch.Tensor, *,
                      out: torch.Tensor | None = None,
                      check_invariants: bool = True) -> torch.Tensor:
    """A linear layer's ``x @ W.T`` (no bias) for a sparse CSR weight ``W`` [M, K] (out x in,
    a torch CSR tensor or its :func:`pad_csr` form) and a contiguous ``x`` [..., K]; returns
    [..., M]. ``x`` is read in place, or first copied to a [K, N] workspace on large layers with
    several inputs (:func:`transpose_pays`); the output is written as [..., M] directly.

    Example::

        >>> import torch
        >>> from sparse_lth.kernels import triton_csr_linear
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = (torch.randn(32, 64) * (torch.rand(32, 64) < 0.2)).to(dev).to_sparse_csr()
        >>> x = torch.randn(3, 7, 64, device=dev)
        >>> y = triton_csr_linear(W, x)
        >>> y.shape, torch.allclose(y, x @ W.to_dense().T, atol=1e-5)
        (torch.Size([3, 7, 32]), True)
        >>> from sparse_lth.kernels.csr import pad_csr
        >>> P = pad_csr(W)  # once per weight; at most 7 padding entries per row
        >>> torch.allclose(triton_csr_linear(P, x), y, atol=1e-5)
        True
    """
    _check_w(W, check_invariants)
    out, layout = linear_problem(W, x, out)
    if out.numel():
        _launch(W, x, out, **layout)
    return out
