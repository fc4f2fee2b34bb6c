"""BSR x dense at large N on Hopper: tensor-memory-accelerator loads and a persistent grid.

The same product as ``bsr.py`` (``Y = W @ X`` or the linear layer's ``y = x @ W.T``), built for
sm_90 and N > 16:

- **TMA loads.** The stored blocks (values viewed as [nnzb * BR, BC]) and X are read through
  tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``): each [BR, BC] block
  and [BC, BLOCK_N] slice of X is one bulk copy (``cp.async.bulk.tensor`` completing on an
  mbarrier) instead of per-thread ``cp.async``; the copy engine zero-fills X's N tail, so the
  K loop has no masks. The linear layout reads x [N, K] as [BLOCK_N, BC] boxes and transposes
  them in shared memory for ``wgmma``.
- **A persistent grid.** ``WAVES`` programs per SM (0: one program per tile) walk the tiles
  (block row, BLOCK_N columns) with a stride of the grid, in block-row order. Tiles once came
  longest block rows first, from an argsort per call: on the H200 (2026-11-27) that sort's
  few small launches cost ~12 us a call, more than the balance it bought at every measured
  point (bench/RESULTS.md, "fifth call").
- **The pipeline.** The block's column index is a load the X copy depends on, so Triton's
  pipeliner spends one stage on it: ``num_stages`` 3 / 5 / 7 give 2 / 3 / 4 shared buffers with
  wgmma (4 and 6 compile to the code of 3 and 5; measured from the compiled kernels,
  tests/test_kernel_compile.py). ``tma_shared_bytes`` is that count times a stage's bytes.

Needs 16-byte aligned operands whose row strides are multiples of 16 bytes (TMA's rule):
``tma_fits`` says whether a problem qualifies; ``bsr.py`` falls back to its ``cp.async`` kernel
otherwise (and on sm_80).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import (
    is_interpreting,
    next_pow2,
    on_device,
    pipeline_buffers,
    prune_tiles,
    rounded_as_on_gpu,
    shared_limit_of,
    tile_shared_bytes,
    untimed_under_interpreter,
)

__all__ = ["tma_fits", "launch_bsr_tma", "TMA_CONFIGS", "tma_shared_bytes"]


@triton.jit
def _bsr_tma_kernel(
    crow_ptr, col_ptr, a_desc, x_desc, y_ptr,
    M, N, K,
    stride_y,  # Y[m, n] is at m * stride_y + n, or at n * stride_y + m when Y_T
    N_BUCKET,  # autotune key only
    BR: tl.constexpr, BC: tl.constexpr,
    X_T: tl.constexpr, Y_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in fp32: the CPU interpreter's bf16 tl.dot is wrong
    BLOCK_N: tl.constexpr,
    WAVES: tl.constexpr,  # read by the launcher's grid only
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles = (M // BR) * n_tiles
    offs_r = tl.arange(0, BR)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        brow = tile // n_tiles
        n0 = (tile % n_tiles) * BLOCK_N
        start = tl.load(crow_ptr + brow).to(tl.int32)
        end = tl.load(crow_ptr + brow + 1).to(tl.int32)
        acc = tl.zeros((BR, BLOCK_N), dtype=tl.float32)
        for p in range(start, end):
            bcol = tl.load(col_ptr + p).to(tl.int32)
            a = a_desc.load([p * BR, 0])
            if X_T:
                b = x_desc.load([n0, bcol * BC]).T
            else:
                b = x_desc.load([bcol * BC, n0])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rows = brow.to(tl.int64) * BR + offs_r
        if Y_T:
            y_ptrs = y_ptr + offs_n[None, :] * stride_y + rows[:, None]
        else:
            y_ptrs = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=offs_n[None, :] < N)


def _set_box(nargs: dict) -> None:
    """A config's pre-hook: X's descriptor copies [BC, BLOCK_N] boxes (or [BLOCK_N, BC] for the
    linear layout); the box is part of the descriptor, so it follows the config being run."""
    bc, block_n = nargs["BC"], nargs["BLOCK_N"]
    nargs["x_desc"].block_shape = [block_n, bc] if nargs["X_T"] else [bc, block_n]


def _cfg(block_n: int, warps: int, stages: int, waves: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "WAVES": waves}, num_warps=warps,
                         num_stages=stages, pre_hook=_set_box)


# Odd stage counts only (each even one compiles to the odd one below it). 8 warps for the wide
# accumulators: 128 x 256 fp32 is 128 KB of registers. Each tile shape comes one program per
# tile (WAVES 0) and persistent (1 per SM); 2 per SM for the narrow tiles, whose programs are
# small enough to share an SM.
TMA_CONFIGS: list[triton.Config] = [
    _cfg(64, 4, 3, 0), _cfg(64, 4, 5, 0), _cfg(64, 4, 5, 2),
    _cfg(128, 8, 3, 0), _cfg(128, 8, 5, 0), _cfg(128, 8, 5, 1), _cfg(128, 8, 7, 1),
    _cfg(256, 8, 3, 0), _cfg(256, 8, 5, 0), _cfg(256, 8, 5, 1),
]


# Shared memory and pruning as the cp.async kernel's (kernels/_triton.py): the same buffers
# per stage; BLOCK_N from 64 (narrower tiles leave wgmma idle).
tma_buffers = pipeline_buffers
tma_shared_bytes = tile_shared_bytes
prune_tma_configs = functools.partial(prune_tiles, narrowest=64, widest=256)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    y = named_args["y_ptr"]
    elem = 4 if kwargs.get("UPCAST") else y.element_size()
    kept = prune_tma_configs(configs, named_args["N_BUCKET"], kwargs["BR"], kwargs["BC"], elem,
                             shared_limit_of(y))
    return kept[:1] if is_interpreting() else kept


bsr_tma_kernel = untimed_under_interpreter(triton.autotune(
    configs=TMA_CONFIGS,
    key=["M", "K", "N_BUCKET", "BR", "BC", "X_T", "Y_T", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_bsr_tma_kernel))
# key -> the autotuner's choice, so later calls skip it (as TunedLaunch does; here the launch
# also sets the descriptor's box, which a pre-hook does inside the autotuner).
_chosen: dict[tuple, dict] = {}


def _aligned(t: torch.Tensor) -> bool:
    """TMA's rule for a 2-D row-major operand: base 16-byte aligned, row stride a multiple of 16
    bytes, unit inner stride."""
    rows_stride = t.stride(0) * t.element_size()
    return t.data_ptr() % 16 == 0 and rows_stride % 16 == 0 and t.stride(1) == 1


def _x_rows(X: torch.Tensor, K: int, x_t: bool) -> torch.Tensor:
    """The row-major matrix X lies in: [K, N], or for ``x_t`` [N, K] (a linear layer's input
    [..., K], or the transpose of a [K, N] view)."""
    if not x_t:
        return X
    return X.reshape(-1, K) if X.is_contiguous() and X.shape[-1] == K else X.t()


def tma_fits(W: torch.Tensor, X: torch.Tensor, x_t: bool) -> bool:
    """True when this kernel can run ``W @ X`` (X given as [K, N], or as the transpose of a
    row-major [N, K] when ``x_t``): a Hopper GPU (or the interpreter), aligned operands, block
    coordinates within TMA's 32-bit range."""
    if X.device.type == "cuda":
        if torch.cuda.get_device_capability(X.device)[0] < 9:
            return False
    elif not is_interpreting():
        return False
    val = W.values()
    nnzb, br, bc = val.shape
    if nnzb == 0 or nnzb * br >= 2 ** 31 or max(X.shape) >= 2 ** 31:
        return False
    return _aligned(val.view(nnzb * br, bc)) and _aligned(_x_rows(X, W.shape[1], x_t))


def launch_bsr_tma(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, *, N: int, x_t: bool,
                   y_t: bool, stride_y: int, kernel=None, **meta) -> None:
    """Run ``Y = W @ X`` over an already checked problem that :func:`tma_fits` (bsr.py's
    launcher calls this): autotuned, or with ``kernel=_bsr_tma_kernel`` and explicit BLOCK_N /
    WAVES one config (tests use it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if rounded_as_on_gpu(Y, lambda wide: launch_bsr_tma(W, X, wide, N=N, x_t=x_t, y_t=y_t,
                                                        stride_y=stride_y, kernel=kernel, **meta)):
        return
    M, K = W.shape
    crow, col, val = W.crow_indices(), W.col_indices(), W.values()
    nnzb, br, bc = val.shape
    if nnzb == 0:  # a descriptor needs a non-empty tensor; W @ X is zero
        Y.zero_()
        return
    fp32 = X.dtype == torch.float32
    precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    upcast = is_interpreting() and X.dtype == torch.bfloat16
    x2d = _x_rows(X, K, x_t)

    def grid(m: dict) -> tuple[int]:
        tiles = (M // br) * triton.cdiv(N, m["BLOCK_N"])
        if not m["WAVES"]:
            return (max(1, tiles),)
        # Under the interpreter, a 2-"SM" grid, so tests walk the persistent loop.
        sms = (torch.cuda.get_device_properties(X.device).multi_processor_count
               if X.device.type == "cuda" else 2)
        return (max(1, min(tiles, m["WAVES"] * sms)),)

    a_desc = TensorDescriptor.from_tensor(val.view(nnzb * br, bc), [br, bc])
    x_desc = TensorDescriptor.from_tensor(x2d, [bc, bc])  # box set per config (_set_box)
    constants = dict(BR=br, BC=bc, X_T=x_t, Y_T=y_t, DOT_PRECISION=precision, UPCAST=upcast)
    args = (crow, col, a_desc, x_desc, Y, M, N, K, stride_y, next_pow2(N))
    with on_device(X):
        if kernel is None:
            key = (M, K, args[-1], br, bc, x_t, y_t, precision, upcast, crow.dtype, col.dtype,
                   val.dtype, X.dtype, Y.dtype, X.device)
            meta = _chosen.get(key)
            if meta is None:  # the autotuner runs _set_box itself
                bsr_tma_kernel[grid](*args, **constants)
                best = bsr_tma_kernel.best_config
                _chosen[key] = {**best.kwargs, "num_warps": best.num_warps,
                                "num_stages": best.num_stages}
                return
            kernel = bsr_tma_kernel.fn
        _set_box({"x_desc": x_desc, "BC": bc, "BLOCK_N": meta["BLOCK_N"], "X_T": x_t})
        kernel[grid](*args, **constants, **meta)
