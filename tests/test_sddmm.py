"""Triton SDDMM kernels (kernels/sddmm.py: a sparse linear layer's weight gradient, ``dy.T @ x``
sampled at W's pattern) against the fp64 reference (kernels/reference.py).

Without a GPU these run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes stay small; every output is poisoned with NaN first so an unwritten element fails.
"""

from __future__ import annotations

import doctest

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

from sparse_lth.kernels import triton_bsr_sddmm, triton_csr_sddmm  # noqa: E402
from sparse_lth.kernels import sddmm as sddmm_mod  # noqa: E402
from sparse_lth.kernels.reference import sddmm_reference  # noqa: E402

pytestmark = QUIET_SPARSE_WARNINGS


# --- helpers ------------------------------------------------------------------------------------

def csr_pattern(M: int, K: int, density: float, gen: torch.Generator, *, empty_rows: int = 0,
                index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.rand(M, K, generator=gen) < density
    if empty_rows:
        keep[torch.randperm(M, generator=gen)[:empty_rows]] = False
    W = keep.float().to_sparse_csr()
    return (W.crow_indices().to(index_dtype).to(DEVICE),
            W.col_indices().to(index_dtype).to(DEVICE))


def bsr_pattern(M: int, K: int, block: tuple[int, int], density: float, gen: torch.Generator, *,
                empty_block_rows: int = 0, index_dtype: torch.dtype = torch.int64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block indices: a CSR pattern over the [M / br, K / bc] grid of blocks."""
    return csr_pattern(M // block[0], K // block[1], density, gen, empty_rows=empty_block_rows,
                       index_dtype=index_dtype)



def operands(N: int, M: int, K: int, dtype: torch.dtype, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's output gradient dy [N, M] and input x [N, K]."""
    return rand_dense(N, M, dtype=dtype, gen=gen), rand_dense(N, K, dtype=dtype, gen=gen)



def assert_three_way(out, crow, col, dy, x, blocksize=None) -> None:
    """The three-way rule (kernel_cases.assert_within_three_way) against the fp64 reference."""
    assert_within_three_way(out, sddmm_reference(crow, col, dy, x, blocksize),
                      sddmm_reference(crow, col, dy, x, blocksize, dtype=x.dtype), x.dtype)


# --- CSR ----------------------------------------------------------------------------------------

CSR_SHAPES = [(1, 1, 1), (37, 53, 19), (48, 96, 70)]  # M, K, N (N ragged against BLOCK_N)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("M,K,N", CSR_SHAPES)
def test_csr_sddmm_matches_reference(dtype, M, K, N):
    gen = seeded("csr", dtype, M, K, N)
    crow, col = csr_pattern(M, K, 0.3 if M > 1 else 1.0, gen, empty_rows=M // 4)
    dy, x = operands(N, M, K, dtype, gen)
    out = triton_csr_sddmm(crow, col, dy, x, out=nan_like((col.numel(),), dtype))
    assert_three_way(out, crow, col, dy, x)


@pytest.mark.parametrize("index", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_csr_sddmm_long_rows_and_index_types(index):
    """Rows far longer than any BLOCK_NNZ (and one empty), so chunks span row boundaries."""
    gen = seeded("csr-long", index)
    crow, col = csr_pattern(5, 700, 0.9, gen, empty_rows=1, index_dtype=index)
    dy, x = operands(9, 5, 700, torch.float16, gen)
    assert_three_way(triton_csr_sddmm(crow, col, dy, x), crow, col, dy, x)


def test_csr_sddmm_unsorted_columns():
    gen = seeded("csr-unsorted")
    crow, col = csr_pattern(12, 30, 0.4, gen)
    col = col.clone()
    for r in range(12):
        s, e = crow[r].item(), crow[r + 1].item()
        col[s:e] = col[s:e].flip(0)
    dy, x = operands(6, 12, 30, torch.float32, gen)
    assert_three_way(triton_csr_sddmm(crow, col, dy, x), crow, col, dy, x)


@pytest.mark.parametrize("config", sddmm_mod.CSR_SDDMM_CONFIGS,
                         ids=lambda c: "n{BLOCK_N}-nnz{BLOCK_NNZ}".format(**c.kwargs))
def test_csr_sddmm_every_config(config):
    """The interpreter runs one pruned config; run each tile directly, with ragged N and nnz."""
    gen = seeded("csr-config", tuple(config.kwargs.items()))
    M, K, N = 7, 90, config.kwargs["BLOCK_N"] + 3
    crow, col = csr_pattern(M, K, 0.5, gen, empty_rows=1)
    dy, x = operands(N, M, K, torch.bfloat16, gen)
    out = nan_like((col.numel(),), torch.bfloat16)
    sddmm_mod._launch(crow, col, dy, x, out, None, kernel=sddmm_mod._csr_sddmm_kernel,
                      **config.kwargs)
    assert_three_way(out, crow, col, dy, x)


def test_csr_sddmm_pruning():
    for n in (1, 5, 64, 5000):
        for nnz in (1, 40, 10**6):
            kept = sddmm_mod.prune_csr_sddmm_configs(sddmm_mod.CSR_SDDMM_CONFIGS, n, nnz)
            assert kept
            assert all(c.kwargs["BLOCK_N"] <= max(8, triton.next_power_of_2(n)) for c in kept)
    wide = sddmm_mod.prune_csr_sddmm_configs(sddmm_mod.CSR_SDDMM_CONFIGS, 5000, 10**6)
    assert wide == sddmm_mod.CSR_SDDMM_CONFIGS


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
def test_bsr_sddmm_matches_reference(dtype, M, K, N, block):
    gen = seeded("bsr", dtype, M, K, N, block)
    rows = M // block[0]
    crow, col = bsr_pattern(M, K, block, 0.6 if rows > 1 else 1.0, gen,
                            empty_block_rows=1 if rows > 1 else 0)
    dy, x = operands(N, M, K, dtype, gen)
    out = triton_bsr_sddmm(crow, col, block, dy, x, out=nan_like((col.numel(), *block), dtype))
    assert_three_way(out, crow, col, dy, x, block)


def _one_per_block_n(configs):
    seen = {}
    for c in configs:
        seen.setdefault(c.kwargs["BLOCK_N"], c)
    return list(seen.values())


@pytest.mark.parametrize("config", _one_per_block_n(sddmm_mod.BSR_SDDMM_CONFIGS),
                         ids=lambda c: "n{BLOCK_N}".format(**c.kwargs))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
def test_bsr_sddmm_every_tile(config, dtype):
    """Each BLOCK_N directly, N ragged against it (more than one trip of the N loop)."""
    gen = seeded("bsr-config", config.kwargs["BLOCK_N"], dtype)
    N = config.kwargs["BLOCK_N"] + 5
    crow, col = bsr_pattern(32, 64, (16, 32), 0.6, gen)
    dy, x = operands(N, 32, 64, dtype, gen)
    out = nan_like((col.numel(), 16, 32), dtype)
    sddmm_mod._launch(crow, col, dy, x, out, (16, 32), kernel=sddmm_mod._bsr_sddmm_kernel,
                      **config.kwargs)
    assert_three_way(out, crow, col, dy, x, (16, 32))


@pytest.mark.parametrize("index", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_bsr_sddmm_index_types_and_empty_block_rows(index):
    gen = seeded("bsr-index", index)
    crow, col = bsr_pattern(64, 48, (16, 16), 0.5, gen, empty_block_rows=2, index_dtype=index)
    dy, x = operands(21, 64, 48, torch.float32, gen)
    assert_three_way(triton_bsr_sddmm(crow, col, (16, 16), dy, x), crow, col, dy, x, (16, 16))


def test_bsr_sddmm_pruning_fits():
    limit = 166912  # A100
    for n in (1, 7, 64, 5000):
        for br, bc in ((16, 16), (128, 128), (16, 128), (128, 32)):
            for elem in (2, 4):
                kept = sddmm_mod.prune_bsr_sddmm_configs(sddmm_mod.BSR_SDDMM_CONFIGS, n, br, bc,
                                                         elem, limit)
                assert kept
                assert all(sddmm_mod.bsr_sddmm_shared_bytes(c, br, bc, elem) <= limit
                           for c in kept)
                assert all(c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))
                           for c in kept)
                assert all(br * bc <= 64 * 32 * c.num_warps for c in kept)


# --- empty problems -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_empty_problems(dtype):
    gen = seeded("empty", dtype)
    crow, col = csr_pattern(6, 10, 0.5, gen)
    dy0, x0 = torch.empty(0, 6, dtype=dtype, device=DEVICE), torch.empty(0, 10, dtype=dtype,
                                                                         device=DEVICE)
    out = triton_csr_sddmm(crow, col, dy0, x0, out=nan_like((col.numel(),), dtype))  # N = 0
    assert torch.equal(out, torch.zeros_like(out))
    assert_three_way(triton_csr_sddmm(crow, col, dy0, x0), crow, col, dy0, x0)
    none = torch.zeros(7, dtype=torch.int64, device=DEVICE)  # nnz = 0
    empty_col = torch.empty(0, dtype=torch.int64, device=DEVICE)
    dy, x = operands(4, 6, 10, dtype, gen)
    assert triton_csr_sddmm(none, empty_col, dy, x).shape == (0,)
    zero_m = torch.zeros(1, dtype=torch.int64, device=DEVICE)  # M = 0
    assert triton_csr_sddmm(zero_m, empty_col, dy[:, :0], x).shape == (0,)
    assert triton_csr_sddmm(none, empty_col, dy, x[:, :0]).shape == (0,)  # K = 0

    bcrow, bcol = bsr_pattern(32, 32, (16, 16), 1.0, gen)
    bdy0, bx0 = torch.empty(0, 32, dtype=dtype, device=DEVICE), torch.empty(0, 32, dtype=dtype,
                                                                            device=DEVICE)
    bout = triton_bsr_sddmm(bcrow, bcol, (16, 16), bdy0, bx0,
                            out=nan_like((bcol.numel(), 16, 16), dtype))
    assert torch.equal(bout, torch.zeros_like(bout))
    bnone = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    bempty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    bdy, bx = operands(3, 32, 32, dtype, gen)
    assert triton_bsr_sddmm(bnone, bempty, (16, 16), bdy, bx).shape == (0, 16, 16)


# --- inputs the launchers refuse -----------------------------------------------------------------

def _bad_inputs():
    gen = seeded("bad")
    crow, col = csr_pattern(8, 12, 0.5, gen)
    dy, x = operands(4, 8, 12, torch.float32, gen)
    bcrow, bcol = bsr_pattern(32, 32, (16, 16), 0.6, gen)
    bdy, bx = operands(4, 32, 32, torch.float32, gen)
    far = col.clone()
    far[-1] = 12
    falling = crow.clone()
    falling[1] = crow[-1]
    csr, bsr = triton_csr_sddmm, triton_bsr_sddmm
    return [
        (csr, (crow, col, dy, x.half()), {}, "dtype"),
        (csr, (crow, col, dy.double(), x.double()), {}, "dtype"),
        (csr, (crow.float(), col, dy, x), {}, "int32 or int64"),
        (csr, (crow[None], col, dy, x), {}, "1-D"),
        (csr, (crow, col, dy[None], x), {}, "2-D"),
        (csr, (crow, col, dy, rand_dense(12, 4, dtype=torch.float32, gen=gen).t()), {},
         "contiguous"),
        (csr, (crow, col, dy, x[:3]), {}, "one N"),
        (csr, (crow, col, dy[:, :7].contiguous(), x), {}, "expected"),
        (csr, (crow, col, dy, x.to("meta")), {}, "device"),
        (csr, (crow, col, dy.to("meta"), x.to("meta")), {}, "device"),
        (csr, (crow, col, dy, x), {"out": torch.empty(3, device=DEVICE)}, "shape"),
        (csr, (crow, col, dy, x), {"out": torch.empty(col.numel(), device=DEVICE).half()},
         "out must be"),
        (csr, (crow, far, dy, x), {}, "out of range"),
        (csr, (falling, col, dy, x), {}, "decreases"),
        (bsr, (bcrow, bcol, (8, 8), bdy, bx), {}, "power of two"),
        (bsr, (bcrow, bcol, (16,), bdy, bx), {}, "pair"),
        (bsr, (bcrow, bcol, (16, 16), bdy, bx[:, :24].contiguous()), {}, "whole number"),
        (bsr, (bcrow, bcol, (16, 16), bdy, bx.bfloat16()), {}, "dtype"),
        (bsr, (bcrow, bcol, (32, 16), bdy, bx), {}, "expected"),
        (bsr, (bcrow, bcol, (16, 16), bdy, bx), {"out": torch.empty(bcol.numel(), 16, 16,
                                                                    device=DEVICE)[:, :, :8]},
         "shape"),
    ]


N_BAD = 20


@pytest.mark.parametrize("i", range(N_BAD))
def test_bad_inputs_raise_value_error(i):
    cases = _bad_inputs()
    assert len(cases) == N_BAD
    fn, args, kwargs, word = cases[i]
    with pytest.raises(ValueError, match=word):
        fn(*args, **kwargs)


def test_check_invariants_false_skips_the_index_check(monkeypatch):
    """The opt-out for indices checked already: the value checks (kernels/invariants.py) are
    not run at all, and the product is the same."""
    from sparse_lth.kernels import invariants

    gen = seeded("no-check")
    crow, col = csr_pattern(4, 6, 0.5, gen)
    dy, x = operands(3, 4, 6, torch.float32, gen)
    checked = triton_csr_sddmm(crow, col, dy, x)

    def refuse(*args):
        raise AssertionError("index values checked despite check_invariants=False")

    monkeypatch.setattr(invariants, "_holds", refuse)
    out = triton_csr_sddmm(crow, col, dy, x, check_invariants=False)
    torch.testing.assert_close(out, checked, rtol=0, atol=0)
    bcrow, bcol = bsr_pattern(32, 32, (16, 16), 0.6, gen)
    bdy, bx = operands(3, 32, 32, torch.float32, gen)
    bout = triton_bsr_sddmm(bcrow, bcol, (16, 16), bdy, bx, check_invariants=False)
    assert_three_way(bout, bcrow, bcol, bdy, bx, (16, 16))


# --- packaging -----------------------------------------------------------------------------------

def test_autotuned_choice_is_memoized():
    gen = seeded("memo")
    crow, col = csr_pattern(20, 30, 0.3, gen)
    dy, x = operands(5, 20, 30, torch.float32, gen)
    first = triton_csr_sddmm(crow, col, dy, x)
    assert any(k[:2] == (20, 30) for k in sddmm_mod.tuned_csr_sddmm.chosen)
    torch.testing.assert_close(triton_csr_sddmm(crow, col, dy, x), first, rtol=0, atol=0)
    bcrow, bcol = bsr_pattern(48, 32, (16, 16), 0.6, gen)
    bdy, bx = operands(5, 48, 32, torch.float32, gen)
    triton_bsr_sddmm(bcrow, bcol, (16, 16), bdy, bx)
    assert any(k[:2] == (48, 32) for k in sddmm_mod.tuned_bsr_sddmm.chosen)
    assert_three_way(triton_bsr_sddmm(bcrow, bcol, (16, 16), bdy, bx), bcrow, bcol, bdy, bx,
                     (16, 16))


def test_docstring_examples_run():
    result = doctest.testmod(sddmm_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
