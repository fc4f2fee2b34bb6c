"""dense <-> CSR / BSR <-> scipy: round trips, agreement with torch and scipy, validation."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_lth import formats
from sparse_lth.formats import (
    SparseWeight,
    check_format,
    from_scipy,
    nbytes,
    padded_shape,
    to_bsr,
    to_csr,
    to_dense,
    to_scipy,
    to_sparse_weight,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SETTINGS = settings(max_examples=40, deadline=None)
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (so -0.0 != +0.0 and NaN patterns count)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


@st.composite
def matrices(draw, max_side: int = 12) -> torch.Tensor:
    """Random matrices: 1xN, Nx1, ragged, empty rows / columns, all zero, fully dense, any dtype."""
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["zero", "dense", "sparse", "sparse"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[w == 0] = 1  # randn may round to 0 in low precision; keep "dense" dense
    if kind == "zero":
        w.zero_()
    elif kind == "sparse":
        w[torch.rand(rows, cols, generator=g) > draw(st.floats(0.05, 0.7))] = 0
        w[draw(st.integers(0, rows - 1))] = 0  # an empty row
        w[:, draw(st.integers(0, cols - 1))] = 0  # an empty column
    return w


# -- round trips --------------------------------------------------------------------------------
@SETTINGS
@given(matrices())
def test_csr_round_trip_matches_torch_and_scipy(w):
    x = to_csr(w)
    check_format(x, "w")
    assert x.crow_indices().dtype == torch.int32 and x.col_indices().dtype == torch.int32
    ref = w.to_sparse_csr()
    assert torch.equal(x.crow_indices().long(), ref.crow_indices())
    assert torch.equal(x.col_indices().long(), ref.col_indices())
    assert bits_equal(x.values(), ref.values())
    assert bits_equal(to_dense(x), w)
    a = to_scipy(x, upcast=True)
    assert isinstance(a, sp.csr_array) and a.has_canonical_format
    assert np.array_equal(a.toarray(), w.double().numpy())
    ref_sp = sp.csr_array(w.double().numpy())
    assert np.array_equal(a.indptr, ref_sp.indptr) and np.array_equal(a.indices, ref_sp.indices)
    assert bits_equal(to_dense(from_scipy(a, dtype=w.dtype)), w)


@SETTINGS
@given(matrices(), st.integers(1, 5), st.integers(1, 5))
def test_bsr_round_trip_matches_torch_and_scipy(w, br, bc):
    ragged = w.shape[0] % br or w.shape[1] % bc
    if ragged:
        with pytest.raises(ValueError, match="not a multiple of blocksize"):
            to_bsr(w, (br, bc), name="fc.weight")
    x = to_bsr(w, (br, bc), pad=True)
    check_format(x, "w")
    rows, cols = padded_shape(tuple(w.shape), (br, bc))
    assert tuple(x.shape) == (rows, cols)
    padded = torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))
    ref = padded.to_sparse_bsr((br, bc))
    assert torch.equal(x.crow_indices().long(), ref.crow_indices())
    assert torch.equal(x.col_indices().long(), ref.col_indices())
    assert bits_equal(x.values(), ref.values())
    assert bits_equal(to_dense(x, shape=tuple(w.shape)), w)
    assert bits_equal(to_dense(x), padded)
    a = to_scipy(x, upcast=True)
    assert isinstance(a, sp.bsr_array) and a.blocksize == (br, bc)
    assert np.array_equal(a.toarray(), padded.double().numpy())
    assert bits_equal(to_dense(from_scipy(a, dtype=w.dtype)), padded)


@SETTINGS
@given(matrices(), st.data())
def test_mask_picks_the_stored_entries(w, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(w.shape, generator=g) < data.draw(st.floats(0.0, 1.0))
    expected = w.masked_fill(~mask, 0)
    x = to_csr(w, mask=mask)
    assert x.values().numel() == int(mask.sum())  # alive zeros are stored too
    assert bits_equal(to_dense(x), expected)
    b = to_bsr(w, 2, mask=mask, pad=True)
    assert bits_equal(to_dense(b, shape=tuple(w.shape)), expected)


def test_signed_zero_reads_back_as_plus_zero():
    w = torch.tensor([[-0.0, 1.0], [0.0, -2.0]])
    assert to_csr(w).values().tolist() == [1.0, -2.0]
    assert bits_equal(to_dense(to_csr(w)), torch.tensor([[0.0, 1.0], [0.0, -2.0]]))


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 10), (9,), (1, 1)])
@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 4), ("bsr", (2, 8))])
def test_sparse_weight_any_rank(shape, fmt, block):
    w = torch.randn(shape)
    w[w.abs() < 0.8] = 0
    sw = to_sparse_weight(w, fmt, block, name="conv.weight")
    assert sw.shape == tuple(shape) and sw.format == fmt
    assert bits_equal(sw.to_dense(), w)
    assert sw.blocksize == (formats._blocksize(block, "b") if block else None)
    assert 0.0 <= sw.density() <= 1.0
    assert nbytes(sw) == nbytes(sw.matrix)


# -- scipy sharing, dtypes, bytes ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_scipy_shares_buffers(dtype, fmt):
    w = torch.randn(8, 12).to(dtype)
    w[w.abs() < 1] = 0
    x = to_csr(w) if fmt == "csr" else to_bsr(w, (2, 4))
    a = to_scipy(x)
    assert a.dtype == np.dtype(str(dtype).removeprefix("torch."))
    assert np.shares_memory(a.data, x.values().numpy())
    assert np.shares_memory(a.indices, x.col_indices().numpy())
    assert np.shares_memory(a.indptr, x.crow_indices().numpy())
    y = from_scipy(a)
    assert np.shares_memory(a.data, y.values().numpy())
    assert np.shares_memory(a.indices, y.col_indices().numpy())


def test_int64_indices_kept_and_shared():
    w = torch.randn(5, 7)
    x = to_csr(w, index_dtype=torch.int64)
    a = to_scipy(x)
    assert a.indices.dtype == np.int64 and np.shares_memory(a.indices, x.col_indices().numpy())
    assert from_scipy(a).crow_indices().dtype == torch.int64
    assert formats._index_dtype(10, (2**31, 4)) == torch.int64
    assert formats._index_dtype(2**31, (4, 4)) == torch.int64
    assert formats._index_dtype(2**31 - 1, (4, 4)) == torch.int32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_to_scipy_warns_and_upcasts(dtype):
    w = torch.randn(4, 4).to(dtype)
    x = to_csr(w)
    with pytest.warns(UserWarning, match=str(dtype)):
        a = to_scipy(x)
    assert a.dtype == np.float32 and np.array_equal(a.toarray(), w.float().numpy())
    assert np.shares_memory(a.indices, x.col_indices().numpy())  # only the values are copied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_scipy(x, upcast=True)
    y = from_scipy(a, dtype=dtype)
    assert y.dtype == dtype and bits_equal(to_dense(y), w)


def test_from_scipy_canonicalizes_and_converts():
    data = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    a = sp.csr_array((data, np.array([2, 2, 0], np.int32), np.array([0, 2, 3], np.int32)), shape=(2, 3))
    assert not a.has_canonical_format
    x = from_scipy(a)
    check_format(x)
    assert to_dense(x).tolist() == [[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]
    coo = sp.coo_array(np.array([[0, 1.5], [2.5, 0]], dtype=np.float64))
    assert to_dense(from_scipy(coo)).tolist() == [[0.0, 1.5], [2.5, 0.0]]


def test_nbytes():
    w = torch.zeros(100, 100)
    w[0, :5] = 1.0
    x = to_csr(w)
    assert nbytes(w) == 40000
    assert nbytes(x) == 101 * 4 + 5 * 4 + 5 * 4
    assert nbytes(to_scipy(x)) == nbytes(x)
    assert nbytes({"a": w, "b": [x, w.numpy()]}) == 40000 + nbytes(x) + 40000
    b = to_bsr(w, 10)
    assert nbytes(b) == 11 * 4 + 1 * 4 + 100 * 4
    coo = sp.coo_array(w.numpy())
    assert nbytes(coo) == 5 * 4 + 2 * 5 * coo.coords[0].itemsize
    assert nbytes(w.to_sparse_coo()) == 2 * 5 * 8 + 5 * 4
    with pytest.raises(TypeError):
        nbytes("nope")


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weights_rejected(bad, dtype):
    w = torch.ones(3, 4, dtype=dtype)
    w[1, 2] = bad
    for make in (lambda: to_csr(w, name="fc1.weight"), lambda: to_bsr(w, 2, pad=True, name="fc1.weight")):
        with pytest.raises(ValueError, match=r"fc1\.weight: 1 non-finite value.*\(1, 2\)"):
            make()


def test_bad_shapes_masks_and_blocks():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"fc\.weight: expected a 2-D matrix, got shape \(2, 3, 4\)"):
        to_csr(torch.randn(2, 3, 4), name="fc.weight")
    with pytest.raises(ValueError, match=r"fc\.weight: mask has shape \(6, 4\), weight has \(4, 6\)"):
        to_csr(w, mask=torch.ones(6, 4, dtype=torch.bool), name="fc.weight")
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        to_csr(w, mask=torch.ones(4, 6), name="fc.weight")
    with pytest.raises(ValueError, match=r"fc\.weight: shape 4x6 is not a multiple of blocksize 4x4.*pad=True"):
        to_bsr(w, 4, name="fc.weight")
    for block in (0, -2, (2,), (2, 0), "4", (2.0, 2), True):
        with pytest.raises(ValueError, match="blocksize must be a positive int"):
            to_bsr(w, block, name="fc.weight")
    with pytest.raises(ValueError, match="values must be fp16, bf16, fp32 or fp64"):
        to_csr(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs a blocksize"):
        to_sparse_weight(w, "bsr")
    with pytest.raises(ValueError, match="only for format='bsr'"):
        to_sparse_weight(w, "csr", 4)
    with pytest.raises(ValueError, match="format must be 'csr' or 'bsr'"):
        to_sparse_weight(w, "coo")
    with pytest.raises(ValueError, match="must be 8x6"):
        SparseWeight(to_bsr(w, 2), (8, 6))


def _raw_csr(crow, col, values, size):
    return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col), torch.tensor(values, dtype=torch.float32),
                                   size, check_invariants=False)


@pytest.mark.parametrize("crow,col,size,message", [
    ([0, 1], [0], (2, 3), r"crow_indices has 2 entries, expected 3"),
    ([1, 1, 1], [0], (2, 3), r"crow_indices\[0\] is 1, must be 0"),
    ([0, 1, 2], [0], (2, 3), r"crow_indices\[-1\] is 2, must equal the number of stored entries 1"),
    ([0, 2, 1, 2], [0, 1], (3, 3), r"crow_indices decreases at row 1"),
    ([0, 1, 2], [0, 3], (2, 3), r"column index 3 at position 1 \(row 1\) is out of range \[0, 3\)"),
    ([0, 2, 2], [2, 1], (2, 3), r"row 0 is not canonical at position 1: column 2 then 1"),
    ([0, 2, 2], [1, 1], (2, 3), r"row 0 is not canonical at position 1: column 1 then 1"),
])
def test_check_format_names_the_problem(crow, col, size, message):
    x = _raw_csr(crow, col, [1.0] * len(col), size)
    with pytest.raises(ValueError, match=r"fc\.weight \(%dx%d\): " % size + message):
        check_format(x, "fc.weight")


def test_check_format_bsr_names_block_rows():
    values = torch.ones(2, 2, 2)
    x = torch.sparse_bsr_tensor(torch.tensor([0, 2, 2]), torch.tensor([1, 0]), values, (4, 4), check_invariants=False)
    with pytest.raises(ValueError, match=r"fc\.weight \(2x2 blocks\): block row 0 is not canonical"):
        check_format(x, "fc.weight")


def test_check_format_rejects_non_finite_values_and_bad_scipy():
    x = _raw_csr([0, 1], [0], [float("nan")], (1, 2))
    with pytest.raises(ValueError, match=r"fc\.weight values: 1 non-finite"):
        check_format(x, "fc.weight")
    with pytest.raises(ValueError, match=r"fc\.weight \(1x2\): 1 column indices but 2 stored values"):
        formats._check_compressed(np.array([0, 1]), np.array([0]), 1, 2, 2, "fc.weight")
    a = sp.csr_array((np.array([1.0]), np.array([5], np.int32), np.array([0, 1], np.int32)), shape=(1, 2))
    with pytest.raises(ValueError, match=r"emb \(1x2\): column index 5 at position 0 \(row 0\) is out of range"):
        from_scipy(a, name="emb")
    with pytest.raises(ValueError, match="float16, float32 or float64"):
        from_scipy(sp.csr_array(np.eye(2, dtype=np.int64)))
    with pytest.raises(TypeError):
        from_scipy(np.eye(2))


def test_formats_is_data_only():
    tree = ast.parse(Path(formats.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    forbidden = ("sparse_lth.training", "sparse_lth.lottery", "sparse_lth.kernels", "kernels", "triton")
    assert not {m for m in imported if m.startswith(forbidden)}


def test_bsr_padding_beyond_available_memory_is_refused(monkeypatch):
    w = torch.randn(300, 784)
    # A block far beyond the matrix: 10^12 padded entries x (fp32 weight + bool pattern + fp32 blocks).
    with pytest.raises(ValueError, match=r"fc1\.weight: padding 300x784 to whole 1000000x1000000 blocks "
                                         rf"\(1000000x1000000\) would need {9 * 10**12:,} bytes of memory, "
                                         r"but only [\d,]+ are available; use a smaller block"):
        to_bsr(w, 10**6, pad=True, name="fc1.weight")
    with pytest.raises(ValueError, match="would need"):
        to_sparse_weight(w, "bsr", 10**6, name="fc1.weight")
    # The limit is the machine's: with 1 MB available, padding 300x784 to 512x1024 (4.7 MB) is refused,
    # and a block that divides the matrix needs no padding, hence no check.
    monkeypatch.setattr(formats, "_available_memory", lambda: 1_000_000)
    with pytest.raises(ValueError, match=rf"would need {512 * 1024 * 9:,} bytes of memory, but only 1,000,000"):
        to_bsr(w, (256, 256), pad=True)
    assert torch.equal(to_dense(to_bsr(w, (100, 112))), w)
    monkeypatch.setattr(formats, "_available_memory", lambda: None)  # unknown: no refusal
    assert torch.equal(to_dense(to_bsr(w, (256, 256), pad=True), shape=(300, 784)), w)


def test_available_memory_reads_the_machine():
    available = formats._available_memory()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next(l for l in meminfo.read_text().splitlines() if l.startswith("MemAvailable:"))
        reference = int(line.split()[1]) * 1024
        assert abs(available - reference) < 0.25 * reference  # read moments apart on a busy machine
    assert available is None or available > 0


def test_building_bsr_tensors_never_shows_torchs_beta_notice():
    """formats._make keeps torch's once-per-process "BSR is beta" notice from users (in a fresh
    process, with every warning an error), however many tensors it builds."""
    import subprocess
    import sys

    bsr = "_make(torch.sparse_bsr, torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 2, 2), (2, 2))"
    csr = "_make(torch.sparse_csr, torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1))"
    for first, second in ((bsr, csr), (csr, bsr)):  # torch's one notice names the first layout built
        code = f"import torch\nfrom sparse_lth.formats import _make\nfor _ in range(3):\n    {first}\n    {second}\n"
        proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
