"""BSR x dense on the GPU (Triton): ``Y = W @ X`` and the linear layer's ``y = x @ W.T``.

One program per (block row of W, tile of BLOCK_N columns of X). It loops over the block row's
stored blocks: each [BR, BC] block meets the [BC, BLOCK_N] slice of X under its block column in
one ``tl.dot`` (tensor cores for fp16 / bf16), accumulating in fp32. Hopper's ``wgmma`` takes 64
rows or more: blocks of 64 rows give them; with 16- and 32-row blocks and BLOCK_N >= 64 the dot
is swapped, ``[BLOCK_N, BC] @ [BC, BR]`` (X's columns as its rows), so these run on wgmma too
(they ran on ``mma.sync``: 1.61-2.18x cuBLAS for 32-row blocks at 90 % on an H200, against
3.1-3.5x for 64-row blocks on the TMA kernel). The column index of the next block is a load inside the loop; Triton's pipeliner
prefetches it with the tiles ``num_stages`` deep.

- fp32 uses IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, matching
  ``torch.matmul``'s choice.
- Linear layout: X given as the transpose of a row-major [N, K] ``x`` and Y written as [N, M],
  through strides with the unit stride known at compile time (constexpr ``X_T`` / ``Y_T``).
- Blocks: BR, BC powers of two from 16 to 128, square or not (tl.dot needs every side >= 16).

Which kernel runs (:func:`kernel_for`, or the ``path`` argument): decode-sized products, N x BR
at most 256, go to ``bsr_decode.py`` (programs split the stored blocks evenly, a register GEMV
body); N > 16 with blocks of 64 rows or more and 16-byte aligned operands on Hopper to
``bsr_tma.py`` (tensor-descriptor copies into wgmma, a persistent grid); everything else runs the
kernel here, whose loads are ``cp.async`` copies.

The sparse tensor is torch's BSR: crow_indices [M / BR + 1], col_indices [nnzb] (block
columns), values [nnzb, BR, BC] row-major; indices int32 or int64.
"""

from __future__ import annotations

import functools

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
    prune_tiles,
    rounded_as_on_gpu,
    shared_limit_of,
    tile_shared_bytes,
)
from .bsr_decode import DECODE_MAX_N, launch_bsr_decode
from .bsr_tma import launch_bsr_tma, tma_fits

__all__ = ["triton_bsr_matmul", "triton_bsr_linear", "kernel_for", "PATHS"]


@triton.jit
def _bsr_kernel(
    crow_ptr, col_ptr, val_ptr, x_ptr, y_ptr,
    M, N, K,
    stride_x,  # X[k, n] is at k * stride_x + n, or at n * stride_x + k when X_T
    stride_y,  # Y[m, n] is at m * stride_y + n, or at n * stride_y + m when Y_T
    N_BUCKET,  # autotune key only (next power of two of N)
    BR: tl.constexpr, BC: tl.constexpr,
    X_T: tl.constexpr, Y_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only fp32 operands read it
    UPCAST: tl.constexpr,  # dot in fp32: the CPU interpreter's bf16 tl.dot is wrong
    BLOCK_N: tl.constexpr,
):
    brow = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = tl.arange(0, BR)
    offs_c = tl.arange(0, BC)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)  # n * stride can pass 2**31 on large problems

    start = tl.load(crow_ptr + brow).to(tl.int64)
    end = tl.load(crow_ptr + brow + 1).to(tl.int64)
    # Blocks under 64 rows: X's columns are the dot's rows, acc[BLOCK_N, BR] = X slice^T @
    # block^T, so the dot still runs on Hopper's wgmma (64 rows or more; mma.sync otherwise).
    SWAP: tl.constexpr = BR < 64 and BLOCK_N >= 64
    if SWAP:
        acc = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
    else:
        acc = tl.zeros((BR, BLOCK_N), dtype=tl.float32)
    blk_offs = offs_r[:, None] * BC + offs_c[None, :]
    for p in range(start, end):
        bcol = tl.load(col_ptr + p).to(tl.int64)
        a = tl.load(val_ptr + p * (BR * BC) + blk_offs)
        k = bcol * BC + offs_c  # K is a multiple of BC: no mask along k
        if X_T:
            x_ptrs = x_ptr + offs_n64[None, :] * stride_x + k[:, None]
        else:
            x_ptrs = x_ptr + k[:, None] * stride_x + offs_n64[None, :]
        b = tl.load(x_ptrs, mask=mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SWAP:
            acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SWAP:
        acc = tl.trans(acc)

    rows = brow.to(tl.int64) * BR + offs_r
    if Y_T:
        y_ptrs = y_ptr + offs_n64[None, :] * stride_y + rows[:, None]
    else:
        y_ptrs = y_ptr + rows[:, None] * stride_y + offs_n64[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[None, :])


def _cfg(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Odd stage counts above 2 only: an even one compiles to the code of the odd one below it (the
# column-index load takes a pipeline stage; buffers per count: _triton.pipeline_buffers, read off
# the compiled kernels in tests/test_kernel_compile.py). 8 warps for the large accumulators
# (128 x 256 fp32 is 128 KB of registers). Configs over the device's shared memory are pruned
# at launch.
BSR_CONFIGS: list[triton.Config] = [
    _cfg(16, 4, 2), _cfg(16, 4, 3), _cfg(16, 4, 5),
    _cfg(32, 4, 3), _cfg(32, 4, 5),
    _cfg(64, 8, 2), _cfg(64, 4, 3), _cfg(64, 8, 3), _cfg(64, 4, 5), _cfg(64, 8, 5),
    _cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(128, 8, 5), _cfg(128, 8, 7),
    _cfg(256, 8, 3), _cfg(256, 8, 5),
]


# The estimate pruning relies on, and the pruning (kernels/_triton.py, shared with bsr_tma.py).
bsr_shared_bytes = tile_shared_bytes
prune_bsr_configs = functools.partial(prune_tiles, narrowest=16, widest=128)  # tl.dot's floor


def _prune_bsr(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    x = named_args["x_ptr"]
    elem = 4 if kwargs.get("UPCAST") else x.element_size()
    kept = prune_bsr_configs(configs, named_args["N_BUCKET"], kwargs["BR"], kwargs["BC"], elem,
                             shared_limit_of(x))
    return kept[:1] if is_interpreting() else kept  # the interpreter cannot time configs


bsr_kernel = triton.autotune(
    configs=BSR_CONFIGS,
    key=["M", "K", "N_BUCKET", "BR", "BC", "X_T", "Y_T", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_bsr},
)(_bsr_kernel)


def _check_bsr(W: torch.Tensor, check_invariants: bool) -> tuple[int, int]:
    check_sparse(W, torch.sparse_bsr, check_invariants)
    br, bc = W.values().shape[-2:]
    for side, v in (("rows", br), ("columns", bc)):
        if v < 16 or v > 128 or v & (v - 1):
            raise ValueError(f"W's block {side} must be a power of two from 16 to 128, "
                             f"got blocksize {(br, bc)}")
    return br, bc


tuned_bsr = TunedLaunch(bsr_kernel)

#: The kernels a product can run on: "auto" asks :func:`kernel_for`.
PATHS = ("auto", "decode", "tma", "rows")
#: Decode takes N x BR up to this. Measured on an H200 (2026-11-27; N = 1 and 16 timed for
#: both kernels, linear between) at 90-95 % block sparsity, decode beat this file's kernel up to
#: N = 16 with 16-row blocks, ~8 with 32, ~6 with 64 and ~2 with 128 (its FP32 GEMV work grows
#: with N x BR; tl.dot pads N to 16 and costs the same from 1 to 16).
DECODE_N_TIMES_ROWS = 256
#: The bulk-copy kernel from this block height (wgmma's tile): with 16- and 32-row blocks it ran
#: slower than or even with this file's kernel on the same H200.
TMA_MIN_ROWS = 64


def kernel_for(W: torch.Tensor, X: torch.Tensor, N: int, x_t: bool) -> str:
    """The kernel an automatic launch runs: "decode", "tma" or "rows" (see the module doc).

    >>> W = torch.randn(256, 256).to_sparse_bsr((64, 64))
    >>> [kernel_for(W, torch.randn(256, n), n, False) for n in (1, 4, 5, 16)]
    ['decode', 'decode', 'rows', 'rows']
    """
    nnzb, br, _ = W.values().shape
    if N * br <= DECODE_N_TIMES_ROWS and N <= DECODE_MAX_N and nnzb < 2**31:  # int32 ids
        return "decode"
    if N > 16 and br >= TMA_MIN_ROWS and tma_fits(W, X, x_t):  # Hopper, aligned
        return "tma"
    return "rows"


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _path_for(W: torch.Tensor, X: torch.Tensor, N: int, x_t: bool, path: str) -> str:
    """``path`` checked against the problem ("auto" resolved)."""
    _check_path(path)
    if path == "auto":
        return kernel_for(W, X, N, x_t)
    if path == "decode" and (N > DECODE_MAX_N or W.values().shape[0] >= 2**31):
        raise ValueError(f"path='decode' takes N <= {DECODE_MAX_N} and under 2**31 blocks, "
                         f"got N = {N}")
    if path == "tma" and not (N > 16 and tma_fits(W, X, x_t)):
        raise ValueError("path='tma' needs N > 16, a Hopper GPU (or the interpreter) and 16-byte "
                         "aligned operands")
    return path


def _launch(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, *, N: int, x_t: bool,
            stride_x: int, y_t: bool, stride_y: int, kernel=None, path: str = "auto",
            **meta) -> None:
    """Launch over an already checked problem: autotuned, or with ``kernel=_bsr_kernel`` and an
    explicit BLOCK_N (and num_warps / num_stages) one config: tests use it to cover each tile.
    Autotuned launches run the kernel ``path`` names (:func:`kernel_for` for "auto")."""
    if kernel is None:
        path = _path_for(W, X, N, x_t, path)
        if path == "decode":
            launch_bsr_decode(W, X, Y, N=N, x_t=x_t, stride_x=stride_x, y_t=y_t,
                              stride_y=stride_y)
            return
        if path == "tma":
            launch_bsr_tma(W, X, Y, N=N, x_t=x_t, y_t=y_t, stride_y=stride_y)
            return
    if rounded_as_on_gpu(Y, lambda wide: _launch(W, X, wide, N=N, x_t=x_t, stride_x=stride_x,
                                                 y_t=y_t, stride_y=stride_y, kernel=kernel,
                                                 path="rows", **meta)):
        return
    M, K = W.shape
    crow, col, val = W.crow_indices(), W.col_indices(), W.values()
    br, bc = val.shape[-2:]
    fp32 = X.dtype == torch.float32
    precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    upcast = is_interpreting() and X.dtype == torch.bfloat16
    args = (crow, col, val, X, Y, M, N, K, stride_x, stride_y, next_pow2(N))
    constants = dict(BR=br, BC=bc, X_T=x_t, Y_T=y_t, DOT_PRECISION=precision, UPCAST=upcast,
                     **meta)
    grid = lambda meta_: (M // br, triton.cdiv(N, meta_["BLOCK_N"]))  # noqa: E731
    with on_device(X):
        if kernel is not None:
            kernel[grid](*args, **constants)
        else:
            key = (M, K, args[-1], br, bc, x_t, y_t, precision, upcast, crow.dtype, col.dtype,
                   val.dtype, X.dtype, Y.dtype, X.device)
            tuned_bsr(key, grid, args, constants)


def triton_bsr_matmul(W: torch.Tensor, X: torch.Tensor, *, out: torch.Tensor | None = None,
                      check_invariants: bool = True, path: str = "auto") -> torch.Tensor:
    """``W @ X`` for a sparse BSR ``W`` [M, K] (blocks 16 .. 128, powers of two) and a dense
    ``X`` [K, N], as dense [M, N].

    ``X`` is either row-major contiguous or the transpose of a contiguous [N, K] tensor
    (``x.t()``), read through strides without a copy. Values fp32 / fp16 / bf16 (W and X
    alike), accumulated in fp32, returned in X's dtype; indices int32 or int64. ``out``, if
    given, is a contiguous [M, N] tensor to write into. W's block indices are checked before
    the launch unless ``check_invariants=False`` (see :func:`triton_csr_matmul`). ``path``
    picks the kernel ("decode", "tma", "rows"; "auto": :func:`kernel_for`), for benchmarks and
    for users who measured their own shapes; a kernel the problem does not fit is refused.

    Example (on a GPU, or anywhere with ``TRITON_INTERPRET=1`` set before triton is imported,
    using CPU tensors)::

        >>> import torch
        >>> from sparse_lth.kernels import triton_bsr_matmul
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> keep = torch.rand(4, 2) < 0.5  # which 16 x 32 blocks survive
        >>> dense = torch.randn(64, 64) * keep.repeat_interleave(16, 0).repeat_interleave(32, 1)
        >>> W = dense.to(dev).to_sparse_bsr((16, 32))
        >>> X = torch.randn(64, 3, device=dev)
        >>> torch.allclose(triton_bsr_matmul(W, X), W.to_dense() @ X, atol=1e-4)
        True
    """
    _check_bsr(W, check_invariants)
    _check_path(path)
    out, layout = matmul_problem(W, X, out)
    if out.numel():
        _launch(W, X, out, path=path, **layout)
    return out


def triton_bsr_linear(W: torch.Tensor, x: torch.Tensor, *, out: torch.Tensor | None = None,
                      check_invariants: bool = True, path: str = "auto") -> torch.Tensor:
    """A linear layer's ``x @ W.T`` (no bias) for a sparse BSR weight ``W`` [M, K] (out x in)
    and a contiguous ``x`` [..., K]; returns [..., M] without transposing anything in memory.
    ``path`` as in :func:`triton_bsr_matmul`.

    Example::

        >>> import torch
        >>> from sparse_lth.kernels import triton_bsr_linear
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = torch.randn(32, 64, device=dev).to_sparse_bsr((16, 16))
        >>> x = torch.randn(5, 64, device=dev)
        >>> torch.allclose(triton_bsr_linear(W, x), x @ W.to_dense().T, atol=1e-4)
        True
    """
    _check_bsr(W, check_invariants)
    _check_path(path)
    out, layout = linear_problem(W, x, out)
    if out.numel():
        _launch(W, x, out, path=path, **layout)
    return out
