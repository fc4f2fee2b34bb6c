"""Sampled dense x dense on the GPU (Triton): a sparse linear layer's weight gradient.

For ``y = x @ W.T`` with a sparse W [M, K], the gradient of the stored values is the dense
product ``dy.T @ x`` [M, K] sampled at W's pattern: ``dy`` [N, M] and ``x`` [N, K] are the
layer's output gradient and input (rows are tokens), both row-major. Nothing dense of size
M x K is formed.

- CSR: a flat grid over the nonzeros, BLOCK_NNZ per program, each nonzero with its own row
  (``rows``, expanded from crow on the device once per call, no host sync), so long and empty
  rows cost the same as any other: the work is balanced by construction. A program walks N
  BLOCK_N tokens at a time, gathers the [BLOCK_N, BLOCK_NNZ] tiles ``x[n, col]`` and
  ``dy[n, row]`` (nonzeros along the fast axis: a row's columns are near each other, and its
  ``dy`` entries are one address broadcast), and multiplies into an fp32 register tile that is
  reduced over N once at the end.
- BSR: one program per stored [BR, BC] block at block row r, block column c: ``tl.dot`` of
  the [BR, BLOCK_N] slice ``dy[n, r*BR:(r+1)*BR].T`` (read transposed through strides) and the
  [BLOCK_N, BC] slice ``x[n, c*BC:(c+1)*BC]``, accumulated over N in fp32 (tensor cores for
  fp16 / bf16, ``wgmma`` on Hopper when BR >= 64; fp32 is IEEE unless
  ``torch.backends.cuda.matmul.allow_tf32``, as in bsr.py). Blocks BR, BC: powers of two from
  16 to 128.

Outputs are the gradient's values in W's storage order: [nnz] for CSR, [nblocks, BR, BC] for
BSR, in x's dtype. Each output is written once (no atomics), so autotuning reruns are harmless.
Not split over N: a weight with few blocks and a very long N runs few, long programs.

Measured once on an H200 (triton 3.6, bf16, M = K = N = 4096; dense ``dy.T @ x`` 0.18 ms):
BSR 64 x 64 / 128 x 128 blocks at ~40 % of blocks kept ran 0.17 / 0.15 ms (310 / 386 TFLOP/s).
CSR ran 16.6 ms at 10 % density and 3.8 ms at 1 %: every product gathers one element per
32-byte sector along N, so for long N a dense product sampled afterwards is faster where an
M x K temporary fits; the CSR kernel's case is short N or memory too tight for that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    TunedLaunch,
    check_out,
    check_sddmm_operands,
    is_interpreting,
    next_pow2,
    on_device,
    rounded_as_on_gpu,
    shared_limit_of,
)

__all__ = ["triton_csr_sddmm", "triton_bsr_sddmm"]


@triton.jit
def _csr_sddmm_kernel(
    row_ptr, col_ptr, dy_ptr, x_ptr, out_ptr,
    NNZ, N, M, K,  # dy[n, m] is at n * M + m, x[n, k] at n * K + k
    N_BUCKET, NNZ_BUCKET,  # autotune keys only (next power of two of N and of nnz)
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    mask = offs < NNZ
    rows = tl.load(row_ptr + offs, mask=mask, other=0).to(tl.int64)
    cols = tl.load(col_ptr + offs, mask=mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_NNZ), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # n * K can pass 2**31
        m2 = (offs_n < N)[:, None] & mask[None, :]
        xv = tl.load(x_ptr + offs_n[:, None] * K + cols[None, :], mask=m2, other=0.0)
        dv = tl.load(dy_ptr + offs_n[:, None] * M + rows[None, :], mask=m2, other=0.0)
        acc += dv.to(tl.float32) * xv.to(tl.float32)
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _ccfg(block_n: int, block_nnz: int, warps: int, stages: int = 2) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_NNZ": block_nnz},
                         num_warps=warps, num_stages=stages)


# Memory-bound gathers: the register tile BLOCK_N * BLOCK_NNZ stays at 16 fp32 per thread;
# wide BLOCK_NNZ for long runs of indices, wide BLOCK_N for fewer loop trips on long N.
CSR_SDDMM_CONFIGS: list[triton.Config] = [
    _ccfg(16, 128, 4), _ccfg(8, 256, 4), _ccfg(16, 64, 2), _ccfg(32, 64, 4),
    _ccfg(32, 128, 8), _ccfg(64, 32, 4), _ccfg(64, 64, 8),
]


def prune_csr_sddmm_configs(configs: list[triton.Config], n: int, nnz: int
                            ) -> list[triton.Config]:
    """Tiles that fit the problem: BLOCK_N no wider than next_pow2(N), then BLOCK_NNZ no wider
    than next_pow2(nnz) (the narrowest of each always stays)."""
    min_n = min(c.kwargs["BLOCK_N"] for c in configs)
    fit_n = [c for c in configs if c.kwargs["BLOCK_N"] <= max(next_pow2(n), min_n)]
    min_nnz = min(c.kwargs["BLOCK_NNZ"] for c in fit_n)
    return [c for c in fit_n if c.kwargs["BLOCK_NNZ"] <= max(next_pow2(nnz), min_nnz)]


def _prune_csr(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    kept = prune_csr_sddmm_configs(configs, named_args["N_BUCKET"], named_args["NNZ_BUCKET"])
    return kept[:1] if is_interpreting() else kept  # the interpreter cannot time configs


csr_sddmm_kernel = triton.autotune(
    configs=CSR_SDDMM_CONFIGS,
    key=["M", "K", "N_BUCKET", "NNZ_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_csr},
)(_csr_sddmm_kernel)


@triton.jit
def _bsr_sddmm_kernel(
    row_ptr, col_ptr, dy_ptr, x_ptr, out_ptr,
    N, M, K,  # dy[n, m] is at n * M + m, x[n, k] at n * K + k
    N_BUCKET,  # autotune key only (next power of two of N)
    BR: tl.constexpr, BC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only fp32 operands read it
    UPCAST: tl.constexpr,  # dot in fp32: the CPU interpreter's bf16 tl.dot is wrong
    BLOCK_N: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    brow = tl.load(row_ptr + p).to(tl.int64)
    bcol = tl.load(col_ptr + p).to(tl.int64)
    offs_r = tl.arange(0, BR)
    offs_c = tl.arange(0, BC)
    m = brow * BR + offs_r  # M and K are multiples of BR and BC: no masks along them
    k = bcol * BC + offs_c
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # n * K can pass 2**31
        mask_n = offs_n < N
        a = tl.load(dy_ptr + offs_n[None, :] * M + m[:, None], mask=mask_n[None, :], other=0.0)
        b = tl.load(x_ptr + offs_n[:, None] * K + k[None, :], mask=mask_n[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + p * (BR * BC) + offs_r[:, None] * BC + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


def _bcfg(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# The loop over N is a GEMM's K loop: 3-4 stages hide the loads. The accumulator is the whole
# [BR, BC] block (128 x 128 fp32 is 64 KB of registers: 8 warps). Shared memory per stage is
# (BR + BC) * BLOCK_N * bytes; configs past the device limit are pruned at launch.
BSR_SDDMM_CONFIGS: list[triton.Config] = [
    _bcfg(32, 4, 3), _bcfg(16, 4, 3), _bcfg(16, 8, 3),
    _bcfg(32, 4, 4), _bcfg(32, 8, 3),
    _bcfg(64, 4, 3), _bcfg(64, 8, 2), _bcfg(64, 8, 3),
    _bcfg(128, 4, 2), _bcfg(128, 8, 3),
]


def bsr_sddmm_shared_bytes(config: triton.Config, br: int, bc: int, elem_bytes: int) -> int:
    """Upper bound on one config's shared memory: ``num_stages`` copies of both tiles, or the
    output block that the epilogue stages to change layout, whichever is larger (triton 3.9,
    sm_80 / sm_90: 128 x 128 blocks with BLOCK_N = 16 take the latter). The output is in the
    operands' dtype. tests/test_kernel_compile.py checks every compiled config against it."""
    pipeline = config.num_stages * (br + bc) * config.kwargs["BLOCK_N"] * elem_bytes
    return max(pipeline, br * bc * elem_bytes)


def prune_bsr_sddmm_configs(configs: list[triton.Config], n: int, br: int, bc: int,
                            elem_bytes: int, smem_limit: int) -> list[triton.Config]:
    """Configs worth timing: BLOCK_N at most next_pow2(N) (16 at least, tl.dot's floor), at
    most 64 fp32 accumulators per thread, shared memory under the limit."""
    n = max(16, next_pow2(n))
    enough_warps = [c for c in configs if br * bc <= 64 * 32 * c.num_warps]
    kept = [c for c in enough_warps
            if c.kwargs["BLOCK_N"] <= n
            and bsr_sddmm_shared_bytes(c, br, bc, elem_bytes) <= smem_limit]
    if not kept:  # shallowest pipeline, narrowest tile
        kept = [min(enough_warps, key=lambda c: bsr_sddmm_shared_bytes(c, br, bc, elem_bytes))]
    return kept


def _prune_bsr(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    x = named_args["x_ptr"]
    elem = 4 if kwargs.get("UPCAST") else x.element_size()
    limit = shared_limit_of(x)
    kept = prune_bsr_sddmm_configs(configs, named_args["N_BUCKET"], kwargs["BR"], kwargs["BC"],
                                   elem, limit)
    return kept[:1] if is_interpreting() else kept  # the interpreter cannot time configs


bsr_sddmm_kernel = triton.autotune(
    configs=BSR_SDDMM_CONFIGS,
    key=["M", "K", "N_BUCKET", "BR", "BC", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_bsr},
)(_bsr_sddmm_kernel)


tuned_csr_sddmm = TunedLaunch(csr_sddmm_kernel)
tuned_bsr_sddmm = TunedLaunch(bsr_sddmm_kernel)


def _rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """The (block) row of every stored entry, int32, on crow's device (no host sync)."""
    n_rows = crow.numel() - 1
    index = torch.int32 if n_rows < 2**31 else torch.int64
    return torch.repeat_interleave(torch.arange(n_rows, dtype=index, device=crow.device),
                                   crow[1:] - crow[:-1], output_size=nnz)


def _launch(crow: torch.Tensor, col: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
            out: torch.Tensor, block: tuple[int, int] | None, kernel=None, **meta) -> None:
    """Launch over an already checked problem with N > 0 and nnz > 0 (``block`` None for CSR):
    autotuned, or with ``kernel=`` the raw jit function and an explicit config (tests)."""
    if rounded_as_on_gpu(out, lambda wide: _launch(crow, col, dy, x, wide, block, kernel=kernel,
                                                   **meta)):
        return
    (N, M), K, nnz = dy.shape, x.shape[1], col.numel()
    rows = _rows(crow, nnz)
    n_bucket = next_pow2(N)
    if block is None:
        nnz_bucket = next_pow2(nnz)
        args = (rows, col, dy, x, out, nnz, N, M, K, n_bucket, nnz_bucket)
        constants = dict(meta)
        grid = lambda meta_: (triton.cdiv(nnz, meta_["BLOCK_NNZ"]),)  # noqa: E731
        key = (M, K, n_bucket, nnz_bucket, col.dtype, x.dtype, out.dtype, x.device)
        tuned = tuned_csr_sddmm
    else:
        br, bc = block
        fp32 = x.dtype == torch.float32
        precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
        upcast = is_interpreting() and x.dtype == torch.bfloat16
        args = (rows, col, dy, x, out, N, M, K, n_bucket)
        constants = dict(BR=br, BC=bc, DOT_PRECISION=precision, UPCAST=upcast, **meta)
        grid = (nnz,)
        key = (M, K, n_bucket, br, bc, precision, upcast, col.dtype, x.dtype, out.dtype,
               x.device)
        tuned = tuned_bsr_sddmm
    with on_device(x):
        if kernel is not None:
            kernel[grid](*args, **constants)
        else:
            tuned(key, grid, args, constants)


def triton_csr_sddmm(crow: torch.Tensor, col: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
                     *, out: torch.Tensor | None = None, check_invariants: bool = True
                     ) -> torch.Tensor:
    """The weight gradient of ``y = x @ W.T`` at a CSR ``W`` [M, K]'s stored entries:
    ``out[p] = sum_n dy[n, row(p)] * x[n, col[p]]``, i.e. ``(dy.T @ x)`` sampled at W's
    pattern, returned as [nnz] values in W's storage order.

    ``crow`` [M + 1] and ``col`` [nnz] are W's index tensors (int32 or int64); ``dy`` [N, M]
    and ``x`` [N, K] are row-major contiguous, fp32 / fp16 / bf16 alike, accumulated in fp32,
    the result in x's dtype (zeros when N = 0). ``out``, if given, is a contiguous [nnz] tensor
    to write into. The indices are checked first (crow from 0, never decreasing, ending at nnz;
    columns in [0, K): O(M + nnz) and one host sync); ``check_invariants=False`` skips that
    for indices checked already.

    Example (on a GPU, or anywhere with ``TRITON_INTERPRET=1`` set before triton is imported,
    using CPU tensors)::

        >>> import torch
        >>> from sparse_lth.kernels import triton_csr_sddmm
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = (torch.randn(32, 48) * (torch.rand(32, 48) < 0.2)).to(dev).to_sparse_csr()
        >>> dy, x = torch.randn(10, 32, device=dev), torch.randn(10, 48, device=dev)
        >>> g = triton_csr_sddmm(W.crow_indices(), W.col_indices(), dy, x)
        >>> dense = (dy.T @ x) * (W.to_dense() != 0)
        >>> g.shape == W.values().shape, torch.allclose(g, dense[W.to_dense() != 0], atol=1e-4)
        (True, True)
    """
    check_sddmm_operands(crow, col, dy, x, (1, 1), check_invariants)
    nnz = col.numel()
    if out is None:
        out = torch.empty((nnz,), dtype=x.dtype, device=x.device)
    else:
        check_out(out, (nnz,), x)
    if nnz and dy.shape[0] == 0:
        out.zero_()
    elif nnz:
        _launch(crow, col, dy, x, out, None)
    return out


def triton_bsr_sddmm(crow: torch.Tensor, col: torch.Tensor, blocksize: tuple[int, int],
                     dy: torch.Tensor, x: torch.Tensor, *, out: torch.Tensor | None = None,
                     check_invariants: bool = True) -> torch.Tensor:
    """The weight gradient of ``y = x @ W.T`` at a BSR ``W`` [M, K]'s stored blocks: block p at
    block row r, block column c is ``dy[:, r*br:(r+1)*br].T @ x[:, c*bc:(c+1)*bc]``; returns
    [nblocks, br, bc] in W's storage order (the shape of ``W.values()``).

    ``crow`` [M / br + 1] and ``col`` [nblocks] are W's block indices (int32 or int64);
    ``blocksize`` = (br, bc), powers of two from 16 to 128. ``dy`` [N, M], ``x`` [N, K],
    dtypes, ``out`` and ``check_invariants`` as in :func:`triton_csr_sddmm`.

    Example::

        >>> import torch
        >>> from sparse_lth.kernels import triton_bsr_sddmm
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = torch.randn(64, 32, device=dev).to_sparse_bsr((32, 16))
        >>> dy, x = torch.randn(7, 64, device=dev), torch.randn(7, 32, device=dev)
        >>> g = triton_bsr_sddmm(W.crow_indices(), W.col_indices(), (32, 16), dy, x)
        >>> g.shape, torch.allclose(g[1], dy[:, :32].T @ x[:, 16:], atol=1e-4)
        (torch.Size([4, 32, 16]), True)
    """
    if (not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2
            or not all(isinstance(v, int) for v in blocksize)):
        raise ValueError(f"blocksize must be a pair of ints (br, bc), got {blocksize!r}")
    br, bc = blocksize
    for side, v in (("rows", br), ("columns", bc)):
        if v < 16 or v > 128 or v & (v - 1):
            raise ValueError(f"block {side} must be a power of two from 16 to 128, "
                             f"got blocksize {(br, bc)}")
    check_sddmm_operands(crow, col, dy, x, (br, bc), check_invariants)
    nnz = col.numel()
    if out is None:
        out = torch.empty((nnz, br, bc), dtype=x.dtype, device=x.device)
    else:
        check_out(out, (nnz, br, bc), x)
    if nnz and dy.shape[0] == 0:
        out.zero_()
    elif nnz:
        _launch(crow, col, dy, x, out, (br, bc))
    return out
