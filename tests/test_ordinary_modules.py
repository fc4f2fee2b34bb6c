"""A sparsified model behaves as an ordinary torch module: tied weights, deepcopy, .to(),
state dicts, save_sparse, the meta device, and inputs that require grad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparse_lth import Mask, SparseWeight, load_sparse, save_sparse
from sparse_lth.nn import SparseLinear, densify, sparsify

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Tied(nn.Module):
    """Two linear layers that share one weight (a weight-tied autoencoder-like block)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(48, 48)
        self.second = nn.Linear(48, 48)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class TiedLM(nn.Module):
    """An embedding tied to the output projection, as GPT-2 does; the embedding stays dense."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.hidden = nn.Linear(24, 24)
        self.head = nn.Linear(24, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_tied_linear_layers_compute_what_the_masked_model_computes(fmt):
    torch.manual_seed(0)
    model = Tied()
    assert [n for n, _ in model.named_parameters()] == ["first.weight", "first.bias", "second.bias"]
    mask = Mask({"first.weight": torch.rand(48, 48, generator=gen(1)) < 0.1})  # names one of the two
    x = torch.randn(5, 48, generator=gen(2))
    want = mask.apply(copy.deepcopy(model))(x)
    sparse = sparsify(model, mask, format=fmt, blocksize=16, max_density=1.0)
    assert type(sparse.first) is SparseLinear and type(sparse.second) is SparseLinear
    # one set of stored values for the shared weight, each layer its own bias
    assert sparse.first.values.data_ptr() == sparse.second.values.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-6)
    back = densify(sparse)  # tied again: one dense parameter for the two layers
    assert back.first.weight is back.second.weight
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in back.named_parameters()] == ["first.weight", "first.bias", "second.bias"]


def test_weight_tied_to_a_dense_module_is_masked_there_too():
    torch.manual_seed(0)
    model = TiedLM()
    mask = Mask({"embed.weight": torch.rand(40, 24, generator=gen(3)) < 0.05,
                 "hidden.weight": torch.rand(24, 24, generator=gen(4)) < 0.5})
    tokens = torch.randint(0, 40, (3, 7), generator=gen(5))
    want = mask.apply(copy.deepcopy(model))(tokens)
    sparse = sparsify(model, mask, max_density=0.1)
    assert type(sparse.head) is SparseLinear  # 5%: swapped
    assert type(sparse.hidden) is nn.Linear  # 50%: left dense, but masked all the same
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens), want, rtol=1e-5, atol=1e-6)


def tile_mask(shape: tuple[int, int], tile: tuple[int, int], seed: int) -> torch.Tensor:
    """Alive entries only inside one 16 x 16 tile (at ``tile``), 70% of them: a block ticket."""
    alive = torch.zeros(shape, dtype=torch.bool)
    r, c = tile[0] * 16, tile[1] * 16
    alive[r:r + 16, c:c + 16] = torch.rand(shape, generator=gen(seed))[r:r + 16, c:c + 16] < 0.7
    return alive


def mlp_and_mask(seed: int = 0) -> tuple[nn.Sequential, Mask]:
    """A ragged MLP (40 rows: BSR pads to 48) whose first two layers are sparse enough for
    both formats and whose output layer (60% alive) stays dense."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    mask = Mask({"0.weight": tile_mask((40, 64), (2, 1), seed + 1),
                 "2.weight": tile_mask((32, 40), (1, 2), seed + 2),
                 "4.weight": torch.rand(10, 32, generator=gen(seed + 3)) < 0.6})
    return model, mask


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_deepcopy_gives_an_independent_equal_model(fmt):
    model, mask = mlp_and_mask()
    sparse = sparsify(model, mask, format=fmt, blocksize=16, max_density=0.25)
    x = torch.randn(6, 64, generator=gen(9))
    with torch.no_grad():
        sparse(x)  # a layer that has run holds a torch sparse view of its buffers: still copyable
    twin = copy.deepcopy(sparse)
    with torch.no_grad():
        assert torch.equal(twin(x), sparse(x))
        twin[0].values.mul_(2.0)  # changing the copy leaves the original alone
        assert not torch.equal(twin(x), sparse(x))
    assert twin[0].values.data_ptr() != sparse[0].values.data_ptr()


def test_to_dtype_state_dict_round_trip():
    model, mask = mlp_and_mask()
    want = mask.apply(copy.deepcopy(model)).double()
    sparse = sparsify(model, mask, max_density=0.25).double()
    assert sparse[0].values.dtype == torch.float64 and sparse[0].col_indices.dtype == torch.int32
    x = torch.randn(4, 64, generator=gen(10), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want(x), rtol=1e-12, atol=1e-12)
        other = sparsify(mlp_and_mask(seed=1)[0], mlp_and_mask(seed=0)[1], max_density=0.25).double()
        other.load_state_dict(sparse.state_dict())  # same patterns, other values: now identical
        assert torch.equal(other(x), sparse(x))


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 16)])
def test_save_sparse_of_a_sparsified_model_loads_into_the_dense_model(tmp_path, fmt, block):
    model, mask = mlp_and_mask()
    want = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, format=fmt, blocksize=block or 32, max_density=0.25)
    path = tmp_path / "ticket.safetensors"
    report = save_sparse(sparse, path)
    assert report["0.weight"].format == report["2.weight"].format == fmt
    assert list(report) == list(want.state_dict())  # the dense model's names, in its order
    fresh = mlp_and_mask(seed=5)[0]
    fresh.load_state_dict(load_sparse(path))
    for name, value in want.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # dense=False: the weights come back sparse, ready for SparseLinear again
    held = load_sparse(path, dense=False)
    assert isinstance(held["0.weight"], SparseWeight) and held["0.weight"].shape == (40, 64)
    again = SparseLinear(held["0.weight"], held["0.bias"])
    x = torch.randn(3, 64, generator=gen(11))
    with torch.no_grad():
        assert torch.equal(again(x), sparse[0](x))


def test_meta_device_model_says_why_in_one_line():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="meta device") as err:
        sparsify(model)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="meta device"):
        SparseLinear.from_linear(model[0])


def test_gradient_through_an_inference_layer_is_an_error_not_a_silent_zero():
    model, mask = mlp_and_mask()
    sparse = sparsify(model, mask, max_density=0.25)
    sparse[0] = nn.Linear(64, 40)  # a trainable dense layer before a sparse one
    x = torch.randn(2, 64, generator=gen(12))
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(x).sum().backward()
    with torch.no_grad():
        assert sparse(x).shape == (2, 10)
