"""The split-by-blocks BSR decode kernel (kernels/bsr_decode.py) against the fp64 reference.

Without a GPU these run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET),
which runs the programs one after another: the split rows' slots and arrival counters are still
exercised (every split row is summed by its last contributor, and the counters must end at
zero), though not their concurrency. Shapes stay small; every output is NaN-poisoned first.
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

from sparse_lth.kernels import bsr as bsr_mod  # noqa: E402
from sparse_lth.kernels import bsr_decode  # noqa: E402
from sparse_lth.kernels import triton_bsr_linear, triton_bsr_matmul  # noqa: E402
from sparse_lth.kernels.reference import (  # noqa: E402
    sparse_linear_reference,
    sparse_matmul_reference,
)

pytestmark = QUIET_SPARSE_WARNINGS


def random_bsr(block_rows: int, block_cols: int, block: tuple[int, int], density: float,
               dtype: torch.dtype, gen: torch.Generator, *, empty_block_rows: int = 0,
               heavy_row: bool = False, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A random BSR matrix of block_rows x block_cols blocks; ``heavy_row`` puts every block
    column in one row and thins the rest, so that row spans many programs' ranges."""
    br, bc = block
    keep = torch.rand(block_rows, block_cols, generator=gen) < density
    if empty_block_rows:
        keep[torch.randperm(block_rows, generator=gen)[:empty_block_rows]] = False
    if heavy_row:
        keep[:] = False
        keep[block_rows // 2] = True
        keep[0, 0] = True
    mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    dense = torch.randn(block_rows * br, block_cols * bc, generator=gen) * mask
    W = dense.to(dtype).to_sparse_bsr(block)
    if index_dtype != torch.int64:
        W = torch.sparse_bsr_tensor(W.crow_indices().to(index_dtype),
                                    W.col_indices().to(index_dtype), W.values(), W.shape)
    return W.to(DEVICE)


def check(out: torch.Tensor, W: torch.Tensor, X: torch.Tensor, *, linear: bool = False) -> None:
    ref = sparse_linear_reference if linear else sparse_matmul_reference
    assert_within_three_way(out, ref(W, X, dtype=torch.float64), ref(W, X, dtype=X.dtype),
                            X.dtype)


def counters_are_zero() -> bool:
    """Every launch must leave the arrival counters it used at zero (the next one relies on
    it)."""
    return all(int(c.abs().sum()) == 0 for c in bsr_decode._counters.values())


# --- against the reference ----------------------------------------------------------------------

BLOCKS = [(16, 16), (32, 32), (64, 64), (16, 128), (128, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_matches_reference(dtype, block):
    """Every N the issue names, in both layouts, with an empty block row; the launcher's
    (interpreter) grid of a few programs splits rows between them."""
    gen = seeded("decode", dtype, block)
    W = random_bsr(4, 3, block, 0.6, dtype, gen, empty_block_rows=1)
    M, K = W.shape
    for N in (1, 5):
        X = rand_dense(K, N, dtype=dtype, gen=gen)
        check(triton_bsr_matmul(W, X, out=nan_like((M, N), dtype), path="decode"), W, X)
    for N in (2, 16):
        x = rand_dense(N, K, dtype=dtype, gen=gen)
        check(triton_bsr_linear(W, x, out=nan_like((N, M), dtype), path="decode"), W, x,
              linear=True)
    assert counters_are_zero()


@pytest.mark.parametrize("n_sm", [1, 2, 5, 64])
@pytest.mark.parametrize("case", ["heavy_row", "empty_rows"])
def test_every_split_of_the_rows(n_sm, case):
    """One program for everything (n_sm=1, PPS=1) up to one program per block (n_sm=64): a
    row holding most blocks is cut among many programs, and runs of empty rows fall at range
    boundaries. int32 indices, fp16, both layouts."""
    gen = seeded("split", n_sm, case)
    W = random_bsr(9, 12, (16, 16), 0.5, torch.float16, gen, heavy_row=case == "heavy_row",
                   empty_block_rows=4 if case == "empty_rows" else 0, index_dtype=torch.int32)
    M, K = W.shape
    for pps, u in ((1, 1), (2, 4)):
        config = dict(PPS=pps, U=u, num_warps=4)
        X = rand_dense(K, 3, dtype=torch.float16, gen=gen)
        out = nan_like((M, 3), torch.float16)
        bsr_decode.launch_bsr_decode(W, X, out, N=3, x_t=False, stride_x=3, y_t=False, stride_y=3,
                           config=config, n_sm=n_sm)
        check(out, W, X)
        x = rand_dense(16, K, dtype=torch.float16, gen=gen)
        y = nan_like((16, M), torch.float16)
        bsr_decode.launch_bsr_decode(W, x, y, N=16, x_t=True, stride_x=K, y_t=True, stride_y=M,
                           config=config, n_sm=n_sm)
        check(y, W, x, linear=True)
    assert counters_are_zero()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_every_config(dtype):
    """Each config the launcher may pick for 32 x 32 blocks (blocks per step from 1 up,
    programs per SM), with int64 indices."""
    gen = seeded("configs", dtype)
    W = random_bsr(5, 6, (32, 32), 0.7, dtype, gen, empty_block_rows=1)
    M, K = W.shape
    elem = torch.finfo(dtype).bits // 8
    configs = bsr_decode.decode_configs(bsr_decode.DECODE_CONFIGS, 2, 32, 32, elem)
    assert len({c.kwargs["U"] for c in configs}) > 1  # several step sizes are covered
    for c in configs:
        X = rand_dense(K, 2, dtype=dtype, gen=gen)
        out = nan_like((M, 2), dtype)
        bsr_decode.launch_bsr_decode(W, X, out, N=2, x_t=False, stride_x=2, y_t=False, stride_y=2,
                           config=dict(c.kwargs, num_warps=c.num_warps))
        check(out, W, X)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_all_empty_matrix_writes_zeros(dtype):
    W = random_bsr(3, 2, (32, 16), 0.0, dtype, seeded("empty", dtype))
    assert W.values().shape[0] == 0
    X = rand_dense(32, 5, dtype=dtype, gen=seeded("empty-x", dtype))
    out = triton_bsr_matmul(W, X, out=nan_like((96, 5), dtype), path="decode")
    assert torch.equal(out, torch.zeros_like(out))
    y = triton_bsr_linear(W, X.t().contiguous(), out=nan_like((5, 96), dtype), path="decode")
    assert torch.equal(y, torch.zeros_like(y))


def test_linear_shapes_and_transposed_x():
    """A linear layer's batched input [..., K] and its 1-D decode input; X as x.t()."""
    gen = seeded("linear-shapes")
    W = random_bsr(2, 4, (64, 16), 0.6, torch.bfloat16, gen)
    M, K = W.shape
    x = rand_dense(2, 3, K, dtype=torch.bfloat16, gen=gen)
    y = triton_bsr_linear(W, x, out=nan_like((2, 3, M), torch.bfloat16), path="decode")
    check(y, W, x, linear=True)
    check(triton_bsr_linear(W, x[0, 0], path="decode"), W, x[0, 0], linear=True)
    x2 = x.reshape(6, K)
    check(triton_bsr_matmul(W, x2.t(), path="decode"), W, x2.t())


def test_agrees_with_the_row_kernel():
    """Same problem through bsr.py's row kernel: the two agree to fp32 rounding."""
    gen = seeded("row-kernel")
    W = random_bsr(6, 5, (16, 32), 0.5, torch.float32, gen, empty_block_rows=2)
    X = rand_dense(W.shape[1], 7, dtype=torch.float32, gen=gen)
    rows = torch.empty(W.shape[0], 7, device=DEVICE)
    bsr_mod._launch(W, X, rows, N=7, x_t=False, stride_x=7, y_t=False, stride_y=7,
                    kernel=bsr_mod._bsr_kernel, BLOCK_N=16)
    torch.testing.assert_close(triton_bsr_matmul(W, X, path="decode"), rows, rtol=1e-5, atol=1e-5)


# --- configs -------------------------------------------------------------------------------------

def test_configs_fit_the_register_budget():
    for br in (16, 32, 64, 128):
        for bc in (16, 32, 64, 128):
            for np_ in (1, 2, 4, 8, 16):
                for elem in (2, 4):
                    kept = bsr_decode.decode_configs(bsr_decode.DECODE_CONFIGS, np_, br, bc, elem)
                    assert kept, (br, bc, np_, elem)
                    regs = [c.kwargs["U"] * br * bc // (16 // elem) * np_ // (32 * c.num_warps)
                            for c in kept]
                    # over budget only as the one fallback (one block per step, most warps)
                    assert all(r <= bsr_decode.ACC_REGS for r in regs) or (
                        len(kept) == 1 and kept[0].kwargs["U"] == 1), (br, bc, np_, elem, regs)


def test_grid_covers_the_blocks():
    for nnzb in (0, 1, 5, 131, 1000, 4096):
        for n_sm, pps in ((1, 1), (3, 2), (132, 4)):
            p = bsr_decode.programs(nnzb, n_sm, pps)
            chunk = max(-(-nnzb // (n_sm * pps)), 1)
            assert p >= 1 and (p - 1) * chunk < max(nnzb, 1) <= p * chunk
            assert p <= max(n_sm * pps, 1)


# --- inputs the launchers refuse -----------------------------------------------------------------

def _bad_inputs():
    gen = seeded("bad")
    bsr = random_bsr(2, 2, (16, 16), 0.5, torch.float32, gen)
    X = rand_dense(32, 4, dtype=torch.float32, gen=gen)
    csr = bsr.to_dense().to_sparse_csr()
    return [
        (triton_bsr_matmul, (csr, X), {}, "layout"),
        (triton_bsr_matmul, (torch.randn(32, 32).to_sparse_bsr((8, 8)).to(DEVICE), X), {},
         "block"),
        (triton_bsr_matmul, (bsr, X.half()), {}, "dtype"),
        (triton_bsr_matmul, (bsr, X[:31]), {}, "shape"),
        (triton_bsr_matmul, (bsr, X), {"out": torch.empty(4, 32, device=DEVICE)},
         "shape"),
        (triton_bsr_linear, (bsr, X), {}, "shape"),
        (triton_bsr_linear, (bsr, X.t().contiguous().to("meta")), {}, "device"),
    ]


@pytest.mark.parametrize("i", range(7))
def test_bad_inputs_raise_value_error(i):
    cases = _bad_inputs()
    assert len(cases) == 7
    fn, args, kwargs, word = cases[i]
    with pytest.raises(ValueError, match=word):
        fn(*args, **kwargs)


def test_bad_indices_are_refused():
    gen = seeded("bad-index")
    W = random_bsr(2, 2, (16, 16), 1.0, torch.float32, gen)
    col = W.col_indices().clone()
    col[0] = 5  # past the 2 block columns
    broken = torch.sparse_bsr_tensor(W.crow_indices(), col, W.values(), W.shape,
                                     check_invariants=False)
    with pytest.raises(ValueError, match="col"):
        triton_bsr_matmul(broken, rand_dense(32, 2, dtype=torch.float32, gen=gen))


def test_empty_n():
    W = random_bsr(2, 2, (16, 16), 0.5, torch.float32, seeded("empty-n"))
    assert triton_bsr_matmul(W, torch.randn(32, 0, device=DEVICE)).shape == (32, 0)
    assert triton_bsr_linear(W, torch.randn(0, 32, device=DEVICE)).shape == (0, 32)


def test_the_rule_sends_decode_sized_products_here():
    """N x BR <= 256 runs here, by hand: 16-row blocks to N = 16, 32 to 8, 64 to 4, 128 to 2;
    a wider N the row kernel (blocks under 64 rows never go to TMA). Bad paths are refused."""
    for br, widest in ((16, 16), (32, 8), (64, 4), (128, 2)):
        W = torch.randn(2 * br, 32).to_sparse_bsr((br, 16))
        assert bsr_mod.kernel_for(W, torch.randn(32, widest), widest, False) == "decode"
        assert bsr_mod.kernel_for(W, torch.randn(32, widest + 1), widest + 1, False) == "rows"
    W = random_bsr(2, 2, (16, 16), 0.5, torch.float32, seeded("paths"))
    X = rand_dense(32, 17, dtype=torch.float32, gen=seeded("paths-x"))
    with pytest.raises(ValueError, match="path must be one of"):
        triton_bsr_matmul(W, X, path="fast")
    with pytest.raises(ValueError, match="path must be one of"):  # even with nothing to compute
        triton_bsr_linear(W, torch.randn(0, 32, device=DEVICE), path="fast")
    with pytest.raises(ValueError, match="path='decode' takes N <= 16"):
        triton_bsr_matmul(W, X, path="decode")
    check(triton_bsr_matmul(W, X[:, :3].contiguous(), path="rows"), W, X[:, :3].contiguous())


def test_the_stress_script_runs_dry(tmp_path):
    """bench/gpu_stress.py, the prepared GPU stress of the join, end to end under the
    interpreter: every launch checked against float64, run twice, counters left at zero."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_stress.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "stress.json").read_text())
    assert report["summary"]["calls"] == 6 and report["summary"]["failures"] == 0
    assert all(c["reproducible"] and c["counters"] == 0 for c in report["cases"])
