"""Pruning criteria against torch.nn.utils.prune and hand-computed cases."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparse_lth import Mask, build_model, prune_by_magnitude
from sparse_lth.pruning import prune_n_m, random_mask_like


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))


def test_global_scope_equals_torch_global_unstructured():
    model = _mlp()
    ours = prune_by_magnitude(model, Mask.ones_like(model), 0.37, scope="global")
    reference = _mlp()
    layers = [(reference[i], "weight") for i in (0, 2, 4)]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.37)
    for name, (module, _) in zip(ours, layers):
        assert torch.equal(ours[name], module.weight_mask.bool()), name


def test_layerwise_fractions_are_exact_per_layer():
    model = _mlp()
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.2, layer_fractions={"4.weight": 0.1})
    assert mask["0.weight"].sum() == 600 - 120
    assert mask["2.weight"].sum() == 200 - 40
    assert mask["4.weight"].sum() == 30 - 3
    # the survivors are the largest weights of each layer
    w = model[0].weight.abs()
    assert w[mask["0.weight"]].min() >= w[~mask["0.weight"]].max()


def test_fraction_applies_to_survivors_only():
    model = _mlp()
    first = prune_by_magnitude(model, Mask.ones_like(model), 0.5)
    second = prune_by_magnitude(model, first, 0.5)
    assert second["0.weight"].sum() == 150
    assert not (second["0.weight"] & ~first["0.weight"]).any()  # nothing revived


def test_ties_are_broken_by_position():
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 2.0]]))
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.5)
    assert mask["weight"].tolist() == [[False, False, True, True]]


def test_lenet_weights_remaining_follow_the_paper():
    # Frankle & Carbin: hidden layers x0.8, output x0.9 per round.
    paper = {3: 51.28, 7: 21.07, 9: 13.52, 12: 6.95, 15: 3.58, 16: 2.87, 18: 1.85}
    model = build_model("lenet300", seed=0)
    mask = Mask.ones_like(model)
    for r in range(1, 19):
        mask = prune_by_magnitude(model, mask, 0.2, layer_fractions={"out.weight": 0.1})
        if r in paper:
            assert round(100 * mask.density(), 2) == pytest.approx(paper[r], abs=0.011), r


def test_block_pruning_removes_whole_tiles():
    torch.manual_seed(0)
    model = nn.Linear(70, 40)  # ragged against 16x16 tiles
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.5, block=(16, 16))["weight"]
    tiles = torch.nn.functional.pad(mask.float(), (0, 10, 0, 8)).reshape(3, 16, 5, 16).permute(0, 2, 1, 3)
    # every tile is all-alive or all-pruned over the weights it holds
    full = torch.nn.functional.pad(torch.ones(40, 70), (0, 10, 0, 8)).reshape(3, 16, 5, 16).permute(0, 2, 1, 3)
    alive = tiles.sum(dim=(2, 3))
    assert torch.all((alive == 0) | (alive == full.sum(dim=(2, 3))))
    assert int((alive > 0).sum()) == 15 - round(0.5 * 15)
    # the kept tiles have the largest RMS
    w2 = torch.nn.functional.pad(model.weight.detach() ** 2, (0, 10, 0, 8)).reshape(3, 16, 5, 16).sum(dim=(1, 3))
    rms = (w2 / full.sum(dim=(2, 3))).sqrt()
    assert rms[alive > 0].min() >= rms[alive == 0].max()


def test_n_m_keeps_largest_two_of_four():
    model = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, 0.3]]))
    mask = prune_n_m(model, Mask.ones_like(model), 2, 4)["weight"]
    assert mask.tolist() == [[False, True, True, False, True, False, False, True]]


def test_random_mask_keeps_per_layer_counts():
    model = _mlp()
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.6)
    rand = random_mask_like(mask, torch.Generator().manual_seed(1))
    for name in mask:
        assert rand[name].sum() == mask[name].sum()
    assert rand != mask


def test_batchnorm_scale_is_never_prunable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert list(Mask.ones_like(model)) == ["0.weight", "3.weight"]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_fraction_says_what_to_change(fraction):
    model = _mlp()
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        prune_by_magnitude(model, Mask.ones_like(model), fraction)


def test_mask_shape_mismatch_is_an_error():
    model = _mlp()
    bad = Mask({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="0.weight"):
        prune_by_magnitude(model, bad, 0.2)


def test_block_beyond_available_memory_is_refused_before_scoring(monkeypatch):
    from sparse_lth import formats, pruning

    model = _mlp()
    with pytest.raises(ValueError, match=r"pruning 0\.weight \(20x30\) in whole 1000000x1000000 tiles \(padded to "
                                         rf"1000000x1000000\) would need {13 * 10**12:,} bytes of memory"):
        prune_by_magnitude(model, Mask.ones_like(model), 0.5, block=(10**6, 10**6))
    monkeypatch.setattr(formats, "_available_memory", lambda: 20_000)
    # 20x30 in 16x16 tiles pads to 32x32 = 1024 entries x 13 bytes = 13,312: fits; 64x64 tiles: 53,248 do not
    prune_by_magnitude(model, Mask.ones_like(model), 0.5, block=(16, 16))
    with pytest.raises(ValueError, match=r"would need 53,248 bytes of memory, but only 20,000 are available"):
        pruning.check_block(Mask.ones_like(model), (64, 64))
    for bad in ((0, 4), (4,), (2.5, 2), (True, 2)):
        with pytest.raises(ValueError, match="block must be"):
            pruning.check_block(Mask.ones_like(model), bad)
