"""Sparse x dense kernels, imported as ``sparse_lth.kernels``.

Kernels take index and value tensors (torch sparse CSR / BSR tensors), never a model or a Mask.
Every public kernel checks the sparse tensor's indices before following them
(:func:`check_index_invariants`); ``check_invariants=False`` skips that for a tensor checked
already (``SparseLinear`` checks once, when it is built).
"""

__all__: list[str] = []

from .invariants import check_index_invariants  # noqa: E402

__all__ += ["check_index_invariants"]

# --- Triton kernels (GPU, or CPU under TRITON_INTERPRET=1) ---------------------------------------
# Thin wrappers: triton is imported on the first call, so this package imports without it.
# Full docs and examples live on the functions in kernels/csr.py, bsr.py and sddmm.py.
from ._triton import has_triton, require_triton  # noqa: E402


def triton_csr_matmul(W, X, *, out=None, check_invariants=True):
    """``W @ X`` for a sparse CSR ``W`` [M, K] and dense ``X`` [K, N] (see ``csr.py``)."""
    require_triton()
    from .csr import triton_csr_matmul as impl

    return impl(W, X, out=out, check_invariants=check_invariants)


def triton_csr_linear(W, x, *, out=None, check_invariants=True):
    """``x @ W.T`` for a sparse CSR weight ``W`` [M, K] and ``x`` [..., K] (see ``csr.py``)."""
    require_triton()
    from .csr import triton_csr_linear as impl

    return impl(W, x, out=out, check_invariants=check_invariants)


def pad_csr(W, multiple=8, *, index_dtype=None, check_invariants=True):
    """A CSR weight with every row padded to ``multiple`` entries (a ``csr.PaddedCSR``), which the
    Triton CSR kernels stream with 16-byte loads; build once per weight (see ``csr.py``)."""
    require_triton()
    from .csr import pad_csr as impl

    return impl(W, multiple, index_dtype=index_dtype, check_invariants=check_invariants)


def triton_bsr_matmul(W, X, *, out=None, check_invariants=True, path="auto"):
    """``W @ X`` for a sparse BSR ``W`` [M, K] and dense ``X`` [K, N]; ``path`` picks the kernel
    (see ``bsr.py``)."""
    require_triton()
    from .bsr import triton_bsr_matmul as impl

    return impl(W, X, out=out, check_invariants=check_invariants, path=path)


def triton_bsr_linear(W, x, *, out=None, check_invariants=True, path="auto"):
    """``x @ W.T`` for a sparse BSR weight ``W`` [M, K] and ``x`` [..., K] (see ``bsr.py``)."""
    require_triton()
    from .bsr import triton_bsr_linear as impl

    return impl(W, x, out=out, check_invariants=check_invariants, path=path)


def triton_csr_sddmm(crow, col, dy, x, *, out=None, check_invariants=True):
    """``dy.T @ x`` sampled at a CSR pattern: a sparse linear layer's weight gradient, [nnz]
    (see ``sddmm.py``)."""
    require_triton()
    from .sddmm import triton_csr_sddmm as impl

    return impl(crow, col, dy, x, out=out, check_invariants=check_invariants)


def triton_bsr_sddmm(crow, col, blocksize, dy, x, *, out=None, check_invariants=True):
    """``dy.T @ x`` sampled at a BSR pattern's blocks: a sparse linear layer's weight gradient,
    [nblocks, br, bc] (see ``sddmm.py``)."""
    require_triton()
    from .sddmm import triton_bsr_sddmm as impl

    return impl(crow, col, blocksize, dy, x, out=out, check_invariants=check_invariants)


def triton_bsr_conv2d(x, crow, col, values, bias=None, **geometry):
    """``F.conv2d`` with a block-sparse weight laid out by tap and input channel (see ``conv.py``)."""
    require_triton()
    from .conv import triton_bsr_conv2d as impl

    return impl(x, crow, col, values, bias, **geometry)


def prepare_bsr_conv2d(x, crow, col, values, bias=None, **geometry):
    """``triton_bsr_conv2d``'s checks done once for inputs like ``x``: a callable conv (see ``conv.py``)."""
    require_triton()
    from .conv import prepare_bsr_conv2d as impl

    return impl(x, crow, col, values, bias, **geometry)


def conv_weight_to_bsr(weight, mask, blocksize):
    """A conv weight [O, C, KH, KW] as the BSR that ``triton_bsr_conv2d`` reads (see ``conv.py``)."""
    require_triton()
    from .conv import conv_weight_to_bsr as impl

    return impl(weight, mask, blocksize)


__all__ += ["has_triton", "triton_csr_matmul", "triton_csr_linear", "pad_csr", "triton_bsr_matmul",
            "triton_bsr_linear", "triton_csr_sddmm", "triton_bsr_sddmm", "triton_bsr_conv2d", "prepare_bsr_conv2d",
            "conv_weight_to_bsr"]

# --- CPU kernels (scipy.sparse, row blocks on a thread pool) -----------------------------------
from .cpu import auto_cpu_backend, cpu_bsr_matmul, cpu_csr_matmul  # noqa: E402

__all__ += ["cpu_csr_matmul", "cpu_bsr_matmul", "auto_cpu_backend"]
