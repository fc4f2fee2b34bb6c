"""The masked training step against a plain torch step (issue 2's budget: masked <= 1.3x plain,
LeNet-300-100, batch 60, 2 CPU cores). Recorded, never asserted.

The masked step is the loop body of ``sparse_lth.training.train``: forward, cross-entropy,
``zero_grad``, backward, Adam step, then ``weight.mul_(mask)`` for every masked weight. The
plain step is the same without the last part. Both run on MNIST-shaped random inputs and labels, 200 distinct batches cycled (the cost
does not depend on the data, as long as it is not memorized: see ``make_step``) with the paper's Adam 1.2e-3.

Each variant is one pytest-benchmark; the masked one also measures the ratio itself, plain and
masked steps interleaved in short bursts, so that load from other processes on a shared machine
hits both alike (``extra_info["ratio_interleaved"]``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import device_name, run_benchmark, size_config
from sparse_lth.masks import Mask
from sparse_lth.models import build_model
from sparse_lth.pruning import prune_by_magnitude
from sparse_lth.training import TrainSettings, make_optimizer

BATCH = 60
POOL = 200  # distinct random batches (12,000 examples), cycled
RATIO_TARGET = 1.3


def make_step(masked: bool, seed: int = 0) -> tuple[Callable[[], None], nn.Module, Mask]:
    """A training step closure over its own model, optimizer and batch (plain or masked)."""
    model = build_model("lenet300", (1, 28, 28), 10, seed=seed)
    # What the mask holds does not change the cost; 20% alive is a typical mid-search round.
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.8)
    mask.apply(model)
    optimizer = make_optimizer(model.parameters(), TrainSettings(iterations=1))
    params = dict(model.named_parameters())
    alive = [(params[name], m.to(params[name].dtype)) for name, m in mask.items()]
    # A pool of distinct batches, cycled like an epoch: one batch repeated is memorized within
    # a few hundred steps, and the vanishing gradients turn Adam's state into denormals that
    # slow the plain step (all weights trained) far more than the masked one.
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(POOL, BATCH, 1, 28, 28, generator=gen)
    ys = torch.randint(0, 10, (POOL, BATCH), generator=gen)
    counter = iter(range(10**12))
    model.train()

    def step() -> None:
        i = next(counter) % POOL
        loss = F.cross_entropy(model(xs[i]), ys[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if masked:
            with torch.no_grad():
                for weight, m in alive:
                    weight.mul_(m)

    return step, model, mask


def interleaved_ratio(plain: Callable[[], None], masked: Callable[[], None], bursts: int = 7,
                      steps: int = 10) -> tuple[float, float, float]:
    """(plain s/step, masked s/step, masked / plain) from alternating bursts, medians of bursts."""
    times: dict[str, list[float]] = {"plain": [], "masked": []}
    for _ in range(bursts):
        for name, step in (("plain", plain), ("masked", masked)):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    p, m = statistics.median(times["plain"]), statistics.median(times["masked"])
    return p, m, m / p


@pytest.mark.parametrize("variant", ["plain", "masked"])
def test_training_step(benchmark, variant: str, pytestconfig: pytest.Config) -> None:
    cfg = size_config(pytestconfig)
    step, model, mask = make_step(masked=variant == "masked")

    # Check once: from the same start, a masked step equals the plain step times the mask.
    ref_step, ref_model, _ = make_step(masked=False)
    step()
    ref_step()
    got, want = dict(model.named_parameters()), dict(ref_model.named_parameters())
    for name, p in got.items():
        expected = want[name] * mask[name] if variant == "masked" and name in mask else want[name]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6, msg=f"{variant} step, {name}")

    benchmark.group = f"masked step lenet300 B={BATCH} cpu"
    benchmark.extra_info.update({
        "kind": "masked_step", "model": "lenet300", "variant": variant, "batch": BATCH, "device": "cpu",
        "device_name": device_name("cpu"), "optimizer": "adam", "density": mask.density(),
        "threads": torch.get_num_threads(), "ratio_target": RATIO_TARGET,
    })
    if variant == "masked" and not benchmark.disabled:
        plain_step, _, _ = make_step(masked=False)
        for _ in range(5):  # warm both (allocator, Adam state)
            plain_step(), step()
        p, m, ratio = interleaved_ratio(plain_step, step)
        benchmark.extra_info.update({"plain_interleaved_ms": 1e3 * p, "masked_interleaved_ms": 1e3 * m,
                                     "ratio_interleaved": ratio, "within_target": ratio <= RATIO_TARGET})
    run_benchmark(benchmark, step, "cpu", cfg)
