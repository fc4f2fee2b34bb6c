"""Where Triton is and how it runs (the one lazy check), plus the launchers' shared checks.

Nothing here imports triton at module import time, so ``import sparse_lth.kernels`` works on a
machine without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

from .invariants import check_index_invariants

# Triton's own parsing of boolean env vars (triton.knobs.env_bool): checked here without
# importing triton, so callers can ask before deciding whether to import it.
_TRUE = ("1", "true", "yes", "on", "y")


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when ``import triton`` works (the package is installed and loads)."""
    try:
        import triton  # noqa: F401
    except Exception:  # absent, or a broken install (missing libs, wrong ABI): both count
        return False
    return True


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``).

    Read at call time; note that ``@triton.jit`` itself reads it once, when a kernel module is
    first imported, so set it before that import.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def require_triton() -> None:
    """Raise a clear error when a Triton kernel is asked for and Triton is missing."""
    if not has_triton():
        raise RuntimeError(
            "this kernel needs Triton (pip install triton, Linux); "
            "the scipy CPU kernels in sparse_lth.kernels work without it"
        )


# --- Launcher checks shared by the Triton kernels (csr.py, bsr.py) ------------------------------
# They need only torch, so they live here rather than in a kernel file, which stays
# kernel -> configs -> launcher.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): the bucket autotune keys use."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_sparse(W: torch.Tensor, layout: torch.layout, check_invariants: bool = True, name: str = "W") -> None:
    """Raise ValueError unless W is a 2-D sparse matrix of ``layout`` a Triton kernel can read;
    with ``check_invariants`` its indices too (a bad one would read out of bounds on the GPU)."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"{name} must be a torch sparse tensor, got {type(W).__name__}")
    if W.layout != layout:
        raise ValueError(f"{name} must have layout {layout}, got {W.layout}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix (no batch or dense dims), got shape "
                         f"{tuple(W.shape)}")
    if W.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype must be one of float32, float16, bfloat16, got {W.dtype}")
    crow, col = W.crow_indices(), W.col_indices()
    if crow.dtype not in INDEX_DTYPES or col.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}'s index tensors must be int32 or int64, got crow_indices "
                         f"{crow.dtype} and col_indices {col.dtype}")
    for part, t in (("crow_indices", crow), ("col_indices", col), ("values", W.values())):
        if not t.is_contiguous():
            raise ValueError(f"{name}.{part}() must be contiguous")
    if check_invariants:
        check_index_invariants(W, name)


def check_device(W: torch.Tensor, dense: torch.Tensor, dense_name: str) -> None:
    """Both operands on one device, and that device must be CUDA unless the interpreter runs."""
    if dense.device != W.device:
        raise ValueError(f"W and {dense_name} must be on one device, got W on {W.device} and "
                         f"{dense_name} on {dense.device}")
    if W.device.type != "cuda" and not is_interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors), got {W.device}")


def check_dense(t: torch.Tensor, W: torch.Tensor, name: str) -> None:
    """A dense strided 2-D float operand whose dtype matches W."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) torch tensor")
    if t.dtype != W.dtype:
        raise ValueError(f"{name}.dtype ({t.dtype}) must equal W.dtype ({W.dtype})")
    check_device(W, t, name)


def check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """A caller-supplied output: right shape, dtype, device, row-major contiguous."""
    if not isinstance(out, torch.Tensor) or out.layout != torch.strided:
        raise ValueError("out must be a dense (strided) torch tensor")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {like.dtype} on {like.device}, got {out.dtype} on "
                         f"{out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def x_layout(X: torch.Tensor, name: str = "X") -> tuple[bool, int]:
    """(transposed, leading stride) of a [K, N] operand: row-major, or the transpose of a
    row-major [N, K] tensor (``x.t()``, what a linear layer holds). Anything else is refused
    rather than copied, so a slow path never hides behind a fast one."""
    K, N = X.shape
    # Strides are passed as the logical ones (N or K): is_contiguous ignores size-1 dims, whose
    # strides may be anything.
    if X.is_contiguous():
        return False, max(N, 1)
    if X.t().is_contiguous():
        return True, max(K, 1)
    raise ValueError(f"{name} must be contiguous [K, N] or the transpose of a contiguous "
                     f"[N, K] tensor, got shape {tuple(X.shape)} with strides {X.stride()}")


def matmul_problem(W: torch.Tensor, X: torch.Tensor, out: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict]:
    """Check ``X`` [K, N] against the (already checked) ``W`` [M, K]; return the output [M, N]
    (allocated, or the caller's ``out`` checked) and the launch's layout arguments."""
    check_dense(X, W, "X")
    M, K = W.shape
    if X.dim() != 2 or X.shape[0] != K:
        raise ValueError(f"X must have shape [K, N] with K = {K} (W is {M} x {K}), "
                         f"got {tuple(X.shape)}")
    N = X.shape[1]
    x_t, stride_x = x_layout(X)
    if out is None:
        out = torch.empty((M, N), dtype=X.dtype, device=X.device)
    else:
        check_out(out, (M, N), X)
    return out, dict(N=N, x_t=x_t, stride_x=stride_x, y_t=False, stride_y=N)


def linear_problem(W: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict]:
    """Check a linear layer's input ``x`` [..., K] against ``W`` [M, K]; return the output
    [..., M] and the launch's layout arguments: x read as X^T, Y written as Y^T, no copies."""
    check_dense(x, W, "x")
    M, K = W.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K] with K = {K} (W is {M} x {K}), "
                         f"got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (a linear layer's input [..., K], row-major)")
    N = int(torch.Size(x.shape[:-1]).numel())
    shape = (*x.shape[:-1], M)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out(out, shape, x)
    return out, dict(N=N, x_t=True, stride_x=max(K, 1), y_t=True, stride_y=M)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU current: Triton launches on the current device, not the tensors'. Entering
    torch.cuda.device costs a few microseconds, so only when it is not current already."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def rounded_as_on_gpu(out: torch.Tensor, launch: Callable[[torch.Tensor], None]) -> bool:
    """Under the interpreter, write a bf16 ``out`` through an fp32 copy: ``launch(wide)`` fills
    it and torch rounds it into ``out``. The interpreter's fp32 -> bf16 cast truncates and the
    GPU's rounds to nearest even, so interpreter runs then test the GPU's numerics. Returns
    whether it did (the launcher is done); False for every other dtype and on a GPU."""
    if not (is_interpreting() and out.dtype == torch.bfloat16):
        return False
    wide = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    launch(wide)
    out.copy_(wide)
    return True


def _untimed(kernel_call, quantiles=None, **kw) -> list[float]:
    """A benchmarker for the interpreter: every config costs the same and none is run here
    (the autotuner runs the one it picks right after)."""
    return [0.0] * (len(quantiles) if quantiles else 1)


def untimed_under_interpreter(tuned):
    """Let a ``triton.autotune``-d kernel run under the interpreter on triton 3.6 too; returns it.

    The kernels' prune hooks keep one config under the interpreter (it cannot time). Triton
    3.9's autotuner then launches it untimed; 3.6's still "benchmarks" it, and its default
    benchmarker asks for the GPU driver ("0 active drivers"). Autotuner.do_bench is a
    cached_property, so an instance attribute replaces it. A no-op on a GPU.
    """
    if is_interpreting():
        tuned.do_bench = _untimed
    return tuned


class TunedLaunch:
    """Launch a ``triton.autotune``-d kernel, skipping the autotuner once it has chosen.

    Triton's autotuner rebuilds its key and re-binds every argument on each call, its choice
    cached or not: about 50 us per call on triton 3.6 (bench/RESULTS.md, launch costs), several
    times a decode-sized kernel. The caller names the key (all that the autotuner's key holds:
    sizes, buckets, flags, dtypes, device); the first call for a key goes through the autotuner,
    later ones hand its chosen config straight to the jit function.
    """

    def __init__(self, tuned) -> None:
        self.tuned = tuned
        self.chosen: dict[tuple, dict] = {}
        untimed_under_interpreter(tuned)  # triton 3.6 under TRITON_INTERPRET=1

    def __call__(self, key: tuple, grid, args: tuple, constants: dict) -> None:
        config = self.chosen.get(key)
        if config is not None:
            self.tuned.fn[grid](*args, **constants, **config)
            return
        self.tuned[grid](*args, **constants)
        best = getattr(self.tuned, "best_config", None)  # set by every autotuned run
        if best is not None and best.pre_hook is None:
            self.chosen[key] = best.all_kwargs()


# --- Pipelined tile kernels (bsr.py, bsr_tma.py): shared memory and the configs worth timing ---

#: An H100's per-program shared memory, the stand-in under the interpreter (no device to ask).
HOPPER_SHARED_BYTES = 232448


def pipeline_buffers(num_stages: int) -> int:
    """Shared-memory copies of a BSR kernel's block and X tiles that ``num_stages`` compiles to:
    the block's column index is a load the X copy depends on, so Triton's pipeliner spends a
    stage on it, and wgmma holds one buffer more: 2 / 3 / 5 / 7 stages give 2 / 2 / 3 / 4
    (mma.sync and FMA kernels one fewer), read off the compiled kernels."""
    return max(2, (num_stages + 1) // 2)


def tile_shared_bytes(config, br: int, bc: int, elem_bytes: int) -> int:
    """Shared memory a BSR kernel config takes at most: its buffers of a [br, bc] block and a
    [bc, BLOCK_N] X tile with an 8-byte barrier each, and a few spare bytes; within those bytes
    of the compiled figure for wgmma kernels (tests/test_kernel_compile.py checks both ways)."""
    stage = (br * bc + bc * config.kwargs["BLOCK_N"]) * elem_bytes + 8
    return pipeline_buffers(config.num_stages) * stage + 64


def prune_tiles(configs: list, n: int, br: int, bc: int, elem_bytes: int, smem_limit: int, *,
                narrowest: int, widest: int) -> list:
    """The configs worth timing for N columns and [br, bc] blocks: BLOCK_N at most
    next_pow2(N) (``narrowest`` at least) and at least a quarter of it (or of ``widest``), and
    shared memory under the limit. Never empty: the smallest config stays."""
    n = max(narrowest, next_pow2(n))
    fit = [c for c in configs
           if c.kwargs["BLOCK_N"] <= n and 4 * c.kwargs["BLOCK_N"] >= min(n, widest)]
    kept = [c for c in fit if tile_shared_bytes(c, br, bc, elem_bytes) <= smem_limit]
    if not kept:  # very large blocks in fp32: shallowest pipeline, narrowest tile
        kept = [min(configs, key=lambda c: tile_shared_bytes(c, br, bc, elem_bytes))]
    return kept


def shared_limit_of(t: torch.Tensor) -> int:
    """Per-program shared memory on t's device (an H100's under the interpreter)."""
    return HOPPER_SHARED_BYTES if t.device.type != "cuda" else shared_memory_limit(t.device.index or 0)


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use on a CUDA device (the opt-in limit)."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    from triton.runtime import driver  # only reached with a GPU, where triton is present

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


# --- SDDMM operands (sddmm.py): bare index tensors and two dense [N, *] operands -----------------

def check_sddmm_operands(crow: torch.Tensor, col: torch.Tensor, dy: torch.Tensor,
                         x: torch.Tensor, block: tuple[int, int], check_invariants: bool
                         ) -> tuple[int, int, int]:
    """Check a sampled product's operands: index tensors ``crow`` [rows + 1] / ``col`` [nnz] of
    a W [M, K] stored in ``block`` = (br, bc) blocks ((1, 1) for CSR), ``dy`` [N, M] and ``x``
    [N, K] dense, contiguous and alike; with ``check_invariants`` the index values too
    (kernels/invariants.py: crow from 0, never decreasing, ending at nnz; columns in range).
    Returns (N, M, K)."""
    for name, t in (("crow", crow), ("col", col)):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) torch tensor")
        if t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name}.dtype must be int32 or int64, got {t.dtype}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")
    if crow.numel() < 1:
        raise ValueError("crow must hold rows + 1 >= 1 entries, got an empty tensor")
    for name, t in (("dy", dy), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) torch tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype must be one of float32, float16, bfloat16, got "
                             f"{t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, *], got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    if dy.dtype != x.dtype:
        raise ValueError(f"dy.dtype ({dy.dtype}) must equal x.dtype ({x.dtype})")
    for name, t in (("x", x), ("crow", crow), ("col", col)):
        if t.device != dy.device:
            raise ValueError(f"dy and {name} must be on one device, got dy on {dy.device} and "
                             f"{name} on {t.device}")
    if dy.device.type != "cuda" and not (dy.device.type == "cpu" and is_interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors), got {dy.device}")
    br, bc = block
    N, M = dy.shape
    K = x.shape[1]
    if x.shape[0] != N:
        raise ValueError(f"dy [N, M] and x [N, K] must have one N, got shapes "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    rows = crow.numel() - 1
    unit = "block " if (br, bc) != (1, 1) else ""
    if M != rows * br:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected [N, {rows * br}] "
                         f"(crow holds {rows} {unit}rows + 1)")
    if K % bc:
        raise ValueError(f"x has shape {tuple(x.shape)}: K = {K} is not a whole number of "
                         f"{bc}-column blocks")
    if check_invariants:
        from .invariants import _explain, _holds

        nnz, cols = col.numel(), K // bc
        if not _holds(crow, col, nnz, cols):
            _explain(crow, col, nnz, cols, "W", unit)
    return N, M, K
