"""The calibrated per-layer choice (sparsify(..., example_inputs=...)) and the inference layer's
way through torch.compile / torch.export. References: the masked dense model in plain torch."""

import copy
import time

import pytest
import torch
from torch import nn

from sparse_lth import SparseLinear, sparsify
from sparse_lth.nn.calibrate import LayerChoice, calibrate, calibration_table

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")


def lenet(density: float = 0.07, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    mask = {f"{i}.weight": torch.rand(model[i].weight.shape) < density for i in (0, 2, 4)}
    return model, mask


def masked_reference(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, alive in mask.items():
            ref.get_parameter(name).mul_(alive)
    return ref


def test_every_layer_keeps_its_fastest_measured_path_and_computes_the_masked_model():
    model, mask = lenet()
    ref = masked_reference(model, mask)
    x = torch.randn(1, 784)
    sparsify(model, mask=mask, example_inputs=x)
    for i in (0, 2, 4):
        choice = model[i].calibration
        assert isinstance(choice, LayerChoice) and choice.input_shape == (1, model[i].in_features)
        assert set(choice.seconds) == {"dense", "torch", "scipy"}
        best = min(choice.seconds, key=choice.seconds.get)  # sparse only when > 2% faster than dense
        assert choice.chosen == (best if choice.seconds[best] < 0.98 * choice.seconds["dense"] else "dense")
        assert choice.chosen == model[i].backend
        assert f"backend={choice.chosen} (calibrated at input [1, {model[i].in_features}])" in repr(model[i])
    with torch.inference_mode():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        for backend in ("dense", "torch", "scipy", "numba"):  # each path computes the same model
            for i in (0, 2, 4):
                model[i].backend = backend
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    table = calibration_table(model)
    assert table.splitlines()[0].split()[:2] == ["layer", "shape"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["0", "2", "4"]
    assert "300x784" in table and "1x784" in table


class Paced(nn.Module):
    """A layer whose paths take known times: the choice must follow them."""

    def __init__(self, costs: dict[str, float]):
        super().__init__()
        self.costs, self.backend, self.calibration = costs, next(iter(costs)), None

    def backend_candidates(self, x):
        return list(self.costs)

    def forward(self, x):
        time.sleep(self.costs[self.backend])
        return x


def test_the_choice_follows_the_measured_times_inside_the_model():
    model = nn.Sequential(Paced({"slow": 0.01, "fast": 0.0}), Paced({"a": 0.0, "b": 0.01}), nn.Identity())
    choices = calibrate(model, torch.zeros(2), reps=3)
    assert [choices[n].chosen for n in ("0", "1")] == ["fast", "a"] == [model[0].backend, model[1].backend]
    assert choices["0"].speedup("slow") > 2 and choices["0"].seconds["slow"] >= 0.01


def test_dense_is_kept_unless_a_sparse_path_beats_it_by_the_margin():
    model = nn.Sequential(Paced({"tie": 0.0, "dense": 0.0}), Paced({"dense": 0.01, "sparse": 0.0}))
    choices = calibrate(model, torch.zeros(1), reps=3, passes=1)
    assert choices["0"].chosen == "dense" and choices["1"].chosen == "sparse"
    assert set(choices["0"].seconds) == {"tie", "dense"}


def test_layers_the_call_skips_and_layers_with_one_path_stay_as_they_are():
    model = nn.ModuleDict({"used": Paced({"x": 0.0, "y": 0.0}), "unused": Paced({"x": 0.0, "y": 0.0}),
                           "single": Paced({"only": 0.0})})
    model.forward = lambda t: model["single"](model["used"](t))
    choices = calibrate(model, (torch.zeros(1),), reps=1)
    assert set(choices) == {"used"} and model["unused"].calibration is None and model["single"].calibration is None


def test_half_precision_on_the_cpu_offers_no_torch_path():
    layer = SparseLinear.from_linear(nn.Linear(8, 4), mask=torch.rand(4, 8) < 0.5)
    assert layer.backend_candidates(torch.zeros(2, 8, dtype=torch.bfloat16)) == ["dense", "scipy"]
    bsr = SparseLinear.from_linear(nn.Linear(64, 48), format="bsr", blocksize=(16, 32))
    assert bsr.backend_candidates(torch.zeros(2, 64)) == ["dense", "scipy"]  # MKL takes square blocks only


@pytest.mark.parametrize("format", ["csr", "bsr"])
def test_the_dense_path_reads_a_copy_that_a_loaded_state_dict_refreshes(format):
    torch.manual_seed(1)
    linear = nn.Linear(40, 30)  # BSR 16: padded to 48 x 48, so the padding rows are dropped too
    mask = torch.rand(30, 40) < 0.3
    layer = SparseLinear.from_linear(linear, mask=mask, format=format, blocksize=16, backend="dense")
    x = torch.randn(5, 40)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ (linear.weight * mask).T + linear.bias)
        torch.testing.assert_close(layer.forward_rows(x, 7, 23), (x @ (linear.weight * mask).T + linear.bias)[:, 7:23])
    state = layer.state_dict()
    state["values"] = state["values"] * 2
    layer.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ (2 * linear.weight * mask).T + linear.bias)


@pytest.mark.parametrize("format", ["csr", "bsr"])
@pytest.mark.parametrize("backend", ["auto", "dense", "scipy"])
def test_a_sparsified_model_compiles_whole_and_exports_with_the_custom_op(format, backend):
    model, mask = lenet(density=0.2)
    ref = masked_reference(model, mask)
    sparsify(model, mask=mask, format=format, blocksize=20, backend=backend, max_density=1.0)
    x = torch.randn(3, 784)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    program = torch.export.export(model, (x,))
    ops = [n.target for n in program.graph.nodes if "sparse_lth" in str(n.target)]
    assert len(ops) == 3
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref(x), rtol=1e-5, atol=1e-5)


def test_calibration_errors():
    model, mask = lenet()
    with pytest.raises(ValueError, match="trainable=True"):
        sparsify(model, mask=mask, trainable=True, example_inputs=torch.randn(1, 784))
    for bad in ({"reps": 0}, {"passes": 0}, {"margin": -0.1}, {"budget_s": 0}):
        with pytest.raises(ValueError, match="calibrate"):
            calibrate(model, torch.randn(1, 784), **bad)
    assert "no calibrated layers" in calibration_table(model)
