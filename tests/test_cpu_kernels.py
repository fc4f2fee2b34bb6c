"""scipy CPU kernels (kernels/cpu.py) against the plain torch reference."""

from __future__ import annotations

import pytest
import torch

import sparse_lth.kernels.cpu as cpu
from sparse_lth.kernels import cpu_bsr_matmul, cpu_csr_matmul
from sparse_lth.kernels.reference import sparse_matmul_reference

try:
    from tolerances import TOLERANCE
except ImportError:  # pragma: no cover - run from another rootdir
    TOLERANCE = {}

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_weight(rows: int, cols: int, density: float, gen: torch.Generator, *, empty_rows: bool = True,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp64 dense weight with unstructured (or block) sparsity and some fully empty rows."""
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if block is None:
        keep = torch.rand(rows, cols, generator=gen) < density
    else:
        br, bc = block
        keep = torch.rand(rows // br, cols // bc, generator=gen) < density
        keep = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
        keep &= torch.rand(rows, cols, generator=gen) < 0.7  # zeros inside stored blocks too
    if empty_rows and rows > 2:
        keep[torch.randperm(rows, generator=gen)[: rows // 3]] = False
    return w * keep


def check_close(got: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> None:
    """Three-way rule (tests/conftest.py) for fp32 / fp16 / bf16; near-exact for fp64."""
    assert got.dtype == X.dtype and got.shape == (W.shape[0], X.shape[1])
    truth = sparse_matmul_reference(W, X)
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    if X.dtype == torch.float64:
        assert err <= 1e-12 * max(scale, 1.0)
        return
    torch_err = (sparse_matmul_reference(W, X, dtype=X.dtype).double() - truth).abs().max().item() if got.numel() else 0.0
    tol = TOLERANCE.get(X.dtype, {"factor": 2.0, "atol": 1e-3})
    assert err <= tol["factor"] * torch_err + tol["atol"] * max(scale, 1.0), (err, torch_err, scale)


SHAPES = [(1, 1, 1), (7, 5, 1), (37, 53, 3), (64, 64, 16), (130, 97, 5), (5, 200, 33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_csr_matches_reference(shape, density, dtype):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    w = random_weight(M, K, density, gen, empty_rows=density < 1.0).to(dtype)
    X = torch.randn(K, N, generator=gen, dtype=torch.float64).to(dtype)
    W = w.to_sparse_csr()
    check_close(cpu_csr_matmul(W, X), W, X)
    check_close(cpu_csr_matmul(W, X, threads=3), W, X)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(1, 1), (2, 3), (16, 16), (8, 32)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("N", [1, 6])
def test_bsr_matches_reference(block, density, dtype, N):
    br, bc = block
    M, K = br * 5, bc * 4
    gen = torch.Generator().manual_seed(br * 100 + bc + N)
    w = random_weight(M, K, density, gen, empty_rows=False, block=block).to(dtype)
    X = torch.randn(K, N, generator=gen, dtype=torch.float64).to(dtype)
    W = w.to_sparse_bsr(block)
    check_close(cpu_bsr_matmul(W, X), W, X)
    check_close(cpu_bsr_matmul(W, X, threads=2), W, X)


def test_int32_and_int64_indices_agree():
    gen = torch.Generator().manual_seed(1)
    w = random_weight(50, 40, 0.2, gen).float()
    W64 = w.to_sparse_csr()
    W32 = torch.sparse_csr_tensor(W64.crow_indices().int(), W64.col_indices().int(), W64.values(), W64.shape)
    X = torch.randn(40, 4, generator=gen)
    assert torch.equal(cpu_csr_matmul(W64, X), cpu_csr_matmul(W32, X))


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_threads_equal_single_thread(layout, N):
    # Each row is summed by one thread in the same order whatever the split: results are equal
    # bit for bit, not just close.
    gen = torch.Generator().manual_seed(2)
    w = random_weight(256, 192, 0.1, gen).float()
    W = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr((16, 16))
    fn = cpu_csr_matmul if layout == "csr" else cpu_bsr_matmul
    X = torch.randn(192, N, generator=gen)
    one = fn(W, X, threads=1)
    for t in (2, 3, 7, 1000):
        assert torch.equal(fn(W, X, threads=t), one)


def test_row_blocks_balance_nonzeros():
    indptr = torch.tensor([0, 100, 100, 100, 101, 102, 103, 200]).numpy()
    blocks = cpu._row_blocks(indptr, 2)
    assert blocks[0][0] == 0 and blocks[-1][1] == 7
    assert all(a < b for a, b in blocks) and all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))
    assert cpu._row_blocks(indptr, 50)[-1][1] == 7  # more parts than rows: still a partition


def test_public_scipy_fallback_matches(monkeypatch):
    # Without scipy's private loops the public constructors are used: same results.
    gen = torch.Generator().manual_seed(3)
    w = random_weight(64, 48, 0.2, gen).float()
    X = torch.randn(48, 3, generator=gen)
    fast_csr = cpu_csr_matmul(w.to_sparse_csr(), X, threads=2)
    fast_bsr = cpu_bsr_matmul(w.to_sparse_bsr((16, 16)), X[:, :1], threads=2)
    monkeypatch.setattr(cpu, "_scipy_loops", lambda: None)
    assert torch.allclose(cpu_csr_matmul(w.to_sparse_csr(), X, threads=2), fast_csr, atol=1e-6)
    assert torch.allclose(cpu_bsr_matmul(w.to_sparse_bsr((16, 16)), X[:, :1], threads=2), fast_bsr, atol=1e-6)


def test_no_copy_of_weight_and_fresh_output():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    W = w.to_sparse_csr()
    X = torch.ones(2, 1)
    y = cpu_csr_matmul(W, X)
    W.values().mul_(10)  # the kernel reads the live values: no cached copy
    assert torch.equal(cpu_csr_matmul(W, X), 10 * y)
    assert y.is_contiguous() and y.data_ptr() != X.data_ptr()


def test_empty_dimensions():
    for M, K, N in [(0, 4, 3), (4, 0, 3), (4, 3, 0)]:
        W = torch.zeros(M, K).to_sparse_csr()
        assert torch.equal(cpu_csr_matmul(W, torch.ones(K, N)), torch.zeros(M, N))


def test_bad_inputs_raise_value_error():
    W = torch.eye(4).to_sparse_csr()
    X = torch.ones(4, 2)
    cases = [
        (cpu_csr_matmul, torch.eye(4), X, "sparse CSR"),  # dense W
        (cpu_csr_matmul, torch.eye(4).to_sparse_bsr((2, 2)), X, "sparse CSR"),  # wrong layout
        (cpu_bsr_matmul, W, X, "sparse BSR"),
        (cpu_csr_matmul, W, torch.ones(3, 2), "do not chain"),
        (cpu_csr_matmul, W, torch.ones(4), "2-D"),
        (cpu_csr_matmul, W, X.double(), "share a dtype"),
        (cpu_csr_matmul, torch.eye(4, dtype=torch.int64).to_sparse_csr(), X.long(), "not supported"),
        (cpu_csr_matmul, W, X.to_sparse(), "dense"),
        (cpu_csr_matmul, W, "x", "torch tensors"),
    ]
    for fn, w, x, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(w, x)
    with pytest.raises(ValueError, match="threads"):
        cpu_csr_matmul(W, X, threads=0)
    with pytest.raises(ValueError, match="2-D"):  # a hybrid CSR tensor (dense values per entry)
        hybrid = torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 2), (1, 1, 2))
        cpu_csr_matmul(hybrid, torch.ones(1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused():
    W = torch.eye(4, device="cuda").to_sparse_csr()
    with pytest.raises(ValueError, match="CPU"):
        cpu_csr_matmul(W, torch.ones(4, 2, device="cuda"))


def test_auto_cpu_backend_rule():
    csr, bsr = torch.sparse_csr, torch.sparse_bsr
    auto = cpu.auto_cpu_backend
    big = 10 * cpu.MIN_WORK_PER_THREAD
    # The measured crossover (bench/cpu_crossover.md): scipy's threaded rows win a matrix-vector
    # product with work for two threads; torch's MKL product wins from 2 columns on, and for BSR
    # at every batch; numba's CSR kernel above 40 columns. Each branch and both sides of each threshold, literally.
    assert cpu.TORCH_MIN_BATCH == 2
    for dtype in (torch.float32, torch.float64):
        assert auto(csr, dtype, 1) == "scipy"
        assert auto(csr, dtype, 1, nnz=big) == "scipy"
        assert auto(csr, dtype, 1, nnz=2 * cpu.MIN_WORK_PER_THREAD) == "scipy"
        assert auto(csr, dtype, 1, nnz=2 * cpu.MIN_WORK_PER_THREAD - 1) == "torch"  # too small for two threads
        assert cpu.NUMBA_MIN_ROWS == 40
        for n in (2, 3, 16, 40):
            assert auto(csr, dtype, n) == auto(csr, dtype, n, nnz=big) == "torch", n
        for n in (41, 128, 4096):  # the numba kernel from 41 columns on, CSR only, with enough values
            assert auto(csr, dtype, n) == auto(csr, dtype, n, nnz=cpu.NUMBA_MIN_STORED) == "numba", n
            assert auto(csr, dtype, n, nnz=cpu.NUMBA_MIN_STORED - 1) == "torch", n
        for n in (1, 2, 128):
            assert auto(bsr, dtype, n, nnz=big) == "torch", n
    for dtype in (torch.float16, torch.bfloat16):  # torch's CPU sparse product refuses them
        for layout in (csr, bsr):
            for n in (1, 2, 128):
                assert auto(layout, dtype, n, nnz=big) == "scipy", (layout, dtype, n)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_vector_loop_adds_the_product_into_y(fmt):
    """CpuSparseProduct.vector_loop: scipy's loop bound to W, adding W @ x into y (what a layer
    replays at batch 1, y starting as its bias); None where the product would split over threads."""
    from sparse_lth.kernels.cpu import MIN_WORK_PER_THREAD, CpuSparseProduct

    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(32, 48, generator=gen) * (torch.rand(32, 48, generator=gen) < 0.3)
    W = dense.to_sparse_csr() if fmt == "csr" else dense.to_sparse_bsr((8, 16))
    loop = CpuSparseProduct(W).vector_loop()
    x, start = torch.randn(48, generator=gen), torch.randn(32, generator=gen)
    y = start.numpy().copy()
    loop(x.numpy(), y)
    torch.testing.assert_close(torch.from_numpy(y), start + dense @ x, rtol=1e-5, atol=1e-5)
    big = torch.ones(1, 2 * MIN_WORK_PER_THREAD).to_sparse_csr()
    assert CpuSparseProduct(big).vector_loop() is None  # torch's threads may split it
    assert CpuSparseProduct(big).vector_loop(threads=1) is not None
