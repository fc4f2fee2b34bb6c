"""Sparse convs inside a model, not alone: three convs with batch norm and ReLU between, dense
against ``sparsify`` (every conv on the direct sparse kernel) and against ``sparsify`` calibrated
at the input shape. Recorded, never asserted.

Stages (fp32, channels in = out, stride 1): 3x3 with 128 channels at 28x28, 3x3 with 512 channels
at 7x7, 1x1 with 256 channels at 28x28; batch 1 and 16; unstructured masks at 10 / 5 / 2%
density. The three models of a point are timed interleaved in alternating bursts
(``harness.interleaved``) and each figure is the median of its bursts, so a ratio compares calls
that met the same load. Issue 13's goals are for one conv alone (3x3: 2 / 4 / 6x at 90 / 95 /
98% sparsity; 1x1: 1.5x at 90%); here the batch norms and ReLUs stay dense and are timed too.

    python bench/conv_in_model.py [--threads 2] [--smoke] > in_model.md
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import torch
from torch import nn

from harness import SIZE_CONFIGS, burst_plan, interleaved, warm_time
from sparse_lth.kernels.cpu_conv import warm_up
from sparse_lth.nn import sparsify

STAGES = [(3, 128, 28), (3, 512, 7), (1, 256, 28)]  # kernel, channels, pixels
BATCHES = (1, 16)
DENSITIES = (0.1, 0.05, 0.02)
#: A second per point for the three models together, in up to 9 bursts each.
TIMING = replace(SIZE_CONFIGS["default"], interleaved_s=1.0, bursts=9)
#: ``--smoke``: tiny stages, one density, a few bursts (the script runs end to end in seconds).
SMOKE = ([(3, 8, 6), (1, 8, 6)], (1, 2), (0.1,), replace(SIZE_CONFIGS["default"], interleaved_s=0.05, bursts=3))


def stage(kernel: int, channels: int) -> nn.Module:
    """Three ``conv -> batch norm -> ReLU`` blocks, the batch norms with non-trivial statistics."""
    layers: list[nn.Module] = []
    for _ in range(3):
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        layers += [nn.Conv2d(channels, channels, kernel, padding=kernel // 2), bn, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few bursts: checks the script runs")
    args = parser.parse_args()
    stages, batches, densities, timing = SMOKE if args.smoke else (STAGES, BATCHES, DENSITIES, TIMING)
    torch.set_num_threads(args.threads)
    warm_up()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; ms per forward (median of "
          "interleaved bursts); speed-up over dense\n")
    print("| stage | batch | sparsity | dense | sparse | calibrated | sparse x | calibrated x | calibrated choice |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel, channels, pixels in stages:
        torch.manual_seed(0)
        dense = stage(kernel, channels)
        for density in densities:
            mask = {name: torch.rand(p.shape, generator=g) < density
                    for name, p in dense.named_parameters() if name.endswith("weight") and p.dim() == 4}
            for name, m in mask.items():  # the dense model computes with the same masked weights
                dense.get_parameter(name).data.mul_(m)
            for batch in batches:
                x = torch.randn(batch, channels, pixels, pixels, generator=g)
                sparse = sparsify(copy.deepcopy(dense), mask=mask, max_density=1.0)  # convs: the direct kernel on the CPU
                calibrated = sparsify(copy.deepcopy(dense), mask=mask, max_density=1.0, example_inputs=x)
                fns = {"dense": dense, "sparse": sparse, "calibrated": calibrated}
                with torch.no_grad():
                    ref = dense(x)
                    for name in ("sparse", "calibrated"):
                        torch.testing.assert_close(fns[name](x), ref, rtol=1e-4, atol=1e-4)
                    calls = {name: (lambda model=model: model(x)) for name, model in fns.items()}
                    once = {name: warm_time(fn, "cpu", timing) for name, fn in calls.items()}
                    bursts, per_burst = burst_plan(once, timing)
                    ms = {name: 1e3 * s for name, s in interleaved(calls, "cpu", bursts, per_burst).seconds.items()}
                choice = ", ".join(sorted({m.backend for m in calibrated.modules() if hasattr(m, "calibration")
                                           and m.calibration is not None})) or "-"
                print(f"| {kernel}x{kernel} {channels} ch {pixels}x{pixels} | {batch} | {1 - density:.0%} | "
                      f"{ms['dense']:.3f} | {ms['sparse']:.3f} | {ms['calibrated']:.3f} | "
                      f"{ms['dense'] / ms['sparse']:.2f} | {ms['dense'] / ms['calibrated']:.2f} | {choice} |",
                      flush=True)


if __name__ == "__main__":
    main()
