"""kernels/bsr_tma.py, the Hopper BSR kernel (tensor descriptors, persistent grid), against the
fp64 references on Triton's CPU interpreter: every config's tile, both layouts, rows of very
different lengths walked by a persistent grid, and the launcher's routing and its limits.

Under the interpreter a persistent config runs 2 x WAVES programs, so each walks several tiles.
Outputs are poisoned with NaN first, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import (DEVICE, DTYPES, IDS, QUIET_SPARSE_WARNINGS, nan_like, rand_dense,
                          require_kernel_runtime, seeded)

require_kernel_runtime()

from test_triton_kernels import assert_three_way, random_bsr  # noqa: E402

from sparse_lth.kernels import bsr as bsr_mod  # noqa: E402
from sparse_lth.kernels import bsr_tma  # noqa: E402
from sparse_lth.kernels import triton_bsr_linear, triton_bsr_matmul  # noqa: E402

pytestmark = QUIET_SPARSE_WARNINGS

TILES = sorted({(c.kwargs["BLOCK_N"], c.kwargs["WAVES"]) for c in bsr_tma.TMA_CONFIGS})


def _run_config(W, X, *, block_n: int, waves: int, x_t: bool = False) -> torch.Tensor:
    M, K = W.shape
    N = X.shape[0] if x_t else X.shape[1]
    out = nan_like((N, M) if x_t else (M, N), X.dtype)
    bsr_tma.launch_bsr_tma(W, X, out, N=N, x_t=x_t, y_t=x_t, stride_y=M if x_t else N,
                           kernel=bsr_tma._bsr_tma_kernel, BLOCK_N=block_n, WAVES=waves)
    return out


@pytest.mark.parametrize("block_n,waves", TILES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_every_tile_matches_reference(block_n, waves, dtype):
    gen = seeded("bsr-tma", block_n, waves, dtype)
    M, K, N = 96, 64, block_n + 24  # a partial last tile: the copy engine zero-fills it
    W = random_bsr(M, K, (16, 16), 0.5, dtype, gen, empty_block_rows=1)
    X = rand_dense(K, N, dtype=dtype, gen=gen)
    assert_three_way(_run_config(W, X, block_n=block_n, waves=waves), W, X)


@pytest.mark.parametrize("block", [(32, 32), (16, 64), (64, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_linear_layout_reads_x_by_rows(block, dtype):
    gen = seeded("bsr-tma-linear", block, dtype)
    M, K, N = 128, 128, 40
    W = random_bsr(M, K, block, 0.4, dtype, gen, empty_block_rows=1)
    x = rand_dense(N, K, dtype=dtype, gen=gen)
    y = _run_config(W, x, block_n=64, waves=1, x_t=True)
    assert_three_way(y, W, x, linear=True)


def test_persistent_grid_walks_unbalanced_rows():
    """One block row holds every block column, the others one or none: the persistent grid (2
    programs here) must still cover every tile once, longest row first."""
    gen = seeded("bsr-tma-unbalanced")
    br = bc = 16
    keep = torch.zeros(8, 6, dtype=torch.bool)
    keep[5] = True
    keep[0, 2] = keep[3, 0] = True
    mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    W = (torch.randn(8 * br, 6 * bc, generator=gen) * mask).to_sparse_bsr((br, bc)).to(DEVICE)
    X = rand_dense(6 * bc, 152, dtype=torch.float32, gen=gen)
    out = _run_config(W, X, block_n=64, waves=1)
    assert_three_way(out, W, X)
    assert torch.equal(out[16:48], torch.zeros_like(out[16:48]))  # rows with no blocks


def test_public_functions_route_wide_aligned_problems_here(monkeypatch):
    """triton_bsr_matmul / _linear send N > 16 with aligned operands and blocks of 64 rows or
    more to this kernel, and keep the cp.async kernel for narrow N, shorter blocks and rows
    whose stride TMA cannot take; path="tma" forces it where it fits, and is refused where
    not."""
    calls = []
    real = bsr_tma.launch_bsr_tma
    monkeypatch.setattr(bsr_mod, "launch_bsr_tma",
                        lambda *a, **k: calls.append(k["N"]) or real(*a, **k))
    gen = seeded("bsr-tma-route")
    W = random_bsr(128, 128, (64, 16), 0.5, torch.float16, gen)
    X = rand_dense(128, 40, dtype=torch.float16, gen=gen)
    assert_three_way(triton_bsr_matmul(W, X), W, X)
    x = rand_dense(24, 128, dtype=torch.float16, gen=gen)
    assert_three_way(triton_bsr_linear(W, x), W, x, linear=True)
    assert calls == [40, 24]
    odd = rand_dense(128, 41, dtype=torch.float16, gen=gen)  # 82-byte rows: not TMA's
    assert not bsr_tma.tma_fits(W, odd, x_t=False)
    assert_three_way(triton_bsr_matmul(W, odd), W, odd)
    assert_three_way(triton_bsr_matmul(W, X[:, :8].contiguous()), W, X[:, :8].contiguous())
    with pytest.raises(ValueError, match="path='tma'"):
        triton_bsr_matmul(W, odd, path="tma")
    assert calls == [40, 24]
    short = random_bsr(128, 128, (16, 16), 0.5, torch.float16, gen)  # 16-row blocks: cp.async
    assert_three_way(triton_bsr_matmul(short, X), short, X)
    assert calls == [40, 24]
    assert_three_way(triton_bsr_matmul(short, X, path="tma"), short, X)
    assert calls == [40, 24, 40]


def test_shared_memory_estimate_prunes_to_the_limit():
    for br, bc in ((64, 64), (128, 128), (128, 32)):
        for elem in (2, 4):
            for n in (17, 64, 256, 4096):
                kept = bsr_tma.prune_tma_configs(bsr_tma.TMA_CONFIGS, n, br, bc, elem, 232448)
                assert kept
                assert all(bsr_tma.tma_shared_bytes(c, br, bc, elem) <= 232448 for c in kept)
    # 128 x 128 fp32 blocks with 256-wide X tiles need 3 x 192 KB: never kept
    big = bsr_tma.prune_tma_configs(bsr_tma.TMA_CONFIGS, 4096, 128, 128, 4, 232448)
    assert all(c.kwargs["BLOCK_N"] < 256 or c.num_stages < 5 for c in big)


def test_no_two_configs_alike():
    seen = {(c.kwargs["BLOCK_N"], c.kwargs["WAVES"], c.num_warps, c.num_stages)
            for c in bsr_tma.TMA_CONFIGS}
    assert len(seen) == len(bsr_tma.TMA_CONFIGS)
    assert all(c.num_stages % 2 == 1 for c in bsr_tma.TMA_CONFIGS)  # even ones duplicate odd
