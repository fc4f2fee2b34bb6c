"""The products of a trainable sparse linear layer, as torch custom ops with an autograd formula.

A layer ``y = x @ W.T`` with ``W`` [M, K] stored sparse (CSR, or BSR blocks) over a fixed
pattern costs three products per training step, each in proportion to the stored values:

- forward: ``y = x @ W.T`` (the inference product, :func:`sparse_lth.backends.sparse_linear`);
- input gradient: ``dx = dy @ W``, the same product over the *transposed* pattern, built once
  (:func:`transpose_pattern`) with the permutation that reorders the values into it, so a step
  gathers the values and never transposes a matrix;
- weight gradient: only at the stored positions, SDDMM ``dW[p] = sum_n dy[n, row(p)] * x[n, col(p)]``
  (:func:`sddmm`): torch's ``sampled_addmm`` (CSR) or batched block products (BSR) on the CPU;
  on CUDA the Triton BSR SDDMM, and for CSR the dense cuBLAS product sampled at the pattern
  (the Triton CSR SDDMM where that product would not fit in 1 GiB).

On the CPU, CSR in fp32 / fp64 with a batch of more than ``NUMBA_MIN_ROWS`` rows runs all three
on the numba kernels of :mod:`sparse_lth.kernels.cpu_spmm` (the two gradients in one sweep over a
row-blocked transposed pattern built once, so a step never gathers the values into the
transposed order); smaller batches keep torch's MKL products, which win there, and so does the
forward of a weight with fewer than ``NUMBA_MIN_STORED`` (8,192) stored values under ``backend
"auto"``, as in eager inference.

``sparse_lth::linear`` is the forward op; its registered backward calls ``sparse_lth::linear_backward``
(both gradients: on the numba path in one sweep, else the two ops below), or where only one
gradient is needed ``sparse_lth::linear_t`` (the product over the transposed pattern) or
``sparse_lth::sddmm``, so ``torch.compile`` sees custom ops all the way. Each op's body is a
plain function (``_linear_impl`` and so on), which the layer's eager path (:func:`linear_bias`)
calls without the ops' dispatch. Double backward is not supported.

>>> import torch
>>> dense = torch.tensor([[0., 2., 0.], [1., 0., 3.]])
>>> W = dense.to_sparse_csr()
>>> crow, col = W.crow_indices(), W.col_indices()
>>> crow_t, col_t, perm = transpose_pattern(crow, col, (2, 3))
>>> values = W.values().clone().requires_grad_()
>>> x = torch.tensor([[1., 1., 1.]], requires_grad=True)
>>> y = linear(x, crow, col, values, 2, crow_t, col_t, perm)
>>> y.detach()
tensor([[2., 4.]])
>>> y.sum().backward()
>>> values.grad, x.grad
(tensor([1., 1., 1.]), tensor([[1., 2., 3.]]))
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparse_lth import kernels
from sparse_lth.kernels import cpu as cpu_rule
from sparse_lth.backends import sparse_linear
from sparse_lth.formats import _make

__all__ = ["linear", "linear_bias", "linear_t", "linear_backward", "sddmm", "conv2d", "transpose_pattern",
           "NUMBA_MIN_ROWS"]

#: On CUDA a CSR weight gradient is sampled from the dense product when that fits in this.
_DENSE_SAMPLE_BYTES = 1 << 30

#: CPU CSR products of more rows than this run on the numba kernels (kernels/cpu_spmm.py), which
#: compute 64 rows at a time; the inference rule's threshold (kernels/cpu.py), where the figures are.
NUMBA_MIN_ROWS = cpu_rule.NUMBA_MIN_ROWS


def _numba_path(values: torch.Tensor, rows: int) -> bool:
    # the cheap tests first: numba is imported only for a product it may run (not on CUDA)
    return (values.device.type == "cpu" and values.dim() == 1 and rows > NUMBA_MIN_ROWS
            and values.dtype in _cpu_spmm().DTYPES)


def _numba_gradient(backend: str, values: torch.Tensor, rows: int, *operands: torch.Tensor) -> bool:
    """Whether a gradient product runs on the numba kernels: no other backend forced, every
    operand in the values' dtype, and :func:`_numba_path`."""
    return (backend in ("auto", "numba") and all(t.dtype == values.dtype for t in operands)
            and _numba_path(values, rows))


def _numba_forward(x: torch.Tensor, values: torch.Tensor, backend: str = "auto") -> bool:
    """Whether ``x @ W.T`` runs on the numba kernel: ``backend`` "numba", or "auto" where the CPU
    rule eager inference follows picks it (numba from 41 rows and 8,192 stored values), for a
    CPU CSR weight of ``x``'s dtype (:func:`_numba_path` keeps CUDA and BSR off it)."""
    chosen = backend == "numba" or (backend == "auto" and cpu_rule.auto_cpu_backend(
        _layout(values), values.dtype, x.shape[0], values.numel()) == "numba")
    return chosen and x.dtype == values.dtype and _numba_path(values, x.shape[0])


def _cpu_spmm():
    from sparse_lth.kernels import cpu_spmm  # numba, imported on first use

    return cpu_spmm


def _layout(values: torch.Tensor) -> torch.layout:
    return torch.sparse_csr if values.dim() == 1 else torch.sparse_bsr


def transpose_pattern(crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pattern of ``W.T`` for a CSR (or, counted in blocks, BSR) pattern of ``shape`` rows x
    columns: ``(crow_t, col_t, perm)`` with ``values_t = values[perm]`` (BSR: each block also
    transposed). Built once per pattern; indices keep ``crow``'s dtype.

    >>> crow, col = torch.tensor([0, 1, 3]), torch.tensor([1, 0, 2])
    >>> transpose_pattern(crow, col, (2, 3))
    (tensor([0, 1, 2, 3]), tensor([1, 0, 1]), tensor([1, 0, 2]))
    """
    rows, cols = shape
    row_of = _block_rows(crow, col.numel())
    # Sort by (column, row): a stable sort on the column keeps each column's rows in order.
    perm = torch.sort(col.long(), stable=True).indices
    crow_t = torch.zeros(cols + 1, dtype=torch.long, device=crow.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col.long(), minlength=cols), 0)
    return crow_t.to(crow.dtype), row_of[perm].to(col.dtype), perm


def _transposed_values(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    v = values[perm]
    return v if v.dim() == 1 else v.transpose(1, 2).contiguous()


def _block_rows(crow: torch.Tensor, stored: int) -> torch.Tensor:
    """The (block) row of each of the ``stored`` values or blocks (no host sync on CUDA)."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), counts,
                                   output_size=stored)


def _linear_impl(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 out_features: int, backend: str = "auto") -> torch.Tensor:
    """The body of :func:`linear` (the forward), which the eager path calls without the op."""
    if _numba_forward(x, values, backend):
        return _cpu_spmm().cpu_csr_linear(x, crow, col, values, out_features)
    W = _make(_layout(values), crow, col, values, (out_features, x.shape[1]))
    return sparse_linear(x, W, backend=backend, check_invariants=False)


@torch.library.custom_op("sparse_lth::linear", mutates_args=())
def linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
           out_features: int, crow_t: Optional[torch.Tensor] = None,
           col_t: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None,
           backend: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for ``x`` [N, K] and ``W`` [out_features, K] given by its pattern and values
    (1-D: CSR; [blocks, br, bc]: BSR). The transposed pattern (:func:`transpose_pattern`) is
    what the backward pass multiplies by; without it only the forward runs. ``backend``: as
    :func:`~sparse_lth.backends.sparse_linear` takes it (the inference layer's, calibrated or
    forced). The indices are not checked here: the layer that owns them checks them once."""
    return _linear_impl(x, crow, col, values, out_features, backend)


@linear.register_fake
def _(x, crow, col, values, out_features, crow_t=None, col_t=None, perm=None, backend="auto"):
    return x.new_empty((x.shape[0], out_features))


def _linear_setup(ctx, inputs, output) -> None:
    x, crow, col, values, out_features, crow_t, col_t, perm, _ = inputs
    ctx.save_for_backward(x, crow, col, values, crow_t, col_t, perm)


def _gradients(dy: torch.Tensor, saved: tuple, need_x: bool, need_values: bool, products: tuple
               ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dvalues), each computed where needed, by ``products``: (both gradients, the product
    over the transposed pattern, the SDDMM), the custom ops or their bodies."""
    x, crow, col, values, crow_t, col_t, perm = saved
    both, transposed, sampled = products
    if need_x and perm is None:
        raise RuntimeError("sparse_lth::linear: the input gradient needs the transposed pattern "
                           "(crow_t, col_t, perm from transpose_pattern)")
    if need_x and need_values:
        return both(dy, x, crow, col, values, crow_t, col_t, perm)
    if need_x:
        return transposed(dy, crow, col, values, crow_t, col_t, perm, x.shape[1]), None
    if need_values:
        return None, sampled(crow, col, values, dy, x)
    return None, None


def _linear_backward(ctx, dy):
    dx, dvalues = _gradients(dy.contiguous(), ctx.saved_tensors, ctx.needs_input_grad[0],
                             ctx.needs_input_grad[3], (linear_backward, linear_t, sddmm))
    return dx, None, None, dvalues, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_bias(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                bias: Optional[torch.Tensor], out_features: int, crow_t: torch.Tensor, col_t: torch.Tensor,
                perm: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``linear(x, ...) + bias`` for a layer that trains (the transposed pattern given), as
    :class:`~sparse_lth.nn.TrainableSparseLinear` calls it. In eager mode an ``autograd.Function``
    (:class:`_EagerLinear`) runs the custom ops' own bodies, the same kernels, without their
    dispatch: each custom op call costs tens of microseconds of Python (on CPU, 4096 x 4096,
    batch 64, fp32, the step 0.92-0.96x at 2% density, 0.95-0.96x at 5%, 0.97-0.98x at 10%; on
    an H200 the ops' dispatch was most of a 1.6 ms step whose kernels took 92 us). Under
    ``torch.compile``, ``torch.export`` and ``torch.jit.trace``, the custom ops. ``backend`` as
    :func:`linear` takes it (the backward's products follow it: "triton" runs all three on the
    Triton kernels).

    >>> dense = torch.tensor([[0., 2., 0.], [1., 0., 3.]])
    >>> W = dense.to_sparse_csr()
    >>> crow, col = W.crow_indices(), W.col_indices()
    >>> linear_bias(torch.ones(1, 3), crow, col, W.values(), torch.tensor([10., 20.]), 2,
    ...             *transpose_pattern(crow, col, (2, 3)))
    tensor([[12., 24.]])
    """
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):  # a tracer must see the ops
        return _EagerLinear.apply(x, values, bias, crow, col, crow_t, col_t, perm, out_features, backend)
    y = linear(x, crow, col, values, out_features, crow_t, col_t, perm, backend)
    return y if bias is None else y + bias


class _EagerLinear(torch.autograd.Function):
    """``x @ W.T + bias`` through the custom ops' bodies (:func:`_linear_impl`, and in the
    backward :func:`_linear_backward_impl`, :func:`_linear_t_impl`, :func:`_sddmm_impl`): the
    gradients the ops give, without their dispatch; the bias added in place."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, crow_t, col_t, perm, out_features, backend):
        ctx.save_for_backward(x, crow, col, values, crow_t, col_t, perm)
        ctx.backend = backend
        y = _linear_impl(x, crow, col, values, out_features, backend)
        return y if bias is None else y.add_(bias)  # y is new: the bias added in place

    @staticmethod
    def backward(ctx, dy):
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        backend = ctx.backend
        products = (partial(_linear_backward_impl, backend=backend), partial(_linear_t_impl, backend=backend),
                    partial(_sddmm_impl, backend=backend))
        dx, dvalues = _gradients(dy.contiguous(), ctx.saved_tensors, need_x, need_values, products)
        return dx, dvalues, dy.sum(0) if need_bias else None, None, None, None, None, None, None, None


def _linear_t_impl(dy: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   crow_t: torch.Tensor, col_t: torch.Tensor, perm: torch.Tensor, in_features: int,
                   backend: str = "auto") -> torch.Tensor:
    """The body of :func:`linear_t`."""
    if _numba_gradient(backend, values, dy.shape[0], dy):
        return _cpu_spmm().cpu_csr_linear_t(dy, crow, col, values, crow_t, in_features)
    return _linear_impl(dy, crow_t, col_t, _transposed_values(values, perm), in_features, backend)


@torch.library.custom_op("sparse_lth::linear_t", mutates_args=())
def linear_t(dy: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             crow_t: torch.Tensor, col_t: torch.Tensor, perm: torch.Tensor, in_features: int) -> torch.Tensor:
    """``dy @ W`` for ``dy`` [N, M] and ``W`` [M, in_features] given by its pattern and values and
    its transposed pattern (:func:`transpose_pattern`): the input gradient of :func:`linear`. The
    numba path reads the values in place through a row-blocked transposed pattern of its own;
    the others gather the values into the transposed order and multiply by ``W.T`` as a
    product of its own."""
    return _linear_t_impl(dy, crow, col, values, crow_t, col_t, perm, in_features)


@linear_t.register_fake
def _(dy, crow, col, values, crow_t, col_t, perm, in_features):
    return dy.new_empty((dy.shape[0], in_features))


def _linear_backward_impl(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                          values: torch.Tensor, crow_t: torch.Tensor, col_t: torch.Tensor, perm: torch.Tensor,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The body of :func:`linear_backward`."""
    if _numba_gradient(backend, values, dy.shape[0], dy, x):
        return _cpu_spmm().cpu_csr_linear_backward(dy, x, crow, col, values, crow_t)
    return (_linear_t_impl(dy, crow, col, values, crow_t, col_t, perm, x.shape[1], backend),
            _sddmm_impl(crow, col, values, dy, x, backend))


@torch.library.custom_op("sparse_lth::linear_backward", mutates_args=())
def linear_backward(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    crow_t: torch.Tensor, col_t: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear_t(dy, ...), sddmm(..., dy, x))``: both gradients of :func:`linear`, the input's and
    the values'. The numba path computes them in one sweep (``cpu_csr_linear_backward``); the
    others call the two products."""
    return _linear_backward_impl(dy, x, crow, col, values, crow_t, col_t, perm)


@linear_backward.register_fake
def _(dy, x, crow, col, values, crow_t, col_t, perm):
    return dy.new_empty((dy.shape[0], x.shape[1])), values.new_empty(values.shape, dtype=x.dtype)


def _sddmm_impl(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dy: torch.Tensor,
                x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The body of :func:`sddmm`; ``backend`` "triton" takes the Triton kernels on the CPU too
    (under the interpreter: tests), as CUDA always does."""
    triton = (x.device.type == "cuda" or backend == "triton") and kernels.has_triton() and x.dtype != torch.float64
    if values.dim() == 3:
        return _bsr_sddmm(crow, col, values, dy, x, triton)
    if x.device.type == "cuda" and dy.shape[1] * x.shape[1] * x.element_size() <= _DENSE_SAMPLE_BYTES:
        # cuBLAS's dense dy.T @ x, then the stored positions: on an H200 (4096^3, bf16)
        # 0.18 ms for the product against 3.8-16.6 ms for the Triton CSR SDDMM at 1-10%,
        # whose gathers read one useful element per 32-byte sector (kernels/sddmm.py).
        return (dy.t() @ x)[_block_rows(crow, col.numel()), col.long()]
    if triton:
        return kernels.triton_csr_sddmm(crow, col, dy, x, check_invariants=False)
    if _numba_gradient(backend, values, x.shape[0], dy, x):
        return _cpu_spmm().cpu_csr_sddmm(crow, col, dy, x)
    if x.dtype in (torch.float32, torch.float64):
        # zeros, not empty: sampled_addmm was seen to let NaN in uninitialized values through beta=0
        pattern = _make(torch.sparse_csr, crow, col, torch.zeros_like(values), (dy.shape[1], x.shape[1]))
        return torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
    # torch's CPU sampled_addmm is float32 / float64 only: half types in float32, then rounded.
    return _sddmm_impl(crow, col, values.float(), dy.float(), x.float(), backend).to(x.dtype)


@torch.library.custom_op("sparse_lth::sddmm", mutates_args=())
def sddmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dy: torch.Tensor,
          x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` [M, K] sampled at the pattern: a tensor shaped like ``values`` (1-D for CSR,
    [blocks, br, bc] for BSR), in ``x``'s dtype. ``dy`` [N, M] and ``x`` [N, K] contiguous.
    On CUDA the Triton BSR SDDMM, and for CSR the dense cuBLAS product sampled at the pattern
    (the Triton CSR SDDMM where that product would not fit in 1 GiB)."""
    return _sddmm_impl(crow, col, values, dy, x)


@sddmm.register_fake
def _(crow, col, values, dy, x):
    return values.new_empty(values.shape, dtype=x.dtype)


def _bsr_sddmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dy: torch.Tensor,
               x: torch.Tensor, triton: bool) -> torch.Tensor:
    nblocks, br, bc = values.shape
    if triton:
        return kernels.triton_bsr_sddmm(crow, col, (br, bc), dy, x, check_invariants=False)
    if nblocks == 0 or dy.shape[0] == 0:
        return torch.zeros(values.shape, dtype=x.dtype, device=x.device)
    # One batched product over the stored blocks: [blocks, br, N] @ [blocks, N, bc].
    N = dy.shape[0]
    dy_rows = dy.t().reshape(-1, br, N)[_block_rows(crow, nblocks)]
    x_cols = x.t().reshape(-1, bc, N)[col.long()]
    return torch.bmm(dy_rows, x_cols.transpose(1, 2))


@torch.library.custom_op("sparse_lth::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
           kernel_size: list[int], stride: list[int], padding: list[int], same: bool, dilation: list[int],
           backend: str = "auto") -> torch.Tensor:
    """``F.conv2d`` of ``x`` [N, in, H, W] with a weight [out, in, kh, kw] stored as CSR over
    ``[out, in * kh * kw]`` (inference; no autograd formula). ``same``: ``padding="same"``, else
    ``padding`` [ph, pw]. ``backend``: ``"dense"`` densifies the weight for ``F.conv2d``; else the
    direct sparse kernel on the CPU (a dense conv elsewhere). What ``SparseConv2d`` becomes in a
    ``torch.compile`` / ``torch.export`` graph; the layer checks its indices once."""
    from sparse_lth.kernels import cpu_conv  # numba, imported on first use

    pad = "same" if same else tuple(padding)
    if backend == "dense" or x.device.type != "cpu":
        out, (kh, kw) = crow.shape[0] - 1, kernel_size
        W = _make(torch.sparse_csr, crow, col, values, (out, x.shape[1] * kh * kw)).to_dense()
        return torch.nn.functional.conv2d(x, W.reshape(out, x.shape[1], kh, kw), bias, tuple(stride), pad,
                                          tuple(dilation))
    geometry = (tuple(kernel_size), tuple(stride), pad, tuple(dilation))
    return cpu_conv.cpu_sparse_conv2d(x, crow, col, values, bias, kernel_size=geometry[0], stride=geometry[1],
                                      padding=pad, dilation=geometry[3], check_invariants=False,
                                      cache=_conv_cache(crow, col, values, geometry))


#: The CPU conv's prepared launches per stored weight, kept with its column indices (a compiled
#: graph passes the layer's own buffers on every call): without them each call of the op would
#: plan itself again, ~350 us against a ~150 us kernel for a 64-channel conv at batch 1.
_CONV_CACHES = WeakIdKeyDictionary()


def _conv_cache(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, geometry: tuple) -> dict:
    """The cache ``cpu_sparse_conv2d`` keeps for this weight and geometry: new when the three
    buffers are other tensors than last time or were changed in place (their versions)."""
    versions = (crow._version, col._version, values._version)
    entry = _CONV_CACHES.get(col)
    if entry is None or entry[0] is not crow or entry[1] is not values or entry[2] != versions:
        entry = _CONV_CACHES[col] = (crow, values, versions, {})
    return entry[3].setdefault(geometry, {})


@conv2d.register_fake
def _(x, crow, col, values, bias, kernel_size, stride, padding, same, dilation, backend="auto"):
    from sparse_lth.kernels import cpu_conv

    _, (oh, ow) = cpu_conv.conv2d_geometry(tuple(x.shape[-2:]), tuple(kernel_size), tuple(stride),
                                           "same" if same else tuple(padding), tuple(dilation), name="sparse_lth::conv2d")
    return x.new_empty((x.shape[0], crow.shape[0] - 1, oh, ow))
