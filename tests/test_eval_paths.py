"""sparse_lth.eval_paths: evaluation through oneDNN and through the direct sparse conv computes
what plain torch computes, switches only where it should, and always gives the layers back."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.eval_paths import MIN_ROWS, SPARSE_CONV_DENSITY, _available, onednn_linears, sparse_convs

needs_onednn = pytest.mark.skipif(not _available(), reason="no oneDNN linear in this torch")


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


@needs_onednn
def test_same_outputs_and_the_layers_given_back():
    model, x = net(), torch.randn(MIN_ROWS, 6, 8)
    with torch.no_grad(), onednn_linears(model, rows=len(x)) as switched:
        out = model(x)
        assert "forward" in vars(model[1]) and "forward" not in vars(model[3])  # not the subclass
    assert switched == 2
    torch.testing.assert_close(out.double(), reference(model, x), rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())


@needs_onednn
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


@needs_onednn
def test_an_error_inside_gives_the_layers_back():
    model = net()
    with pytest.raises(ValueError), torch.no_grad(), onednn_linears(model, rows=MIN_ROWS):
        raise ValueError("boom")
    assert all("forward" not in vars(m) for m in model.modules())


@needs_onednn
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


@needs_onednn
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


def conv_net(density: float) -> nn.Module:
    """A first conv of 1 input channel, two pruned convs (one strided, one without bias) and a
    grouped conv: which of them the sparse path takes is decided by each one's own test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(16, 6, 1, bias=False))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                keep = torch.zeros(m.weight.numel())
                keep[torch.randperm(keep.numel())[:round(density * keep.numel())]] = 1  # exactly that density
                m.weight.mul_(keep.view_as(m.weight))
    return model


def conv_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same network written out with F.conv2d in float64."""
    h = x.double()
    for m in model:
        if isinstance(m, nn.Conv2d):
            bias = None if m.bias is None else m.bias.double()
            h = F.conv2d(h, m.weight.double(), bias, m.stride, m.padding, m.dilation, m.groups)
        else:
            h = torch.relu(h)
    return h


def test_sparse_convs_compute_the_dense_convs_and_give_the_layers_back():
    model, x = conv_net(0.05), torch.randn(3, 1, 12, 12)
    with torch.no_grad(), sparse_convs(model) as switched:
        out = model(x)
        # the 1-channel first conv and the grouped conv keep their own forward
        assert [("forward" in vars(m)) for m in model if isinstance(m, nn.Conv2d)] == [False, True, False, True]
    assert switched == 2
    torch.testing.assert_close(out.double(), conv_reference(model, x), rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())


def test_sparse_convs_only_at_or_below_the_density_and_never_with_grad():
    assert SPARSE_CONV_DENSITY == 0.1
    with torch.no_grad(), sparse_convs(conv_net(0.5)) as switched:
        assert switched == 0  # too dense: the dense conv is faster there
    model = conv_net(0.05)
    with sparse_convs(model) as switched:  # autograd on: training untouched
        assert switched == 0
    with torch.no_grad(), sparse_convs(model, max_density=0.0) as switched:
        assert switched == 0
    with torch.no_grad(), sparse_convs(model.double()) as switched:
        assert switched == 0  # not fp32


def test_sparse_convs_give_the_layers_back_after_an_error_and_keep_odd_inputs_on_the_plain_path():
    model = conv_net(0.05)
    with pytest.raises(ValueError), torch.no_grad(), sparse_convs(model):
        raise ValueError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    layer, x = model[2], torch.randn(8, 12, 12)  # unbatched 3-D input: the plain forward
    with torch.no_grad(), sparse_convs(layer) as switched:
        out = layer(x)
    assert switched == 1
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, 2, 1))


def test_evaluate_takes_the_sparse_convs_and_both_paths_nest():
    from sparse_lth import training
    from sparse_lth.data import Split

    model = nn.Sequential(conv_net(0.05), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    x, y = torch.randn(MIN_ROWS + 5, 1, 12, 12), torch.randint(0, 3, (MIN_ROWS + 5,))
    with torch.no_grad():
        logits = model(x)
    taken = []
    original = training.sparse_convs

    def counted(m):
        cm = original(m)
        taken.append(m)
        return cm
    training.sparse_convs = counted
    try:
        loss, accuracy = training.evaluate(model, Split(x, y))
    finally:
        training.sparse_convs = original
    assert taken, "evaluate did not take the sparse conv path"
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert accuracy == int((logits.argmax(1) == y).sum()) / len(y)
    assert all("forward" not in vars(m) for m in model.modules())
