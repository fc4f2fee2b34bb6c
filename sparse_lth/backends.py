"""Which kernel multiplies a sparse weight: chosen by layout, device, dtype and batch, or forced.

Backends:

- ``"triton"``: the Triton kernels (``sparse_lth.kernels.csr`` / ``bsr``); CUDA, or CPU tensors
  under ``TRITON_INTERPRET=1`` (slow, for tests). float32 / float16 / bfloat16.
- ``"scipy"``: scipy.sparse on the CPU, row blocks on a thread pool (``kernels/cpu.py``).
  Every float dtype (float16 / bfloat16 computed in float32).
- ``"torch"``: torch's own sparse product (MKL on the CPU, cuSPARSE on CUDA). On the CPU
  float32 / float64 only: torch refuses float16 / bfloat16 there.
- ``"numba"``: the numba kernel of ``kernels/cpu_spmm.py`` (64 outputs held in registers per
  row of ``W``); CPU, CSR, float32 / float64.
- ``"dense"``: densify and use a dense matmul (a reference, and the fallback elsewhere).
- ``"auto"``: on CUDA Triton (torch when Triton is missing or the dtype is float64; a
  ``SparseLinear`` also takes dense cuBLAS where the measured rule of
  :mod:`sparse_lth.kernels.cuda_rule` says it wins, on a dense copy it keeps); on the CPU
  the measured rule of :func:`sparse_lth.kernels.cpu.auto_cpu_backend` (scipy for a single
  column and for float16 / bfloat16, torch's MKL product for wider batches, numba for CSR
  with more than 40 columns and 8,192 stored values; see ``bench/cpu_crossover.md``); on any
  other device dense.

>>> import torch
>>> [choose_backend("csr", "cpu", torch.float32, batch=n) for n in (1, 16, 64)]
['scipy', 'torch', 'numba']
>>> W = torch.tensor([[0., 2.], [1., 0.]]).to_sparse_csr()
>>> sparse_linear(torch.ones(3, 2), W, bias=torch.tensor([10., 20.]), backend="scipy")
tensor([[12., 21.],
        [12., 21.],
        [12., 21.]])
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F

from sparse_lth import kernels
from sparse_lth.kernels import _triton
from sparse_lth.kernels.cpu import auto_cpu_backend, cpu_bsr_matmul, cpu_csr_matmul
from sparse_lth.formats import _make
from sparse_lth.kernels.invariants import check_index_invariants

__all__ = ["BACKENDS", "Backend", "choose_backend", "sparse_matmul", "sparse_linear"]

Backend = Literal["auto", "triton", "scipy", "torch", "numba", "dense"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "scipy", "torch", "numba", "dense")
LayoutLike = Union[str, torch.layout]

_LAYOUTS = {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_CPU_DTYPES = (torch.float32, torch.float64)
_NUMBA_DTYPES = (torch.float32, torch.float64)


def _layout(layout: LayoutLike) -> torch.layout:
    if isinstance(layout, torch.layout) and layout in _LAYOUTS.values():
        return layout
    if isinstance(layout, str) and layout in _LAYOUTS:
        return _LAYOUTS[layout]
    raise ValueError(f"layout must be 'csr', 'bsr', torch.sparse_csr or torch.sparse_bsr, got {layout!r}")


def choose_backend(
    layout: LayoutLike,
    device: torch.device | str,
    dtype: torch.dtype,
    batch: int = 1,
    backend: str = "auto",
    nnz: int | None = None,
    blocksize: tuple[int, int] | None = None,
) -> str:
    """The concrete backend (``"triton"``, ``"scipy"``, ``"torch"``, ``"numba"`` or ``"dense"``) for one product.

    ``batch`` is the number of columns of X (rows of a linear layer's 2-D input); ``nnz`` the
    number of stored values (it decides the CPU's matrix-vector path); ``blocksize`` a BSR
    matrix's block (torch's CPU BSR product, MKL, takes square blocks only). A forced
    backend that cannot run here raises ValueError saying why, rather than silently falling back.

    >>> import torch
    >>> choose_backend("bsr", "cpu", torch.bfloat16, batch=64)
    'scipy'
    >>> choose_backend("csr", "cpu", torch.bfloat16, backend="torch")
    Traceback (most recent call last):
    ...
    ValueError: backend 'torch' on the CPU supports float32 / float64 only (torch's sparse CPU product refuses torch.bfloat16); use 'scipy' or 'auto'
    """
    layout = _layout(layout)
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if kernels.has_triton() and dtype in _TRITON_DTYPES else "torch"
        if device.type == "cpu":
            choice = auto_cpu_backend(layout, dtype, batch, nnz)
            return "scipy" if choice == "torch" and not _mkl_blocks(layout, blocksize) else choice
        return "dense"
    if backend == "scipy" and device.type != "cpu":
        raise ValueError(f"backend 'scipy' runs on the CPU only, got a tensor on {device}")
    if backend == "torch" and device.type == "cpu" and dtype not in _TORCH_CPU_DTYPES:
        raise ValueError(
            f"backend 'torch' on the CPU supports float32 / float64 only (torch's sparse CPU product "
            f"refuses {dtype}); use 'scipy' or 'auto'"
        )
    if backend == "torch" and device.type == "cpu" and not _mkl_blocks(layout, blocksize):
        raise ValueError(f"backend 'torch' on the CPU takes square BSR blocks only (MKL refuses "
                         f"{blocksize[0]}x{blocksize[1]}); use 'scipy' or 'auto'")  # type: ignore[index]
    if backend == "numba":
        if device.type != "cpu" or layout != torch.sparse_csr or dtype not in _NUMBA_DTYPES:
            raise ValueError(f"backend 'numba' multiplies CSR weights in float32 / float64 on the CPU, got "
                             f"{'CSR' if layout == torch.sparse_csr else 'BSR'} {dtype} on {device}; use 'auto'")
    if backend == "triton":
        if not kernels.has_triton():
            raise ValueError("backend 'triton' needs Triton installed (pip install triton, Linux)")
        if device.type != "cuda" and not _triton.is_interpreting():
            raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
        if dtype not in _TRITON_DTYPES:
            raise ValueError(f"backend 'triton' supports float32 / float16 / bfloat16, got {dtype}")
    return backend


def _mkl_blocks(layout: torch.layout, blocksize: tuple[int, int] | None) -> bool:
    """Whether torch's CPU product (MKL) takes this matrix: CSR, or BSR with square blocks."""
    return layout != torch.sparse_bsr or blocksize is None or blocksize[0] == blocksize[1]


def _numba_linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` [N, M] on the numba kernel (imported on first use: numba takes ~0.3 s to load)."""
    from sparse_lth.kernels.cpu_spmm import cpu_csr_linear

    W = _contiguous_parts(W)
    return cpu_csr_linear(x, W.crow_indices(), W.col_indices(), W.values(), W.shape[0])


def _blocksize_of(W: torch.Tensor) -> tuple[int, int] | None:
    return tuple(W.values().shape[1:3]) if W.layout == torch.sparse_bsr else None  # type: ignore[return-value]


def _contiguous_parts(W: torch.Tensor) -> torch.Tensor:
    """W with contiguous index and value tensors: torch's CPU product reads strided int32
    indices as if they were contiguous (a silently wrong result, found by the fuzz suite)."""
    parts = (W.crow_indices(), W.col_indices(), W.values())
    if all(p.is_contiguous() for p in parts):
        return W
    return _make(W.layout, *(p.contiguous() for p in parts), tuple(W.shape))


def _check_operands(W: torch.Tensor, other: torch.Tensor, name: str, check_invariants: bool) -> None:
    if not isinstance(W, torch.Tensor) or W.layout not in _LAYOUTS.values():
        got = W.layout if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a torch sparse CSR or BSR tensor, got {got}")
    if check_invariants:  # once here; the kernel below is told not to repeat it
        check_index_invariants(W, "W")
    if not isinstance(other, torch.Tensor) or other.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) torch tensor")
    if other.device != W.device:
        raise ValueError(f"W and {name} must be on one device, got {W.device} and {other.device}")
    if other.dtype != W.dtype:
        raise ValueError(f"W and {name} must share a dtype, got W {W.dtype} and {name} {other.dtype}")


def sparse_matmul(W: torch.Tensor, X: torch.Tensor, backend: str = "auto", threads: int | None = None, *,
                  check_invariants: bool = True) -> torch.Tensor:
    """``W @ X`` for a sparse CSR / BSR ``W`` [M, K] and a dense ``X`` [K, N] with the chosen backend.

    ``threads`` is passed to the scipy path (None: its default). Returns a dense [M, N] tensor.
    W's indices are checked first (:func:`~sparse_lth.kernels.check_index_invariants`): every
    backend, torch's own included, would read out of bounds on a malformed tensor.
    ``check_invariants=False`` skips that, for a W checked already.

    >>> import torch
    >>> W = torch.tensor([[0., 2.], [1., 0.]]).to_sparse_csr()
    >>> sparse_matmul(W, torch.eye(2), backend="torch")
    tensor([[0., 2.],
            [1., 0.]])
    """
    _check_operands(W, X, "X", check_invariants)
    if X.dim() != 2 or X.shape[0] != W.shape[1]:
        raise ValueError(f"X must have shape [K, N] with K = {W.shape[1]} (W is {tuple(W.shape)}), got {tuple(X.shape)}")
    name = choose_backend(W.layout, W.device, W.dtype, X.shape[1], backend, W.values().numel(), _blocksize_of(W))
    csr = W.layout == torch.sparse_csr
    if name == "scipy":
        return (cpu_csr_matmul if csr else cpu_bsr_matmul)(W, X, threads=threads, check_invariants=False)
    if name == "triton":
        return (kernels.triton_csr_matmul if csr else kernels.triton_bsr_matmul)(W, X, check_invariants=False)
    if name == "torch":
        return _contiguous_parts(W) @ X
    if name == "numba":
        return _numba_linear(X.t(), W).t().contiguous()
    return W.to_dense() @ X


def sparse_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    threads: int | None = None,
    *,
    check_invariants: bool = True,
) -> torch.Tensor:
    """A linear layer with a sparse weight: ``x @ W.T + bias`` for ``x`` [..., K], ``W`` [M, K].

    The weight is used as stored (no transpose of W per call): the CPU paths compute
    ``W @ x.T`` and hand back its transpose; Triton reads ``x`` row-major directly. Returns a
    contiguous [..., M] tensor of x's dtype. W's indices are checked first unless
    ``check_invariants=False`` (see :func:`sparse_matmul`).

    >>> import torch
    >>> W = torch.tensor([[0., 2.], [1., 0.]]).to_sparse_csr()
    >>> sparse_linear(torch.tensor([[1., 3.]]), W, backend="dense")
    tensor([[6., 1.]])
    """
    _check_operands(W, x, "x", check_invariants)
    M, K = W.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., {K}] (W is {tuple(W.shape)}), got {tuple(x.shape)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a torch tensor of shape [{M}] or None, got {type(bias).__name__}")
    if bias is not None and (bias.shape != (M,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(
            f"bias must be a [{M}] tensor of {x.dtype} on {x.device}, got {tuple(bias.shape)} "
            f"{bias.dtype} on {bias.device}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), K)  # not -1: K may be 0
    N = x2.shape[0]
    name = choose_backend(W.layout, W.device, W.dtype, N, backend, W.values().numel(), _blocksize_of(W))
    csr = W.layout == torch.sparse_csr
    if name == "dense":
        y = F.linear(x2, W.to_dense(), bias)
    elif name in ("triton", "numba"):
        if name == "numba":
            y = _numba_linear(x2, W)
        else:
            y = (kernels.triton_csr_linear if csr else kernels.triton_bsr_linear)(W, x2.contiguous(),
                                                                                  check_invariants=False)
        if bias is not None:
            y += bias
    else:
        # [K, N] view of x; scipy copies it to row-major (cheap next to the product), MKL reads
        # it in place. The [M, N] result goes back to [N, M] in the same pass as the bias add.
        if name == "scipy":
            yt = (cpu_csr_matmul if csr else cpu_bsr_matmul)(W, x2.t(), threads=threads, check_invariants=False)
        else:
            yt = _contiguous_parts(W) @ x2.t()
        if N == 1:  # [M, 1] and [1, M] share one memory order: no copy, and yt is ours to add to
            y = yt.reshape(1, M)
            if bias is not None:
                y.add_(bias)
        else:
            y = torch.empty((N, M), dtype=x.dtype, device=x.device)
            if bias is not None:
                torch.add(yt.t(), bias, out=y)
            else:
                y.copy_(yt.t())
    return y.reshape(*lead, M)
