"""Triton CSR / BSR kernels against the fp64 references (kernels/reference.py).

Without a GPU these run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes stay small; each check draws fresh random data from a seeded generator, and every
output is poisoned with NaN first so an unwritten element fails the comparison.
"""

from __future__ import annotations

import doctest
import subprocess
import sys

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

triton = require_kernel_runtime()

from sparse_lth.kernels import (  # noqa: E402
    triton_bsr_linear,
    triton_bsr_matmul,
    triton_csr_linear,
    triton_csr_matmul,
)
from sparse_lth.kernels import bsr as bsr_mod  # noqa: E402
from sparse_lth.kernels import csr as csr_mod  # noqa: E402
from sparse_lth.kernels.reference import (  # noqa: E402
    sparse_linear_reference,
    sparse_matmul_reference,
)

pytestmark = QUIET_SPARSE_WARNINGS


# --- helpers ------------------------------------------------------------------------------------

def random_csr(M: int, K: int, density: float, dtype: torch.dtype, gen: torch.Generator, *,
               empty_rows: int = 0, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    dense = torch.randn(M, K, generator=gen) * (torch.rand(M, K, generator=gen) < density)
    if empty_rows:
        dense[torch.randperm(M, generator=gen)[:empty_rows]] = 0
    W = dense.to(dtype).to_sparse_csr()
    if index_dtype != torch.int64:
        W = torch.sparse_csr_tensor(W.crow_indices().to(index_dtype),
                                    W.col_indices().to(index_dtype), W.values(), W.shape)
    return W.to(DEVICE)


def random_bsr(M: int, K: int, block: tuple[int, int], density: float, dtype: torch.dtype,
               gen: torch.Generator, *, empty_block_rows: int = 0,
               index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    br, bc = block
    keep = torch.rand(M // br, K // bc, generator=gen) < density
    if empty_block_rows:
        keep[torch.randperm(M // br, generator=gen)[:empty_block_rows]] = False
    mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    dense = torch.randn(M, K, generator=gen) * mask
    W = dense.to(dtype).to_sparse_bsr(block)
    if index_dtype != torch.int64:
        W = torch.sparse_bsr_tensor(W.crow_indices().to(index_dtype),
                                    W.col_indices().to(index_dtype), W.values(), W.shape)
    return W.to(DEVICE)




def assert_three_way(out: torch.Tensor, W: torch.Tensor, X: torch.Tensor, *,
                     linear: bool = False) -> None:
    """The three-way rule (kernel_cases.assert_within_three_way) against the fp64 reference."""
    ref = sparse_linear_reference if linear else sparse_matmul_reference
    assert_within_three_way(out, ref(W, X, dtype=torch.float64), ref(W, X, dtype=X.dtype), X.dtype)


# --- CSR ----------------------------------------------------------------------------------------

CSR_SHAPES = [(1, 1, 1), (37, 53, 1), (33, 70, 19), (48, 96, 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("M,K,N", CSR_SHAPES)
def test_csr_matches_reference(dtype, M, K, N):
    gen = seeded("csr", dtype, M, K, N)
    W = random_csr(M, K, 0.3, dtype, gen, empty_rows=M // 4)
    X = rand_dense(K, N, dtype=dtype, gen=gen)
    out = triton_csr_matmul(W, X, out=nan_like((M, N), dtype))
    assert_three_way(out, W, X)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("case", ["all_zero", "fully_dense", "int32", "one_row"])
def test_csr_edge_matrices(dtype, case):
    gen = seeded("csr-edge", dtype, case)
    M, K, N = (1, 40, 9) if case == "one_row" else (20, 45, 9)
    density = {"all_zero": 0.0, "fully_dense": 1.01}.get(case, 0.2)
    index = torch.int32 if case in ("int32", "one_row") else torch.int64
    W = random_csr(M, K, density, dtype, gen, index_dtype=index)
    X = rand_dense(K, N, dtype=dtype, gen=gen)
    out = triton_csr_matmul(W, X, out=nan_like((M, N), dtype))
    assert_three_way(out, W, X)
    if case == "all_zero":
        assert torch.equal(out, torch.zeros_like(out))


def test_csr_unsorted_columns():
    """Columns within a row in any order: the kernel only sums, so order must not matter."""
    gen = seeded("csr-unsorted")
    W = random_csr(16, 30, 0.4, torch.float32, gen)
    crow, col, val = W.crow_indices(), W.col_indices().clone(), W.values().clone()
    for r in range(16):
        s, e = crow[r].item(), crow[r + 1].item()
        col[s:e], val[s:e] = col[s:e].flip(0), val[s:e].flip(0)
    shuffled = torch.sparse_csr_tensor(crow, col, val, W.shape)
    X = rand_dense(30, 5, dtype=torch.float32, gen=gen)
    assert_three_way(triton_csr_matmul(shuffled, X), W, X)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_csr_linear_and_transposed_x(dtype):
    gen = seeded("csr-linear", dtype)
    M, K = 24, 50
    W = random_csr(M, K, 0.25, dtype, gen, empty_rows=3)
    x = rand_dense(2, 5, K, dtype=dtype, gen=gen)
    y = triton_csr_linear(W, x, out=nan_like((2, 5, M), dtype))
    assert y.shape == (2, 5, M)
    assert_three_way(y, W, x, linear=True)
    x2 = x.reshape(10, K)
    yt = triton_csr_matmul(W, x2.t(), out=nan_like((M, 10), dtype))  # X as a transposed view
    assert_three_way(yt, W, x2.t())
    one = x2[:1]  # decode: one token
    assert_three_way(triton_csr_linear(W, one), W, one, linear=True)


def _unique_tiles(configs, keys):
    seen = {}
    for c in configs:
        seen.setdefault(tuple(c.kwargs[k] for k in keys), c)
    return list(seen.values())


@pytest.mark.parametrize("config", _unique_tiles(csr_mod.CSR_CONFIGS, ("BLOCK_N", "BLOCK_NNZ")),
                         ids=lambda c: "n{BLOCK_N}-nnz{BLOCK_NNZ}".format(**c.kwargs))
def test_csr_every_tile_config(config):
    """The launcher's pruning picks one config per shape; run each tile shape directly, with
    ragged N and rows longer than BLOCK_NNZ, in both layouts."""
    gen = seeded("csr-config", tuple(config.kwargs.items()))
    M, K, N = 6, 600, config.kwargs["BLOCK_N"] + 3
    W = random_csr(M, K, 0.5, torch.float16, gen, empty_rows=1)
    X = rand_dense(K, N, dtype=torch.float16, gen=gen)
    out = nan_like((M, N), torch.float16)
    csr_mod._launch(W, X, out, N=N, x_t=False, stride_x=N, y_t=False, stride_y=N,
                    kernel=csr_mod._csr_kernel, **config.kwargs)
    assert_three_way(out, W, X)
    x = rand_dense(N, K, dtype=torch.float16, gen=gen)
    for transpose in (False, True):  # x gathered in place, and through the [K, N] workspace
        y = nan_like((N, M), torch.float16)
        csr_mod._launch(W, x, y, N=N, x_t=True, stride_x=K, y_t=True, stride_y=M,
                        kernel=csr_mod._csr_kernel, transpose=transpose, **config.kwargs)
        assert_three_way(y, W, x, linear=True)


class _FakeAutotuner:
    """Records how it is launched: ``self[grid](...)`` is the autotuner, ``self.fn[grid](...)``
    the jit function it wraps."""

    def __init__(self):
        self.calls = []
        outer = self

        class _Config:
            pre_hook = None

            def all_kwargs(self):
                return {"BLOCK_N": 16, "num_warps": 4}

        class _Jit:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.calls.append(("jit", a, kw))

        self.fn = _Jit()
        self.best_config = _Config()

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append(("tuner", a, kw))


def test_tuned_launch_skips_the_autotuner_after_its_choice():
    from sparse_lth.kernels._triton import TunedLaunch

    fake = _FakeAutotuner()
    launch = TunedLaunch(fake)
    launch(("k1",), None, (1, 2), {"X_T": True})
    launch(("k1",), None, (3, 4), {"X_T": True})
    launch(("k2",), None, (5, 6), {"X_T": False})
    assert fake.calls == [
        ("tuner", (1, 2), {"X_T": True}),
        ("jit", (3, 4), {"X_T": True, "BLOCK_N": 16, "num_warps": 4}),
        ("tuner", (5, 6), {"X_T": False}),
    ]


def test_tuned_launch_memo_gives_the_autotuned_result():
    """The real kernels: a second call for one key goes straight to the jit function with the
    autotuner's choice and computes the same product."""
    gen = seeded("tuned-memo")
    W = random_csr(40, 70, 0.3, torch.float32, gen)
    X = rand_dense(70, 3, dtype=torch.float32, gen=gen)
    first = triton_csr_matmul(W, X)
    assert any(k[:2] == (40, 70) for k in csr_mod.tuned_csr.chosen)
    assert_three_way(triton_csr_matmul(W, X), W, X)
    torch.testing.assert_close(triton_csr_matmul(W, X), first, rtol=0, atol=0)
    Wb = random_bsr(64, 32, (16, 16), 0.5, torch.float32, gen)
    Xb = rand_dense(32, 17, dtype=torch.float32, gen=gen)  # past decode, rows too odd for TMA
    triton_bsr_matmul(Wb, Xb)
    assert any(k[:2] == (64, 32) for k in bsr_mod.tuned_bsr.chosen)
    assert_three_way(triton_bsr_matmul(Wb, Xb), Wb, Xb)


# --- BSR ----------------------------------------------------------------------------------------

BSR_CASES = [  # M, K, N, block
    (32, 32, 1, (16, 16)),
    (64, 96, 19, (32, 16)),
    (48, 64, 40, (16, 32)),
    (128, 64, 5, (64, 16)),
    (128, 128, 3, (128, 128)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("M,K,N,block", BSR_CASES)
def test_bsr_matches_reference(dtype, M, K, N, block):
    gen = seeded("bsr", dtype, M, K, N, block)
    W = random_bsr(M, K, block, 0.5, dtype, gen, empty_block_rows=1 if M // block[0] > 1 else 0)
    X = rand_dense(K, N, dtype=dtype, gen=gen)
    out = triton_bsr_matmul(W, X, out=nan_like((M, N), dtype))
    assert_three_way(out, W, X)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("case", ["all_zero", "fully_dense", "int32"])
def test_bsr_edge_matrices(dtype, case):
    gen = seeded("bsr-edge", dtype, case)
    density = {"all_zero": 0.0, "fully_dense": 1.01}.get(case, 0.5)
    index = torch.int32 if case == "int32" else torch.int64
    W = random_bsr(48, 32, (16, 16), density, dtype, gen, index_dtype=index)
    X = rand_dense(32, 7, dtype=dtype, gen=gen)
    out = triton_bsr_matmul(W, X, out=nan_like((48, 7), dtype))
    assert_three_way(out, W, X)
    if case == "all_zero":
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_bsr_linear_and_transposed_x(dtype):
    gen = seeded("bsr-linear", dtype)
    M, K = 64, 48
    W = random_bsr(M, K, (32, 16), 0.5, dtype, gen, empty_block_rows=1)
    x = rand_dense(3, 6, K, dtype=dtype, gen=gen)
    y = triton_bsr_linear(W, x, out=nan_like((3, 6, M), dtype))
    assert_three_way(y, W, x, linear=True)
    x2 = x.reshape(18, K)
    assert_three_way(triton_bsr_matmul(W, x2.t()), W, x2.t())
    assert_three_way(triton_bsr_linear(W, x2[0]), W, x2[0], linear=True)  # 1-D decode input


@pytest.mark.parametrize("config", _unique_tiles(bsr_mod.BSR_CONFIGS, ("BLOCK_N",)),
                         ids=lambda c: "n{BLOCK_N}".format(**c.kwargs))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (64, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("linear", [False, True], ids=["matmul", "linear"])
def test_bsr_every_tile_config(config, dtype, block, linear):
    """Each BLOCK_N of the row kernel, both layouts, blocks under 64 rows (from BLOCK_N 64 on,
    the dot swapped: X's columns as its rows) and of 64."""
    gen = seeded("bsr-config", config.kwargs["BLOCK_N"], dtype, block, linear)
    M, K, N = 64, 64, config.kwargs["BLOCK_N"] + 5
    W = random_bsr(M, K, block, 0.6, dtype, gen)
    if linear:  # x [N, K] read as X = x.T, y [N, M] written as Y = y.T
        x = rand_dense(N, K, dtype=dtype, gen=gen)
        out = nan_like((N, M), dtype)
        bsr_mod._launch(W, x, out, N=N, x_t=True, stride_x=K, y_t=True, stride_y=M,
                        kernel=bsr_mod._bsr_kernel, **config.kwargs)
        assert_three_way(out, W, x, linear=True)
    else:
        X = rand_dense(K, N, dtype=dtype, gen=gen)
        out = nan_like((M, N), dtype)
        bsr_mod._launch(W, X, out, N=N, x_t=False, stride_x=N, y_t=False, stride_y=N,
                        kernel=bsr_mod._bsr_kernel, **config.kwargs)
        assert_three_way(out, W, X)


def test_bsr_pruning_keeps_fitting_configs():
    limit = 166912  # A100
    for n in (1, 7, 64, 1000, 5000):
        for br, bc in ((16, 16), (128, 128), (16, 128)):
            for elem in (2, 4):
                kept = bsr_mod.prune_bsr_configs(bsr_mod.BSR_CONFIGS, n, br, bc, elem, limit)
                assert kept
                assert all(bsr_mod.bsr_shared_bytes(c, br, bc, elem) <= limit for c in kept)
                assert all(c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))
                           for c in kept)


# --- inputs the launchers refuse -----------------------------------------------------------------

def _bad_inputs():
    gen = seeded("bad")
    csr = random_csr(32, 32, 0.3, torch.float32, gen)
    bsr = random_bsr(32, 32, (16, 16), 0.5, torch.float32, gen)
    X = rand_dense(32, 4, dtype=torch.float32, gen=gen)
    tiny_blocks = torch.randn(32, 32).to_sparse_bsr((8, 8)).to(DEVICE)
    batched = torch.randn(2, 16, 16).to_sparse_csr().to(DEVICE)
    return [
        ("csr", triton_csr_matmul, (bsr, X), {}, "layout"),
        ("csr", triton_csr_matmul, (X, X), {}, "layout"),
        ("csr", triton_csr_matmul, (batched, X), {}, "2-D"),
        ("csr", triton_csr_matmul, (csr, X[:31]), {}, "shape"),
        ("csr", triton_csr_matmul, (csr, X.half()), {}, "dtype"),
        ("csr", triton_csr_matmul, (csr.double(), X.double()), {}, "dtype"),
        ("csr", triton_csr_matmul, (csr, torch.randn(32, 8, device=DEVICE)[:, ::2]), {},
         "contiguous"),
        ("csr", triton_csr_matmul, (csr, X.to("meta")), {}, "device"),
        ("csr", triton_csr_matmul, (csr, X), {"out": torch.empty(4, 32, device=DEVICE)},
         "shape"),
        ("csr", triton_csr_matmul, (csr, X), {"out": torch.empty(4, 32, device=DEVICE).t()},
         "contiguous"),
        ("csr", triton_csr_linear, (csr, torch.randn(4, 31, device=DEVICE)), {}, "shape"),
        ("csr", triton_csr_linear, (csr, torch.randn(32, 4, device=DEVICE).t()), {},
         "contiguous"),
        ("bsr", triton_bsr_matmul, (csr, X), {}, "layout"),
        ("bsr", triton_bsr_matmul, (tiny_blocks, X), {}, "block"),
        ("bsr", triton_bsr_matmul, (bsr, X.bfloat16()), {}, "dtype"),
        ("bsr", triton_bsr_linear, (bsr, X), {}, "shape"),
        ("bsr", triton_bsr_linear, (bsr, X.t().contiguous().to("meta")), {}, "device"),
    ]


@pytest.mark.parametrize("i", range(17))
def test_bad_inputs_raise_value_error(i):
    cases = _bad_inputs()
    assert len(cases) == 17
    _, fn, args, kwargs, word = cases[i]
    with pytest.raises(ValueError, match=word):
        fn(*args, **kwargs)


def test_empty_dimensions():
    W = random_csr(8, 16, 0.5, torch.float32, seeded("empty"))
    assert triton_csr_matmul(W, torch.randn(16, 0, device=DEVICE)).shape == (8, 0)
    assert triton_csr_linear(W, torch.randn(0, 16, device=DEVICE)).shape == (0, 8)


# --- packaging -----------------------------------------------------------------------------------

def test_docstring_examples_run():
    for module in (csr_mod, bsr_mod):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_kernels_import_without_triton():
    """sparse_lth.kernels imports where triton is missing; the Triton entry points then say so."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, sparse_lth.kernels as k\n"
        "assert not k.has_triton()\n"
        "try:\n"
        "    k.triton_csr_matmul(None, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
