"""SparseLinear, sparsify / densify and the backend choice (sparse_lth/nn/linear.py, nn/convert.py, backends.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.backends import BACKENDS, choose_backend, sparse_linear, sparse_matmul
from sparse_lth.formats import to_sparse_weight
from sparse_lth.kernels import has_triton
from sparse_lth.masks import Mask
from sparse_lth.nn import DEFAULT_MAX_DENSITY, SparseConv1D, SparseLinear, SparseMultiheadAttention, densify, sparsify
from tolerances import TOLERANCE

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
]

CPU_BACKENDS = ["auto", "scipy", "torch", "numba", "dense"]


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    ).to(dtype)


def random_mask(model: nn.Module, density: float = 0.1, seed: int = 1) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(p.shape, generator=gen) < density
                 for n, p in model.named_parameters() if n.endswith("weight")})


def masked_copy(model: nn.Module, mask: Mask) -> nn.Module:
    dense = mlp(next(model.parameters()).dtype)
    dense.load_state_dict(model.state_dict())
    return mask.apply(dense)


INPUTS = [(5, 64), (2, 3, 64), (1, 64), (64,), (0, 64)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_sparsified_mlp_matches_masked_dense(fmt, backend):
    model = mlp()
    mask = random_mask(model)
    reference = masked_copy(model, mask)
    sparse = sparsify(model, mask, format=fmt, blocksize=16, backend=backend, max_density=1.0)
    assert [type(m) for m in sparse if not isinstance(m, nn.ReLU)] == [SparseLinear] * 3
    gen = torch.Generator().manual_seed(2)
    if backend == "numba" and fmt == "bsr":  # the numba kernel is CSR-only: a forced call says so
        with pytest.raises(ValueError, match="numba.*CSR"):
            sparse(torch.randn(5, 64, generator=gen))
        return
    for shape in INPUTS:
        x = torch.randn(shape, generator=gen)
        got, want = sparse(x), reference(x)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (shape, (got - want).abs().max())


def test_densify_round_trip_is_exact():
    model = mlp()
    mask = random_mask(model, 0.2)
    reference = masked_copy(model, mask)
    for fmt in ("csr", "bsr"):
        back = densify(sparsify(masked_copy(model, mask), mask, format=fmt, blocksize=32, max_density=1.0))
        assert all(type(m) in (nn.Linear, nn.ReLU) for m in back)
        for (name, p), (_, q) in zip(back.named_parameters(), reference.named_parameters()):
            assert torch.equal(p, q), name
        x = torch.randn(4, 64)
        assert torch.equal(back(x), reference(x))


def test_mask_pattern_is_kept_not_the_zeros():
    linear = nn.Linear(6, 4)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, :3] = True
    with torch.no_grad():
        linear.weight[0, 1] = 0.0  # alive but exactly zero: still stored
    layer = SparseLinear.from_linear(linear, mask=mask)
    assert layer.nnz == 3
    assert torch.equal(layer.dense_weight(), linear.weight.detach() * mask)


def test_threshold_picks_layers_from_mask_or_nonzeros():
    model = mlp()
    gen = torch.Generator().manual_seed(3)
    mask = Mask({"0.weight": torch.rand(300, 64, generator=gen) < 0.05,
                 "2.weight": torch.rand(100, 300, generator=gen) < 0.5})
    out = sparsify(model, mask, max_density=0.1)
    # 0: masked at 5% -> sparse; 2: masked at 50% -> dense; 4: not in the mask, dense weights -> dense
    assert [type(out[i]) for i in (0, 2, 4)] == [SparseLinear, nn.Linear, nn.Linear]
    assert 0.0 < DEFAULT_MAX_DENSITY < 1.0
    # No mask: density from the weight's nonzeros.
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(torch.rand(10, 100, generator=gen) < 0.1)
    out = sparsify(model, max_density=0.15)
    assert [type(out[i]) for i in (0, 2, 4)] == [nn.Linear, nn.Linear, SparseLinear]


def test_bsr_threshold_uses_stored_block_density():
    model = nn.Sequential(nn.Linear(64, 64))
    mask = Mask({"0.weight": torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) < 0.1})
    # 10% unstructured: nearly every 16x16 block is non-empty, so BSR would store ~100%.
    assert type(sparsify(model, mask, format="bsr", blocksize=16, max_density=0.2)[0]) is nn.Linear
    assert type(sparsify(model, mask, format="csr", max_density=0.2)[0]) is SparseLinear


class ReadsItsWeight(nn.Linear):
    """A Linear subclass, as third-party code writes them: sparsify cannot know what it reads."""


def test_grouped_convs_and_linear_subclasses_stay_dense_attention_is_swapped_whole():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3), ReadsItsWeight(3, 3),
                          nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    attention = nn.MultiheadAttention(8, 2)
    model.add_module("attn", attention)
    out = sparsify(model, max_density=1.0)
    assert type(out[0]) is nn.Conv2d and type(out[2]) is SparseLinear and type(out[3]) is ReadsItsWeight
    assert type(out[4]) is nn.Conv2d
    # the attention's output projection (a Linear subclass read in F.multi_head_attention_forward)
    # is swapped with its attention, never on its own
    assert type(out.attn) is SparseMultiheadAttention and type(out.attn.out_proj) is SparseLinear


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 4), ("bsr", (4, 8))])
def test_forward_rows_is_a_band_of_the_full_product(fmt, block):
    gen = torch.Generator().manual_seed(8)
    linear = nn.Linear(30, 27)  # ragged: BSR pads rows and columns
    layer = SparseLinear.from_linear(linear, mask=torch.rand(27, 30, generator=gen) < 0.3, format=fmt,
                                     blocksize=block or 32)
    x = torch.randn(2, 5, 30, generator=gen)
    with torch.no_grad():
        full = layer(x)
        for start, stop in [(0, 9), (9, 18), (18, 27), (3, 25), (5, 6), (0, 27), (27, 27)]:
            band = layer.forward_rows(x, start, stop)
            assert band.shape == (2, 5, stop - start)
            torch.testing.assert_close(band, full[..., start:stop], rtol=1e-6, atol=1e-6)
        layer = layer.double()  # new buffers: the cached bands are rebuilt, not reused
        torch.testing.assert_close(layer.forward_rows(x.double(), 9, 18), layer(x.double())[..., 9:18])
    with pytest.raises(ValueError, match="start <= stop"):
        layer.forward_rows(x.double(), 20, 10)


class FakeConv1D(nn.Module):
    """Hugging Face's Conv1D, as transformers.pytorch_utils defines it (weight [in, out])."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (4, 8))])
def test_sparse_conv1d_writes_the_conv1d_weight_transposed(fmt, block):
    torch.manual_seed(0)
    conv = FakeConv1D(nf=21, nx=18)
    mask = torch.rand(18, 21, generator=torch.Generator().manual_seed(9)) < 0.3
    with torch.no_grad():
        conv.weight[tuple(mask.nonzero()[0])] = 0.0  # alive but exactly zero: kept as stored
    layer = SparseConv1D.from_conv1d(conv, mask=mask, format=fmt, blocksize=block or 32)
    assert (layer.nx, layer.nf) == (18, 21) and layer.dense_cls is FakeConv1D
    x = torch.randn(4, 18)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (conv.weight * mask) + conv.bias)
    written = layer.sparse_state_dict()["weight"]
    assert written.shape == (18, 21) and written.format == fmt
    assert torch.equal(written.to_dense(), conv.weight.detach() * mask)
    if fmt == "csr":  # exactly the alive entries, the zero one included
        assert written.matrix.values().numel() == int(mask.sum())
    else:  # a (4, 8) block of W.T is an (8, 4) block of W; the same number of blocks
        assert written.blocksize == (8, 4) and written.matrix.values().shape[0] == layer.values.shape[0]
    back = layer.to_dense_conv1d()
    assert type(back) is FakeConv1D and torch.equal(back.weight, conv.weight * mask)
    assert torch.equal(back.bias, conv.bias)


def test_bare_linear_and_bare_sparse_linear():
    linear = nn.Linear(8, 4)
    layer = sparsify(linear, max_density=1.0)
    assert isinstance(layer, SparseLinear)
    back = densify(layer)
    assert type(back) is nn.Linear and torch.equal(back.weight, linear.weight)


def test_inference_only():
    layer = SparseLinear.from_linear(nn.Linear(8, 4), mask=torch.rand(4, 8) < 0.5)
    assert list(layer.parameters()) == []
    assert set(layer.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)  # a gradient that silently never arrives is worse than an error
    with torch.no_grad():
        assert not layer(x).requires_grad
    with torch.inference_mode():
        assert layer(x.detach()).shape == (3, 4)


def test_from_sparse_tensors_and_padded_bsr():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(20, 40, generator=gen) * (torch.rand(20, 40, generator=gen) < 0.3)
    b = torch.randn(20, generator=gen)
    x = torch.randn(7, 40, generator=gen)
    want = x @ w.T + b
    for weight in (w.to_sparse_csr(), to_sparse_weight(w, "bsr", 16), to_sparse_weight(w, "csr")):
        for backend in CPU_BACKENDS:
            layer = SparseLinear(weight, b, backend=backend)
            assert (layer.in_features, layer.out_features) == (40, 20)
            if backend == "numba" and layer.format == "bsr":
                with pytest.raises(ValueError, match="numba.*CSR"):
                    layer(x)
                continue
            assert torch.allclose(layer(x), want, atol=1e-5)
            assert torch.equal(layer.to_dense_linear().weight, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_on_cpu(dtype):
    model = mlp(dtype)
    mask = random_mask(model)
    reference = masked_copy(model, mask)
    sparse = sparsify(model, mask, max_density=1.0)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = sparse(x)
    assert got.dtype == dtype
    # The dtype rule (tests/tolerances.py): the error against an fp64 run of the same masked model
    # (the same rounded weights) is at most twice torch's own error at this dtype, plus atol x the
    # output's scale. An all-zero or garbage output fails it: its error is the whole output.
    truth = copy.deepcopy(reference).double()(x.double())
    scale = truth.abs().max().item()
    assert scale > 0.1  # a real signal, not a near-zero output that any answer would match
    err = (got.double() - truth).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-12 * scale
    else:
        torch_err = (reference(x).double() - truth).abs().max().item()
        tol = TOLERANCE[dtype]
        assert err <= tol["factor"] * torch_err + tol["atol"] * scale, (err, torch_err, scale)
        with pytest.raises(ValueError, match="float32 / float64"):  # torch's CPU sparse product refuses halves
            SparseLinear.from_linear(nn.Linear(64, 8).to(dtype), backend="torch")(x)


def test_choose_backend_rules_and_errors():
    assert choose_backend("csr", "cpu", torch.float32, 1) == "scipy"
    assert choose_backend(torch.sparse_bsr, "cpu", torch.float16, 512) == "scipy"
    for b in ("scipy", "torch", "dense"):
        assert choose_backend("csr", "cpu", torch.float32, 4, b) == b
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("csr", "cpu", torch.float32, 1, "mkl")
    with pytest.raises(ValueError, match="layout"):
        choose_backend("coo", "cpu", torch.float32)
    with pytest.raises(ValueError, match="CPU only"):
        choose_backend("csr", "cuda", torch.float32, 1, "scipy")
    # MKL takes square BSR blocks only: auto goes to scipy, a forced torch says why
    assert choose_backend("bsr", "cpu", torch.float32, 64, blocksize=(16, 16)) == "torch"
    assert choose_backend("bsr", "cpu", torch.float32, 64, blocksize=(16, 32)) == "scipy"
    with pytest.raises(ValueError, match="square BSR blocks"):
        choose_backend("bsr", "cpu", torch.float32, 64, "torch", blocksize=(16, 32))
    assert set(BACKENDS) == {"auto", "triton", "scipy", "torch", "numba", "dense"}
    # numba: CSR in fp32 / fp64 on the CPU, auto's pick above 40 columns
    assert [choose_backend("csr", "cpu", torch.float32, n) for n in (40, 41)] == ["torch", "numba"]
    assert choose_backend("csr", "cpu", torch.float64, 64) == "numba"
    assert choose_backend("bsr", "cpu", torch.float32, 64, blocksize=(16, 16)) == "torch"
    assert choose_backend("csr", "cpu", torch.bfloat16, 64) == "scipy"
    for layout, dtype, device in (("bsr", torch.float32, "cpu"), ("csr", torch.float16, "cpu"),
                                  ("csr", torch.float32, "cuda")):
        with pytest.raises(ValueError, match="numba"):
            choose_backend(layout, device, dtype, 64, "numba")


def test_sparse_matmul_and_linear_errors():
    W = torch.eye(4).to_sparse_csr()
    with pytest.raises(ValueError, match="share a dtype"):
        sparse_matmul(W, torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \[K, N\]"):
        sparse_matmul(W, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        sparse_linear(torch.ones(2, 3), W)
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(torch.ones(2, 4), W, bias=torch.ones(3))
    with pytest.raises(ValueError, match="sparse CSR or BSR"):
        sparse_matmul(torch.eye(4), torch.ones(4, 2))
    for b in CPU_BACKENDS:
        assert torch.equal(sparse_matmul(W, torch.ones(4, 2), backend=b), torch.ones(4, 2))


def test_module_argument_errors():
    linear = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="backend"):
        SparseLinear.from_linear(linear, backend="gpu")
    with pytest.raises(ValueError, match="format"):
        sparsify(nn.Sequential(linear), format="coo")
    with pytest.raises(ValueError, match="max_density"):
        sparsify(nn.Sequential(linear), max_density=1.5)
    with pytest.raises(ValueError, match="sparse CSR / BSR"):
        SparseLinear(torch.eye(3))
    with pytest.raises(ValueError, match="input"):
        SparseLinear.from_linear(linear)(torch.ones(2, 7))
    with pytest.raises(ValueError, match="has shape"):
        sparsify(nn.Sequential(linear), Mask({"0.weight": torch.ones(3, 3, dtype=torch.bool)}))


def _triton_launchers_present() -> bool:
    if not has_triton():
        return False
    try:
        from sparse_lth.kernels import bsr, csr  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _triton_launchers_present(), reason="Triton or its launchers are missing")
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_forced_triton_backend(fmt):
    # On the CPU this runs Triton's interpreter (TRITON_INTERPRET=1, set in conftest): keep it tiny.
    from sparse_lth.kernels._triton import is_interpreting

    if not torch.cuda.is_available() and not is_interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(6)
    linear = nn.Linear(32, 16)
    mask = torch.rand(16, 32, generator=gen) < 0.3
    layer = SparseLinear.from_linear(linear, mask=mask, format=fmt, blocksize=16, backend="triton").to(device)
    x = torch.randn(3, 32, generator=gen).to(device)
    want = x @ (linear.weight.detach() * mask).to(device).T + linear.bias.detach().to(device)
    assert torch.allclose(layer(x), want, atol=1e-4)
    if fmt == "csr":  # rows padded once for the kernel's 16-byte loads, kept with the views
        assert "padded" in layer._views()


def test_cpu_paths_work_without_triton(tmp_path):
    # A stand-in "triton" that fails to import, first on the path: the library must still import,
    # report Triton absent, and run every CPU backend.
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('triton is not here')\n")
    code = """
import torch
from torch import nn
import sparse_lth
from sparse_lth.kernels import has_triton
assert not has_triton()
model = sparse_lth.sparsify(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), max_density=1.0)
x = torch.randn(3, 16)
for backend in ("auto", "scipy", "torch", "dense"):
    for m in model:
        m.backend = backend
    assert model(x).shape == (3, 4)
try:
    sparse_lth.choose_backend("csr", "cpu", torch.float32, 1, "triton")
except ValueError as e:
    assert "Triton" in str(e)
else:
    raise AssertionError("forced triton without triton must raise")
print("ok")
"""
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("backend,threads", [("scipy", None), ("scipy", 2), ("dense", None)])
def test_replayed_call_plan_follows_the_layer(backend, threads):
    """The CPU call plan forward() replays (nn.linear._CallPlan) gives what the layer computes,
    and is dropped when what it fixed changes: the bias, the backend, the input's shape, grad
    (still refused), the weight's values (read in place) and a state_dict load."""
    gen = torch.Generator().manual_seed(11)
    linear = nn.Linear(40, 12)
    mask = torch.rand(12, 40, generator=gen) < 0.3
    layer = SparseLinear.from_linear(linear, mask=mask, backend=backend)
    layer.threads = threads  # 2: scipy's loop split over threads, not called directly
    x = torch.randn(1, 40, generator=gen)

    def want(inp, bias=linear.bias.detach()):
        return F.linear(inp, linear.weight.detach() * mask, bias)

    with torch.no_grad():
        assert torch.allclose(layer(x), want(x), atol=1e-6)
        assert "plan" in layer._views()
        assert torch.allclose(layer(x), want(x), atol=1e-6)  # replayed
        layer.bias = torch.zeros(12)  # a new bias tensor: the plan must not keep the old one
        assert torch.allclose(layer(x), want(x, torch.zeros(12)), atol=1e-6)
        layer.bias.fill_(1.0)  # changed in place: seen
        assert torch.allclose(layer(x), want(x, torch.ones(12)), atol=1e-6)
        x3 = torch.randn(3, 40, generator=gen)
        assert torch.allclose(layer(x3), want(x3, torch.ones(12)), atol=1e-6)
        layer.values.mul_(2.0)  # the stored weights, changed in place
        if backend == "scipy":
            assert torch.allclose(layer(x), F.linear(x, 2 * linear.weight.detach() * mask, torch.ones(12)), atol=1e-5)
        state = SparseLinear.from_linear(linear, mask=mask, backend=backend).state_dict()
        layer.load_state_dict(state)
        assert torch.allclose(layer(x), want(x), atol=1e-6)
        layer.backend = "torch"
        assert torch.allclose(layer(x), want(x), atol=1e-6)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x.clone().requires_grad_())


@pytest.mark.parametrize("batch", [41, 64, 130])
def test_numba_backend_matches_dense_products(batch):
    """The numba kernel behind backend "numba" (auto's CSR pick above 40 rows) against dense
    torch: sparse_linear with a bias, sparse_matmul, and a SparseLinear on it; one and several
    64-wide tiles, int32 and int64 indices."""
    gen = torch.Generator().manual_seed(batch)
    w = torch.randn(70, 90, generator=gen) * (torch.rand(70, 90, generator=gen) < 0.2)
    b = torch.randn(70, generator=gen)
    x = torch.randn(batch, 90, generator=gen)
    W64 = w.to_sparse_csr()
    W32 = torch.sparse_csr_tensor(W64.crow_indices().int(), W64.col_indices().int(), W64.values(), w.shape)
    for W in (W64, W32):
        torch.testing.assert_close(sparse_linear(x, W, b, backend="numba"), x @ w.T + b)
        torch.testing.assert_close(sparse_matmul(W, x.T, backend="numba"), w @ x.T)
    layer = SparseLinear(w.to_sparse_csr(), b, backend="numba")
    assert choose_backend("csr", "cpu", torch.float32, batch) == "numba"  # auto's pick for a large enough weight
    torch.testing.assert_close(layer(x), x @ w.T + b)
    torch.testing.assert_close(layer(x.reshape(1, batch, 90)), (x @ w.T + b).reshape(1, batch, 70))


def test_numba_backend_under_inference_mode_sees_in_place_changes():
    """Inference tensors keep no version counter: the numba path packs them afresh each call."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(30, 50, generator=gen) * (torch.rand(30, 50, generator=gen) < 0.3)
    with torch.inference_mode():
        layer = SparseLinear(w.to_sparse_csr(), backend="numba")  # its buffers inference tensors too
        x = torch.randn(64, 50, generator=gen)
        first = layer(x)
        x.add_(1.0)
        torch.testing.assert_close(layer(x), x @ w.T)
        torch.testing.assert_close(first, (x - 1.0) @ w.T)
