"""sparse_lth.optim against torch.optim's classes: the same updates, bit for bit."""

import pytest
import torch

from sparse_lth import optim


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))


def _train(model, opt, steps: int = 50, freeze_last_bias_after: int = 20) -> None:
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step >= freeze_last_bias_after:  # a parameter without a gradient keeps its state
            model[2].bias.grad = None
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_equals_torch_fused_adam(weight_decay):
    ours, ref = _model(0), _model(0)
    _train(ours, optim.Adam(ours.parameters(), lr=3e-3, weight_decay=weight_decay))
    _train(ref, torch.optim.Adam(ref.parameters(), lr=3e-3, weight_decay=weight_decay, fused=True))
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, _model(0)[0].weight)  # it did train


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_equals_torch_sgd(momentum):
    ours, ref = _model(1), _model(1)
    _train(ours, optim.SGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3))
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3))
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_frozen_parameters_are_left_out_and_an_empty_list_is_refused():
    model = _model(2)
    model[0].weight.requires_grad_(False)
    opt = optim.Adam(model.parameters())
    assert all(p is not model[0].weight for p in opt.params)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([model[0].weight], lr=0.1)


def test_zero_grad_without_set_to_none_zeroes_in_place():
    model = _model(3)
    opt = optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 12)).sum().backward()
    grad = model[0].weight.grad
    opt.zero_grad(set_to_none=False)
    assert model[0].weight.grad is grad and not grad.any()
    opt.zero_grad()
    assert model[0].weight.grad is None
