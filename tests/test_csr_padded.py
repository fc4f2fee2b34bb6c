"""The CSR kernel's padded form (kernels/csr.py: pad_csr / PaddedCSR, the kernel's ALIGNED
path) and its [K, N] workspace for a linear layer's input, against fp64 dense products.

Run on Triton's CPU interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET); what
the compiled code loads (16-byte vectors, the pipelined loop) is checked from the PTX by
tests/test_kernel_compile.py (helpers in tests/csr_ptx.py).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import (
    DEVICE,
    DTYPES,
    IDS,
    QUIET_SPARSE_WARNINGS,
    assert_within_three_way,
    nan_like,
    rand_dense,
    require_kernel_runtime,
    seeded,
)

require_kernel_runtime()

from sparse_lth.kernels import csr as csr_mod  # noqa: E402
from sparse_lth.kernels.csr import (  # noqa: E402
    PaddedCSR,
    pad_csr,
    transpose_pays,
    triton_csr_linear,
    triton_csr_matmul,
)

pytestmark = QUIET_SPARSE_WARNINGS

#: Row lengths around the 8-entry alignment, an empty row and one longer than any BLOCK_NNZ.
ROW_LENGTHS = (0, 1, 7, 8, 9, 1000, 3, 0, 16, 15)


def csr_with_rows(lengths, K: int, dtype: torch.dtype, gen: torch.Generator, *,
                  index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A CSR matrix whose row r holds lengths[r] random distinct columns (sorted)."""
    dense = torch.zeros(len(lengths), K)
    for r, n in enumerate(lengths):
        cols = torch.randperm(K, generator=gen)[:n]
        dense[r, cols] = torch.randn(n, generator=gen)
    dense = dense.to(dtype)
    W = dense.to_sparse_csr()
    W = torch.sparse_csr_tensor(W.crow_indices().to(index_dtype),
                                W.col_indices().to(index_dtype), W.values(), W.shape)
    assert W.values().numel() == sum(lengths)  # randn never drew an exact zero here
    return W.to(DEVICE)


def check_product(out: torch.Tensor, W: torch.Tensor, X: torch.Tensor, *, linear: bool) -> None:
    """Three-way rule against the dense fp64 product, and torch's own at X's dtype."""
    dense = W.to_dense()
    if linear:
        exact, at_dtype = X.double() @ dense.double().T, X @ dense.T
    else:
        exact, at_dtype = dense.double() @ X.double(), dense @ X
    assert_within_three_way(out, exact, at_dtype, X.dtype)


# --- the padded form ----------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_pad_csr_layout(index_dtype):
    gen = seeded("pad-layout", index_dtype)
    W = csr_with_rows(ROW_LENGTHS, 1100, torch.float32, gen, index_dtype=index_dtype)
    P = pad_csr(W, index_dtype=index_dtype)
    crow, col, val = P.crow.tolist(), P.col.tolist(), P.val.tolist()
    wcrow, wcol, wval = W.crow_indices().tolist(), W.col_indices().tolist(), W.values().tolist()
    assert P.crow.dtype == P.col.dtype == index_dtype and P.val.dtype == torch.float32
    assert P.shape == (10, 1100) and P.nnz == sum(ROW_LENGTHS)
    for r, n in enumerate(ROW_LENGTHS):
        s, e = crow[r], crow[r + 1]
        assert s % 8 == 0 and e - s == -(-n // 8) * 8  # at most 7 padding entries
        assert col[s:s + n] == wcol[wcrow[r]:wcrow[r + 1]]
        assert val[s:s + n] == wval[wcrow[r]:wcrow[r + 1]]
        assert val[s + n:e] == [0.0] * (e - s - n)
        assert col[s + n:e] == [wcol[wcrow[r + 1] - 1]] * (e - s - n)  # the row's last column
    assert P.padding == len(col) - P.nnz == sum(-n % 8 for n in ROW_LENGTHS)
    assert P.padding_bytes == P.padding * (4 + index_dtype.itemsize)


def test_pad_csr_defaults_to_int32_and_wider_multiples():
    gen = seeded("pad-int32")
    W = csr_with_rows((5, 0, 17), 40, torch.float16, gen)  # int64, torch's default
    P = pad_csr(W)
    assert P.col.dtype == P.crow.dtype == torch.int32
    assert P.crow.tolist() == [0, 8, 8, 32]
    assert pad_csr(W, 16).crow.tolist() == [0, 16, 16, 48]
    with pytest.raises(ValueError, match="multiple of 8"):
        pad_csr(W, 12)
    with pytest.raises(ValueError, match="index_dtype"):
        pad_csr(W, index_dtype=torch.int16)


def test_padded_form_is_checked_before_launch():
    gen = seeded("pad-bad")
    W = csr_with_rows((3, 9), 20, torch.float32, gen)
    P = pad_csr(W)
    X = rand_dense(20, 2, dtype=torch.float32, gen=gen)
    off_by_one = PaddedCSR(P.crow.clone(), P.col, P.val, P.shape, P.nnz)
    off_by_one.crow[1] = 7  # still a running count, but row 1 starts unaligned
    with pytest.raises(ValueError, match="multiples of 8"):
        triton_csr_matmul(off_by_one, X)
    wild = PaddedCSR(P.crow, P.col.clone(), P.val, P.shape, P.nnz)
    wild.col[3] = 20
    with pytest.raises(ValueError, match="out of range"):
        triton_csr_matmul(wild, X)
    with pytest.raises(ValueError, match="crow"):
        PaddedCSR(P.crow[:-1], P.col, P.val, P.shape, P.nnz)
    with pytest.raises(ValueError, match="dtype"):
        triton_csr_matmul(P, X.half())
    with pytest.raises(ValueError, match="shape"):
        triton_csr_linear(P, X)


# --- products -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("N", [1, 3, 40])
def test_padded_matmul_and_linear(dtype, index_dtype, N):
    """Rows of 0, 1, 7, 8, 9 and 1000 entries, padded and not, both layouts of X."""
    gen = seeded("pad-product", dtype, index_dtype, N)
    K = 1100
    W = csr_with_rows(ROW_LENGTHS, K, dtype, gen, index_dtype=index_dtype)
    P = pad_csr(W, index_dtype=index_dtype)
    X = rand_dense(K, N, dtype=dtype, gen=gen)
    x = rand_dense(N, K, dtype=dtype, gen=gen)
    for w in (W, P):
        check_product(triton_csr_matmul(w, X, out=nan_like((10, N), dtype)), W, X, linear=False)
        check_product(triton_csr_linear(w, x, out=nan_like((N, 10), dtype)), W, x, linear=True)
        check_product(triton_csr_matmul(w, x.t()), W, x.t(), linear=False)


@pytest.mark.parametrize("config", csr_mod.CSR_CONFIGS,
                         ids=lambda c: "n{BLOCK_N}-nnz{BLOCK_NNZ}".format(**c.kwargs))
def test_padded_every_tile_config(config):
    """Each tile shape on the ALIGNED path: ragged N, rows shorter and longer than BLOCK_NNZ,
    row-major X, x in place and through the [K, N] workspace."""
    bn = config.kwargs["BLOCK_N"]
    gen = seeded("pad-config", tuple(config.kwargs.items()))
    K, N = 1100, bn + 3
    W = csr_with_rows((0, 9, 1000, 1, 300), K, torch.float16, gen)
    P = pad_csr(W)
    X = rand_dense(K, N, dtype=torch.float16, gen=gen)
    out = nan_like((5, N), torch.float16)
    csr_mod._launch(P, X, out, N=N, x_t=False, stride_x=N, y_t=False, stride_y=N,
                    kernel=csr_mod._csr_kernel, **config.kwargs)
    check_product(out, W, X, linear=False)
    x = rand_dense(N, K, dtype=torch.float16, gen=gen)
    for transpose in (False, True):
        y = nan_like((N, 5), torch.float16)
        csr_mod._launch(P, x, y, N=N, x_t=True, stride_x=K, y_t=True, stride_y=5,
                        kernel=csr_mod._csr_kernel, transpose=transpose, **config.kwargs)
        check_product(y, W, x, linear=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_workspace_chosen_by_bytes(dtype, monkeypatch):
    """With the launch priced at zero bytes a 6-input call takes the workspace, and the product
    is the one computed in place; 3-D inputs keep their shape; N = 1 never copies."""
    gen = seeded("pad-workspace", dtype)
    K = 300
    W = csr_with_rows((0, 1, 7, 8, 9, 200, 40), K, dtype, gen)
    P = pad_csr(W)
    x = rand_dense(2, 3, K, dtype=dtype, gen=gen)
    asked = []

    def recording(*args):
        asked.append(transpose_pays(*args))
        return asked[-1]

    monkeypatch.setattr(csr_mod, "transpose_pays", recording)
    in_place = triton_csr_linear(P, x)
    monkeypatch.setattr(csr_mod, "TRANSPOSE_LAUNCH_BYTES", 0)
    copied = triton_csr_linear(P, x)
    assert asked == [False, True]
    assert copied.shape == (2, 3, 7)
    check_product(copied.reshape(6, 7), W, x.reshape(6, K), linear=True)
    torch.testing.assert_close(copied, in_place, rtol=0, atol=0)  # same sums, same order
    assert not transpose_pays(10**9, 1, K, 2)


def test_empty_padded_matrices():
    gen = seeded("pad-empty")
    for M, K in ((0, 5), (4, 0), (6, 10)):
        W = torch.zeros(M, K).to_sparse_csr().to(DEVICE)
        P = pad_csr(W)
        assert P.val.numel() == 0 and P.crow.tolist() == [0] * (M + 1)
        X = rand_dense(K, 3, dtype=torch.float32, gen=gen)
        out = triton_csr_matmul(P, X)
        assert out.shape == (M, 3) and torch.equal(out, torch.zeros(M, 3))
        assert triton_csr_linear(P, X.t().contiguous()).shape == (3, M)


def test_nonfinite_x_outside_the_pattern_stays_out():
    """Padding reads the row's last column (a value 0 there): an inf elsewhere in x must not
    leak into rows that never store that column."""
    gen = seeded("pad-inf")
    W = csr_with_rows((3, 0, 9), 30, torch.float32, gen)
    P = pad_csr(W)
    X = rand_dense(30, 4, dtype=torch.float32, gen=gen)
    unused = sorted(set(range(30)) - set(W.col_indices().tolist()))
    X[unused] = float("inf")
    out = triton_csr_matmul(P, X)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, (W.to_dense().double()
                                @ X.double().nan_to_num(posinf=0.0)).float(), atol=1e-5)
