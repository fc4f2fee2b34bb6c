"""CSR x dense on the GPU (Triton): ``Y = W @ X`` and the linear layer's ``y = x @ W.T``.

One program per (row of W, tile of BLOCK_N columns of X). It walks the row's nonzeros
BLOCK_NNZ at a time: their column indices and values are read as contiguous vectors, the
matching rows of X are gathered as a [BLOCK_NNZ, BLOCK_N] tile, and products accumulate in
fp32 in a 2-D register tile that is reduced once at the end (no cross-thread reduction inside
the loop).

- Decode (N = 1 .. 16): BLOCK_N is 1 .. 16 and BLOCK_NNZ large, so each warp reads long
  coalesced runs of indices and values, the bytes that dominate; X is a vector that stays in L2.
- Wide N: BLOCK_N = 32 .. 256, so each gathered row of X is one contiguous segment (row-major X).
- Linear layout: X given as the transpose of a row-major [N, K] ``x`` (and Y written as [N, M])
  through strides; flags ``X_T`` / ``Y_T`` are constexpr so the unit stride is known at
  compile time and loads and stores vectorize along it.

The sparse tensor's canonical form is torch's: crow_indices [M + 1], col_indices [nnz],
values [nnz]; indices int32 or int64; columns within a row need not be sorted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    TunedLaunch,
    check_sparse,
    is_interpreting,
    linear_problem,
    matmul_problem,
    next_pow2,
    on_device,
)

__all__ = ["triton_csr_matmul", "triton_csr_linear"]


@triton.jit
def _csr_kernel(
    crow_ptr, col_ptr, val_ptr, x_ptr, y_ptr,
    M, N, K,
    stride_x,  # X[k, n] is at k * stride_x + n, or at n * stride_x + k when X_T
    stride_y,  # Y[m, n] is at m * stride_y + n, or at n * stride_y + m when Y_T
    N_BUCKET, NNZ_BUCKET,  # autotune keys only (next power of two of N and of nnz per row)
    X_T: tl.constexpr, Y_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)  # n * stride can pass 2**31 on large problems

    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_NNZ, BLOCK_N), dtype=tl.float32)
    for p in range(start, end, BLOCK_NNZ):
        offs = p + tl.arange(0, BLOCK_NNZ)
        mask = offs < end
        cols = tl.load(col_ptr + offs, mask=mask, other=0).to(tl.int64)
        vals = tl.load(val_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if X_T:
            x_ptrs = x_ptr + offs_n64[None, :] * stride_x + cols[:, None]
        else:
            x_ptrs = x_ptr + cols[:, None] * stride_x + offs_n64[None, :]
        xv = tl.load(x_ptrs, mask=mask[:, None] & mask_n[None, :], other=0.0)
        acc += vals[:, None] * xv.to(tl.float32)
    out = tl.sum(acc, axis=0)

    if Y_T:
        y_ptrs = y_ptr + offs_n64 * stride_y + row
    else:
        y_ptrs = y_ptr + row.to(tl.int64) * stride_y + offs_n64
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def _cfg(block_n: int, block_nnz: int, warps: int, stages: int = 2) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_NNZ": block_nnz},
                         num_warps=warps, num_stages=stages)


# Hopper: memory-bound either way. Decode configs spread a row's nonzeros over all threads
# (16-byte index/value loads); wide configs give each gathered X row a 64 .. 512-byte segment.
# The register tile BLOCK_NNZ * BLOCK_N stays <= 16 fp32 per thread (room to grow on a GPU).
CSR_CONFIGS: list[triton.Config] = [
    _cfg(1, 128, 4), _cfg(1, 256, 4), _cfg(1, 512, 8),
    _cfg(4, 64, 4), _cfg(4, 128, 4),
    _cfg(16, 32, 4), _cfg(16, 64, 4), _cfg(16, 128, 8),
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
    key=["M", "K", "N_BUCKET", "NNZ_BUCKET", "X_T", "Y_T"],
    prune_configs_by={"early_config_prune": _prune_csr},
)(_csr_kernel)


tuned_csr = TunedLaunch(csr_kernel)


def _launch(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, *, N: int, x_t: bool,
            stride_x: int, y_t: bool, stride_y: int, kernel=None, **meta) -> None:
    """Launch over an already checked problem: autotuned, or with ``kernel=_csr_kernel`` and
    explicit BLOCK_N / BLOCK_NNZ one config (tests use it to cover every tile shape)."""
    if is_interpreting() and Y.dtype == torch.bfloat16:
        # The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
        # Write fp32 and let torch round, so interpreter runs test the GPU's numerics.
        Y32 = torch.empty(Y.shape, dtype=torch.float32, device=Y.device)
        _launch(W, X, Y32, N=N, x_t=x_t, stride_x=stride_x, y_t=y_t, stride_y=stride_y,
                kernel=kernel, **meta)
        Y.copy_(Y32)
        return
    M, K = W.shape
    crow, col, val = W.crow_indices(), W.col_indices(), W.values()
    n_bucket, nnz_bucket = next_pow2(N), next_pow2(val.numel() // max(M, 1))
    args = (crow, col, val, X, Y, M, N, K, stride_x, stride_y, n_bucket, nnz_bucket)
    constants = dict(X_T=x_t, Y_T=y_t, **meta)
    grid = lambda meta_: (M, triton.cdiv(N, meta_["BLOCK_N"]))  # noqa: E731
    with on_device(X):
        if kernel is not None:
            kernel[grid](*args, **constants)
        else:
            key = (M, K, n_bucket, nnz_bucket, x_t, y_t, crow.dtype, col.dtype, val.dtype,
                   X.dtype, Y.dtype, X.device)
            tuned_csr(key, grid, args, constants)


def triton_csr_matmul(W: torch.Tensor, X: torch.Tensor, *, out: torch.Tensor | None = None,
                      check_invariants: bool = True) -> torch.Tensor:
    """``W @ X`` for a sparse CSR ``W`` [M, K] and a dense ``X`` [K, N], as dense [M, N].

    ``X`` is either row-major contiguous or the transpose of a contiguous [N, K] tensor
    (``x.t()``), read through strides without a copy. Values fp32 / fp16 / bf16 (W and X
    alike), accumulated in fp32, returned in X's dtype; indices int32 or int64. ``out``, if
    given, is a contiguous [M, N] tensor to write into. W's indices are checked before the
    launch (:func:`~sparse_lth.kernels.check_index_invariants`, O(rows + nnz) and one host
    sync); ``check_invariants=False`` skips that for a W checked already.

    Example (on a GPU, or anywhere with ``TRITON_INTERPRET=1`` set before triton is imported,
    using CPU tensors)::

        >>> import torch
        >>> from sparse_lth.kernels import triton_csr_matmul
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = (torch.randn(64, 48) * (torch.rand(64, 48) < 0.1)).to(dev).to_sparse_csr()
        >>> X = torch.randn(48, 5, device=dev)
        >>> torch.allclose(triton_csr_matmul(W, X), W.to_dense() @ X, atol=1e-5)
        True
    """
    check_sparse(W, torch.sparse_csr, check_invariants)
    out, layout = matmul_problem(W, X, out)
    if out.numel():
        _launch(W, X, out, **layout)
    return out


def triton_csr_linear(W: torch.Tensor, x: torch.Tensor, *, out: torch.Tensor | None = None,
                      check_invariants: bool = True) -> torch.Tensor:
    """A linear layer's ``x @ W.T`` (no bias) for a sparse CSR weight ``W`` [M, K] (out x in)
    and a contiguous ``x`` [..., K]; returns [..., M] without transposing anything in memory.

    Example::

        >>> import torch
        >>> from sparse_lth.kernels import triton_csr_linear
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = (torch.randn(32, 64) * (torch.rand(32, 64) < 0.2)).to(dev).to_sparse_csr()
        >>> x = torch.randn(3, 7, 64, device=dev)
        >>> y = triton_csr_linear(W, x)
        >>> y.shape, torch.allclose(y, x @ W.to_dense().T, atol=1e-5)
        (torch.Size([3, 7, 32]), True)
    """
    check_sparse(W, torch.sparse_csr, check_invariants)
    out, layout = linear_problem(W, x, out)
    if out.numel():
        _launch(W, x, out, **layout)
    return out
