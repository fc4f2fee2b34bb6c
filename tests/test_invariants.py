"""Malformed sparse tensors are refused at every entry point, before any kernel reads them.

Each case is built with ``check_invariants=False`` (torch then accepts anything) and breaks one
invariant of kernels/invariants.py. The hypothesis fuzz suite (test_fuzz_sparse.py) covers the
space at random, in a subprocess; these are the named cases, one per invariant and entry point.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparse_lth.backends import sparse_linear, sparse_matmul
from sparse_lth.kernels import check_index_invariants, cpu_bsr_matmul, cpu_csr_matmul, has_triton
from sparse_lth.kernels._triton import is_interpreting
from sparse_lth.nn import SparseLinear

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")


def csr(crow, col, values, shape, dtype=torch.int64) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.tensor(crow, dtype=dtype), torch.tensor(col, dtype=dtype),
                                       torch.as_tensor(values, dtype=torch.float32), shape, check_invariants=False)


def bsr(crow, col, nblocks, block, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_bsr_tensor(torch.tensor(crow), torch.tensor(col), torch.ones(nblocks, *block), shape,
                                       check_invariants=False)


# (name, tensor, message): a 3 x 4 matrix (CSR) or a 4 x 4 matrix of 2 x 2 blocks (BSR)
BAD = [
    ("column past the end", csr([0, 1, 2, 2], [0, 4], [1.0, 2.0], (3, 4)), r"column index 4 .* out of range \[0, 4\)"),
    ("column near 2**31", csr([0, 1, 1, 1], [2**31 - 2], [1.0], (3, 4)), "column index 2147483646"),
    ("negative column", csr([0, 1, 1, 1], [-1], [1.0], (3, 4)), "column index -1"),
    ("decreasing row pointers", csr([0, 2, 1, 2], [0, 1], [1.0, 2.0], (3, 4)), "decreases at row 1"),
    ("row pointers not from 0", csr([1, 1, 2, 2], [0, 1], [1.0, 2.0], (3, 4)), r"crow_indices\[0\] is 1"),
    ("row pointers past nnz", csr([0, 1, 2, 3], [0, 1], [1.0, 2.0], (3, 4)), r"crow_indices\[-1\] is 3"),
    ("too few row pointers", csr([0, 2], [0, 1], [1.0, 2.0], (3, 4)), "expected 4"),
    ("values of another length", csr([0, 1, 2, 2], [0, 1], [1.0, 2.0, 3.0], (3, 4)), "2 column indices but 3"),
    ("mixed index dtypes", torch.sparse_csr_tensor(torch.tensor([0, 1, 1, 1]), torch.tensor([0], dtype=torch.int32),
                                                   torch.ones(1), (3, 4), check_invariants=False), "both be int32"),
    ("block column past the end", bsr([0, 1, 1], [2], 1, (2, 2), (4, 4)), r"column index 2 .*block row 0"),
    ("block row pointers decrease", bsr([0, 2, 1], [0, 1], 2, (2, 2), (4, 4)), "decreases at block row 1"),
    ("blocks of another count", bsr([0, 1, 1], [0], 3, (2, 2), (4, 4)), "1 column indices but 3"),
]
BAD_CSR = [(n, w, m) for n, w, m in BAD if w.layout == torch.sparse_csr]
ids = [name for name, _, _ in BAD]


@pytest.mark.parametrize("name,W,message", BAD, ids=ids)
def test_check_names_the_broken_invariant(name, W, message):
    with pytest.raises(ValueError, match=message):
        check_index_invariants(W)


@pytest.mark.parametrize("name,W,message", BAD, ids=ids)
@pytest.mark.parametrize("backend", ["auto", "scipy", "torch", "dense"])
def test_products_refuse_malformed_tensors(name, W, message, backend):
    kernel = cpu_csr_matmul if W.layout == torch.sparse_csr else cpu_bsr_matmul
    X = torch.ones(4, 3)
    for call in (lambda: kernel(W, X), lambda: sparse_matmul(W, X, backend=backend),
                 lambda: sparse_linear(torch.ones(2, 4), W, backend=backend)):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("name,W,message", BAD, ids=ids)
def test_sparse_linear_refuses_malformed_weights(name, W, message):
    with pytest.raises(ValueError, match=message):
        SparseLinear(W)


@pytest.mark.parametrize("crow,col,message", [
    ([0, 1, 2, 2], [0, 4], "column index 4"),
    ([0, 2, 1, 2], [0, 1], "decreases at row 1"),
    ([1, 1, 2, 2], [0, 1], r"crow_indices\[0\] is 1"),
    ([0, 1, 2, 3], [0, 1], r"crow_indices\[-1\] is 3"),
])
def test_sparse_linear_rechecks_a_loaded_state_dict(crow, col, message):
    # Same buffer sizes as the layer's, so torch's own load accepts them: our hook must not.
    layer = SparseLinear(csr([0, 1, 2, 2], [0, 1], [1.0, 2.0], (3, 4)))
    state = {"crow_indices": torch.tensor(crow, dtype=torch.int32), "col_indices": torch.tensor(col, dtype=torch.int32),
             "values": torch.ones(2)}
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(state)


def test_valid_tensors_pass_and_the_opt_out_skips_the_check():
    W = csr([0, 2, 2, 3], [1, 3, 0], [1.0, 2.0, 3.0], (3, 4))
    check_index_invariants(W)
    X = torch.arange(12.0).reshape(4, 3)
    want = W.to_dense() @ X
    assert torch.equal(cpu_csr_matmul(W, X), want)
    assert torch.equal(cpu_csr_matmul(W, X, check_invariants=False), want)
    # The opt-out really skips it: a malformed row-pointer array no longer raises (kept in
    # bounds here, so the product just sums the wrong rows; that is the caller's promise).
    skipped = csr([0, 2, 1, 3], [1, 3, 0], [1.0, 2.0, 3.0], (3, 4))
    cpu_csr_matmul(skipped, X, check_invariants=False)
    with pytest.raises(ValueError):
        cpu_csr_matmul(skipped, X)


def test_unsorted_columns_are_accepted_by_kernels():
    # Not an invariant the kernels need: every kernel sums a row in any order.
    W = csr([0, 2, 2, 2], [3, 0], [1.0, 2.0], (3, 4))
    X = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(cpu_csr_matmul(W, X), torch.stack([X[3] + 2 * X[0], torch.zeros(3), torch.zeros(3)]))


def test_meta_tensors_are_refused_with_a_reason():
    W = torch.eye(4).to_sparse_csr().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        check_index_invariants(W)


def _triton_ready() -> bool:
    if not has_triton():
        return False
    return torch.cuda.is_available() or is_interpreting()


@pytest.mark.skipif(not _triton_ready(), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,W,message", BAD_CSR, ids=[n for n, _, _ in BAD_CSR])
def test_triton_launchers_refuse_malformed_tensors(name, W, message):
    from sparse_lth import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    W = W.to(device)
    with pytest.raises(ValueError, match=message):
        kernels.triton_csr_matmul(W, torch.ones(4, 3, device=device))
    with pytest.raises(ValueError, match=message):
        kernels.triton_csr_linear(W, torch.ones(2, 4, device=device))


@pytest.mark.skipif(not _triton_ready(), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
def test_triton_bsr_launchers_refuse_a_block_column_past_the_end():
    from sparse_lth import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = torch.sparse_bsr_tensor(torch.tensor([0, 1, 1]), torch.tensor([2]), torch.ones(1, 16, 16), (32, 32),
                                    check_invariants=False).to(device)
    with pytest.raises(ValueError, match=r"column index 2 .* out of range \[0, 2\)"):
        kernels.triton_bsr_matmul(W, torch.ones(32, 16, device=device))
    with pytest.raises(ValueError, match=r"column index 2"):
        kernels.triton_bsr_linear(W, torch.ones(3, 32, device=device))


def test_sparsify_built_layers_skip_the_per_call_check(monkeypatch):
    # Checked once at construction: forward must not pay O(nnz) again on every call.
    import sparse_lth.backends as backends

    calls = []
    real = backends.check_index_invariants
    monkeypatch.setattr(backends, "check_index_invariants", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = SparseLinear.from_linear(nn.Linear(8, 4), mask=torch.rand(4, 8) < 0.5)
    with torch.no_grad():
        layer(torch.randn(3, 8))
    assert calls == []
