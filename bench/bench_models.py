"""Model level: a whole forward pass, dense against ``sparsify(...)``; latency per batch and the
bytes of the weights the model keeps resident.

Two models:

* ``lenet300-ticket``: a real lottery ticket, LeNet-300-100 found by ``find_ticket`` on the
  embedded ``digits`` (8x8 inputs) with few iterations per round, trained weights of the last
  round. The search runs once and is cached in pytest's cache folder (``.pytest_cache``; a
  temporary folder under ``-p no:cacheprovider``): a finished search just loads.
* ``mlp<width>``: width -> width -> width -> 10, its weights pruned once by magnitude
  (``prune_by_magnitude``, layer-wise) to the target density; and a block-pruned copy
  (32 x 32 tiles by RMS) that ``sparsify`` stores as BSR.

The dense model is the masked model itself (pruned weights zero, ``nn.Linear``); the sparse
one is ``sparsify(copy, mask, max_density=SPARSIFY_MAX_DENSITY)``: layers above it stay dense
(the ticket's output layer). Both run under ``torch.no_grad()``.

Each sparse variant also measures its speed-up over the dense model itself, in the same run:
dense and sparse forward passes on the same input alternated in short bursts
(harness.run_speedup; ``extra_info["speedup_interleaved"]``, the median of bursts). Under
``--benchmark-disable`` it is skipped.

Weight bytes count every parameter and buffer a model keeps, biases included; a SparseLinear
layer counts as ``formats.nbytes`` of its ``.weight`` (the CSR / BSR arrays) plus its bias, so the
count does not depend on how the layer stores them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from harness import assert_close, bench_devices, machine_info, run_benchmark, run_speedup, size_config
from sparse_lth import run_files
from sparse_lth.data import load_dataset
from sparse_lth.formats import nbytes
from sparse_lth.lottery import LotteryConfig, find_ticket
from sparse_lth.masks import Mask
from sparse_lth.models import build_model
from sparse_lth.nn import SparseLinear, sparsify
from sparse_lth.pruning import prune_by_magnitude

BLOCK = 32
#: sparsify's max_density here: the ticket's hidden layers (~9-11% after 10 rounds) and the MLP's
#: layers become sparse, the ticket's output layer (pruned at half rate, ~35%) stays dense.
#: The library default (modules.DEFAULT_MAX_DENSITY) would leave a layer at exactly 10% dense,
#: and the comparison would be dense against dense.
SPARSIFY_MAX_DENSITY = 0.25


@dataclass(frozen=True)
class ModelCase:
    model: str           # "lenet300-ticket" | "mlp<width>"
    density: float       # target density (the ticket's is what the search reached: 0 here)
    variant: str         # "dense" | "sparse-csr" | "sparse-bsr32"
    batch: int
    device: str

    @property
    def id(self) -> str:
        d = f"-d{self.density:g}" if self.density else ""
        return f"{self.model}{d}-{self.variant}-B{self.batch}-{self.device}"


def generate_cases(config: pytest.Config) -> list[ModelCase]:
    cfg = size_config(config)
    cases = []
    for device in bench_devices(config):
        for batch in cfg.model_batches:
            for variant in ("dense", "sparse-csr"):
                cases.append(ModelCase("lenet300-ticket", 0.0, variant, batch, device))
        for density in cfg.mlp_densities:
            for batch in cfg.model_batches:
                for variant in ("dense", "sparse-csr", f"sparse-bsr{BLOCK}"):
                    cases.append(ModelCase(f"mlp{cfg.mlp_width}", density, variant, batch, device))
    return cases


_CASES: dict[str, ModelCase] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_case_id" in metafunc.fixturenames:
        cases = generate_cases(metafunc.config)
        _CASES.update((c.id, c) for c in cases)
        metafunc.parametrize("model_case_id", [c.id for c in cases], ids=[c.id for c in cases])


# -- the models -----------------------------------------------------------------------------------
def _search_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    cache = getattr(config, "cache", None)
    return cache.mkdir("sparse_lth_bench_tickets") if cache is not None else tmp_path_factory.mktemp("tickets")


@pytest.fixture(scope="module")
def lenet_ticket(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Mask]:
    """LeNet-300-100 with the trained weights and mask of the search's last round."""
    cfg = size_config(pytestconfig)
    config = LotteryConfig(model="lenet300", dataset="digits", rounds=cfg.lenet_rounds,
                           iterations=cfg.lenet_iterations, eval_every=cfg.lenet_iterations, controls=())
    ticket = find_ticket(config, _search_dir(pytestconfig, tmp_path_factory), progress=False)
    data = load_dataset("digits", val_size=config.val_size, seed=config.seed)
    model = build_model("lenet300", data.input_shape, data.num_classes)
    last = run_files.completed_rounds(ticket.run_dir)[-1]
    mask_tensors, trained, _ = run_files.read_round(ticket.run_dir, last)
    model.load_state_dict(trained)
    return model, Mask(mask_tensors)


def _mlp(width: int, density: float, block: bool) -> tuple[nn.Module, Mask]:
    """The wide MLP pruned once by magnitude to ``density`` (whole 32x32 tiles when ``block``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    mask = prune_by_magnitude(model, Mask.ones_like(model), 1.0 - density,
                              block=(BLOCK, BLOCK) if block else None)
    mask.apply(model)
    return model, mask


_models: dict[tuple, tuple[nn.Module, nn.Module, Mask]] = {}


def models_for(case: ModelCase, request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, Mask]:
    """(dense, sparse, mask) for a case, built once per model, density, structure and device."""
    block = case.variant.startswith("sparse-bsr")
    key = (case.model, case.density, block, case.device)
    if key not in _models:
        _models.clear()  # one model at a time: the wide MLP is 200+ MB dense
        if case.model == "lenet300-ticket":
            dense, mask = request.getfixturevalue("lenet_ticket")
            dense = copy.deepcopy(dense)
        else:
            dense, mask = _mlp(size_config(request.config).mlp_width, case.density, block)
        dense = dense.to(case.device).eval()
        mask = mask.to(case.device)
        fmt = "bsr" if block else "csr"
        sparse = sparsify(copy.deepcopy(dense), mask, format=fmt, blocksize=BLOCK,
                          max_density=SPARSIFY_MAX_DENSITY).eval()
        _models[key] = (dense, sparse, mask)
    return _models[key]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` keeps; a SparseLinear's weight as its sparse arrays."""
    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += nbytes(module.weight) + (nbytes(module.bias) if module.bias is not None else 0)
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(nbytes(t) for t in own)
    return total


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A no-argument inference call of ``model`` on ``x`` (what is timed)."""
    def forward() -> None:
        with torch.no_grad():
            model(x)
    return forward


def test_model_forward(benchmark, model_case_id: str, request: pytest.FixtureRequest) -> None:
    case = _CASES[model_case_id]
    cfg = size_config(request.config)
    dense, sparse, mask = models_for(case, request)
    model = dense if case.variant == "dense" else sparse
    in_features = next(m for m in dense.modules() if isinstance(m, nn.Linear)).in_features
    x = torch.randn(case.batch, in_features, generator=torch.Generator().manual_seed(case.batch)).to(case.device)

    with torch.no_grad():
        assert_close(model(x), dense(x).double() if case.device == "cpu" else dense(x), torch.float32, case.id)
    swapped = [name for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    benchmark.group = f"model {case.model}{f' d={case.density:g}' if case.density else ''} B={case.batch} {case.device}"
    benchmark.extra_info.update({
        "kind": "model", "model": case.model, "variant": case.variant, "batch": case.batch,
        "device": case.device, **machine_info(case.device), "dtype": "fp32",
        "density": mask.density(), "density_target": case.density or None,
        "weight_bytes": weight_bytes(model), "dense_weight_bytes": weight_bytes(dense),
        "sparse_layers": swapped,
    })

    forward = _forward(model, x)
    if model is dense:
        run_benchmark(benchmark, forward, case.device, cfg)
    else:
        run_speedup(benchmark, _forward(dense, x), forward, case.device, cfg)
    if not benchmark.disabled:
        benchmark.extra_info["latency_ms"] = 1e3 * float(benchmark.stats.stats.median)
