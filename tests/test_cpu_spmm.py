"""The numba CPU training products (kernels/cpu_spmm.py) against dense torch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_lth.kernels import _numba, cpu_spmm
from sparse_lth.kernels.cpu_spmm import cpu_csr_linear, cpu_csr_linear_backward, cpu_csr_linear_t, cpu_csr_sddmm
from sparse_lth.nn import TrainableSparseLinear, ops

SHAPES = [  # out, in, batch (one and several 64-wide tiles, padded), density
    (37, 53, 41, 0.3),
    (64, 200, 130, 0.05),
    (9, 16, 1, 1.0),
    (120, 7, 64, 0.5),
]


def _pattern(out: int, inp: int, density: float, dtype: torch.dtype, index: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=gen, dtype=dtype) * (torch.rand(out, inp, generator=gen) < density)
    dense[out // 2] = 0  # an empty row
    W = dense.to_sparse_csr()
    return dense, W.crow_indices().to(index), W.col_indices().to(index), W.values()


@pytest.mark.parametrize("out,inp,batch,density", SHAPES)
@pytest.mark.parametrize("dtype,index", [(torch.float32, torch.int32), (torch.float64, torch.int64)])
def test_three_products_match_dense(out, inp, batch, density, dtype, index):
    dense, crow, col, values = _pattern(out, inp, density, dtype, index, seed=out + batch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, inp, generator=gen, dtype=dtype)
    dy = torch.randn(batch, out, generator=gen, dtype=dtype)
    crow_t, _, _ = ops.transpose_pattern(crow, col, (out, inp))
    torch.testing.assert_close(cpu_csr_linear(x, crow, col, values, out), x @ dense.T)
    torch.testing.assert_close(cpu_csr_linear_t(dy, crow, col, values, crow_t, inp), dy @ dense)
    rows = torch.repeat_interleave(torch.arange(out), (crow[1:] - crow[:-1]).long())
    torch.testing.assert_close(cpu_csr_sddmm(crow, col, dy, x), (dy.T @ x)[rows, col.long()])
    dx, dvalues = cpu_csr_linear_backward(dy, x, crow, col, values, crow_t)
    torch.testing.assert_close(dx, dy @ dense)
    torch.testing.assert_close(dvalues, (dy.T @ x)[rows, col.long()])


def test_both_gradients_in_one_sweep_over_many_blocks_and_tiles(monkeypatch):
    """The fused backward with blocks of a few rows (the work panel carried across blocks, empty
    columns in a block skipped) and three tiles of batch entries (the dot products summed across
    tiles), against dense torch, and equal to the two kernels it replaces."""
    monkeypatch.setattr(cpu_spmm, "SLAB_ROWS", 3)
    monkeypatch.setattr(cpu_spmm, "ENTRIES_PER_BLOCK", 5)
    dense, crow, col, values = _pattern(45, 60, 0.15, torch.float64, torch.int32, seed=8)
    dense[:, 7] = 0  # an empty column
    W = dense.to_sparse_csr()
    crow, col, values = W.crow_indices().int(), W.col_indices().int(), W.values()
    crow_t, _, _ = ops.transpose_pattern(crow, col, (45, 60))
    x, dy = torch.randn(150, 60, dtype=torch.float64), torch.randn(150, 45, dtype=torch.float64)
    dx, dvalues = cpu_csr_linear_backward(dy, x, crow, col, values, crow_t)
    rows = torch.repeat_interleave(torch.arange(45), (crow[1:] - crow[:-1]).long())
    torch.testing.assert_close(dx, dy @ dense)
    torch.testing.assert_close(dvalues, (dy.T @ x)[rows, col.long()])
    torch.testing.assert_close(dx, cpu_csr_linear_t(dy, crow, col, values, crow_t, 60))
    torch.testing.assert_close(dvalues, cpu_csr_sddmm(crow, col, dy, x))
    assert cpu_spmm._blocked_pattern(crow, col, 60)[3] > 10  # many blocks, as meant
    empty_dx, empty_dv = cpu_csr_linear_backward(dy[:0], x[:0], crow, col, values, crow_t)
    assert empty_dx.shape == (0, 60) and torch.equal(empty_dv, torch.zeros_like(values))
    with pytest.raises(ValueError, match="share N"):
        cpu_csr_linear_backward(dy, x[:3], crow, col, values, crow_t)


def test_strided_input_and_thread_counts_agree():
    dense, crow, col, values = _pattern(50, 70, 0.2, torch.float32, torch.int64, seed=3)
    x = torch.randn(70, 100).t()  # [100, 70], not contiguous
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_csr_linear(x, crow, col, values, 50)
        torch.set_num_threads(2)
        two = cpu_csr_linear(x, crow, col, values, 50)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, x @ dense.T)
    torch.testing.assert_close(two, one)


def test_empty_operands_and_bad_input():
    dense, crow, col, values = _pattern(5, 6, 0.5, torch.float32, torch.int64, seed=4)
    assert cpu_csr_linear(torch.randn(0, 6), crow, col, values, 5).shape == (0, 5)
    empty = torch.zeros(5, 6).to_sparse_csr()
    assert torch.equal(cpu_csr_linear(torch.randn(3, 6), empty.crow_indices(), empty.col_indices(), empty.values(), 5),
                       torch.zeros(3, 5))
    with pytest.raises(ValueError, match="share one dtype"):
        cpu_csr_linear(torch.randn(3, 6, dtype=torch.float64), crow, col, values, 5)
    with pytest.raises(ValueError, match="share N"):
        cpu_csr_sddmm(crow, col, torch.randn(3, 5), torch.randn(4, 6))


def test_layer_from_unsorted_csr_trains_like_the_dense_weight():
    """A CSR weight with columns out of order in a row (built by hand) goes through the numba
    backward (batch above NUMBA_MIN_ROWS) and gives the dense weight's gradients."""
    from sparse_lth.formats import SparseWeight

    crow = torch.tensor([0, 3, 5, 5])
    col = torch.tensor([7, 1, 4, 6, 0])
    values = torch.randn(5, dtype=torch.float64)
    W = torch.sparse_csr_tensor(crow, col, values, (3, 8))
    layer = TrainableSparseLinear(SparseWeight(W, (3, 8)))
    dense = torch.zeros(3, 8, dtype=torch.float64)
    dense[torch.tensor([0, 0, 0, 1, 1]), col] = values
    dense.requires_grad_()
    x = torch.randn(ops.NUMBA_MIN_ROWS + 5, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(x.shape[0], 3, dtype=torch.float64)
    layer(x).backward(dy)
    (x_ref @ dense.T).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.dense_weight(), dense.detach())
    grad = torch.sparse_csr_tensor(layer.crow_indices, layer.col_indices, layer.values.grad, (3, 8)).to_dense()
    torch.testing.assert_close(grad, dense.grad * (dense.detach() != 0))


def test_a_kept_panel_is_used_only_for_the_same_unchanged_tensor():
    """The backward reuses the panels of x and dy packed earlier in the step; an in-place change
    of x, or a new tensor, is packed again."""
    dense, crow, col, values = _pattern(30, 50, 0.3, torch.float32, torch.int64, seed=5)
    x = torch.randn(64, 50)
    dy = torch.randn(64, 30)
    first = cpu_csr_linear(x, crow, col, values, 30)
    x.add_(1.0)
    torch.testing.assert_close(cpu_csr_linear(x, crow, col, values, 30), x @ dense.T)
    torch.testing.assert_close(first, (x - 1.0) @ dense.T)
    rows = torch.repeat_interleave(torch.arange(30), (crow[1:] - crow[:-1]).long())
    torch.testing.assert_close(cpu_csr_sddmm(crow, col, dy, x), (dy.T @ x)[rows, col])
    other = x.clone()  # equal values, another tensor: packed afresh, same answer
    torch.testing.assert_close(cpu_csr_sddmm(crow, col, dy, other), (dy.T @ x)[rows, col])
    with torch.no_grad():
        x.copy_(torch.randn(64, 50))
    torch.testing.assert_close(cpu_csr_sddmm(crow, col, dy, x), (dy.T @ x)[rows, col])


def test_work_arrays_start_on_a_line_and_are_kept_up_to_the_limit():
    a = _numba.kept_empty(("test", 0), 1000, np.float32)
    assert a.shape == (1000,) and a.ctypes.data % 64 == 0
    assert _numba.kept_empty(("test", 0), 300, np.float32).ctypes.data == a.ctypes.data  # the same memory
    assert not np.shares_memory(_numba.kept_empty(("test", 1), 300, np.float32), a)  # another key
    big = _numba.SCRATCH_BYTES // 4 + 1  # over the limit: a fresh array each call
    b, c = _numba.kept_empty(("test", 0), big, np.float32), _numba.kept_empty(("test", 0), big, np.float32)
    assert b.ctypes.data % 64 == 0 and not np.shares_memory(b, c) and not _numba.is_kept(big, np.float32)


def test_input_gradient_over_many_row_blocks_follows_a_changed_pattern(monkeypatch):
    """The input gradient's row-blocked transposed pattern, with blocks of a few rows, and built
    again when the indices change in place (it is kept per col_indices tensor and version)."""
    monkeypatch.setattr(cpu_spmm, "ENTRIES_PER_BLOCK", 7)
    monkeypatch.setattr(cpu_spmm, "SLAB_ROWS", 2)
    dense, crow, col, values = _pattern(50, 40, 0.3, torch.float32, torch.int32, seed=3)
    crow_t, _, _ = ops.transpose_pattern(crow, col, (50, 40))
    dy = torch.randn(70, 50)
    torch.testing.assert_close(cpu_csr_linear_t(dy, crow, col, values, crow_t, 40), dy @ dense)
    col.add_(1).remainder_(40)  # another pattern, columns still distinct within each row
    moved = torch.sparse_csr_tensor(crow, col, values, (50, 40)).to_dense()
    crow_t, _, _ = ops.transpose_pattern(crow, col, (50, 40))
    torch.testing.assert_close(cpu_csr_linear_t(dy, crow, col, values, crow_t, 40), dy @ moved)
