"""sparse_lth.onednn_eval: evaluation through oneDNN computes what plain torch computes, switches
only where it should, and always gives the layers back."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.onednn_eval import MIN_ROWS, _available, onednn_linears

pytestmark = pytest.mark.skipif(not _available(), reason="no oneDNN linear in this torch")


class Scaled(nn.Linear):
    """A Linear subclass: its own forward must be kept."""

    def forward(self, x):
        return 2 * super().forward(x)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), Scaled(32, 16), nn.Linear(16, 5))


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same network written out with F.linear in float64."""
    _, a, _, b, c = model
    h = F.relu(F.linear(x.flatten(1).double(), a.weight.double(), a.bias.double()))
    h = 2 * F.linear(h, b.weight.double(), b.bias.double())
    return F.linear(h, c.weight.double(), c.bias.double())


def test_same_outputs_and_the_layers_given_back():
    model, x = net(), torch.randn(MIN_ROWS, 6, 8)
    with torch.no_grad(), onednn_linears(model, rows=len(x)) as switched:
        out = model(x)
        assert "forward" in vars(model[1]) and "forward" not in vars(model[3])  # not the subclass
    assert switched == 2
    torch.testing.assert_close(out.double(), reference(model, x), rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())


def test_nothing_switched_with_grad_or_few_rows_and_odd_inputs_fall_back():
    model = net()
    with onednn_linears(model, rows=MIN_ROWS) as switched:  # autograd on: training untouched
        assert switched == 0
    with torch.no_grad(), onednn_linears(model, rows=MIN_ROWS - 1) as switched:
        assert switched == 0
    layer = model[1]
    with torch.no_grad(), onednn_linears(layer.double(), rows=MIN_ROWS) as switched:
        assert switched == 0  # not fp32
    layer.float()
    with torch.no_grad(), onednn_linears(layer, rows=MIN_ROWS):
        one = torch.randn(48)  # 1-D: the plain forward
        torch.testing.assert_close(layer(one), F.linear(one, layer.weight, layer.bias))


def test_an_error_inside_gives_the_layers_back():
    model = net()
    with pytest.raises(ValueError), torch.no_grad(), onednn_linears(model, rows=MIN_ROWS):
        raise ValueError("boom")
    assert all("forward" not in vars(m) for m in model.modules())


def test_sparse_trained_layers_dense_enough_get_a_dense_copy_through_onednn():
    from sparse_lth.nn import TrainableSparseLinear
    from sparse_lth.nn.trainable import EVAL_DENSE_MIN_DENSITY

    torch.manual_seed(0)
    dense_enough = TrainableSparseLinear.from_linear(nn.Linear(64, 48), mask=torch.rand(48, 64) < 0.5)
    sparse = TrainableSparseLinear.from_linear(nn.Linear(48, 10), mask=torch.rand(10, 48) < EVAL_DENSE_MIN_DENSITY / 4)
    net = nn.Sequential(dense_enough, nn.ReLU(), sparse)
    x = torch.randn(MIN_ROWS, 64)
    with torch.no_grad():
        reference = F.linear(torch.relu(F.linear(x, dense_enough.dense_weight(), dense_enough.bias)),
                             sparse.dense_weight(), sparse.bias)
        with onednn_linears(net, rows=len(x)) as switched:
            out = net(x)
            assert "forward" in vars(dense_enough) and "forward" not in vars(sparse)
    assert switched == 1
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(dense_enough)


def test_a_layer_without_bias_and_a_weight_changed_between_passes():
    """No copy is taken: a pass sees the weight as it is, and a bias-less layer stays bias-less."""
    torch.manual_seed(1)
    layer, x = nn.Linear(20, 7, bias=False), torch.randn(MIN_ROWS, 20)
    with torch.no_grad():
        with onednn_linears(layer, rows=len(x)) as switched:
            first = layer(x)
            layer.weight.mul_(-2.0)  # an optimizer step, in place
            second = layer(x)
    assert switched == 1
    weight = layer.weight.detach().double()
    torch.testing.assert_close(first.double(), x.double() @ (weight / -2.0).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)
