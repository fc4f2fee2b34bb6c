#!/usr/bin/env python
"""Where sparse training starts to pay on this CPU: the table behind ``sparse_training="auto"``.

For each layer shape and density, one training step of the layer (forward, backward, fused Adam,
the search's optimizer), sparse (``TrainableSparseLinear``, CSR) against masked dense (dense
forward and backward, gradient masked, Adam, weights re-masked: ``training.training_step``), at
the search's batch of 60. A layer inside a network computes its input's gradient too; a first
layer does not (``first``). Bursts of consecutive steps of each kind alternate; the figure is the
ratio of the medians (> 1: sparse wins). Prints a table and writes JSON; nothing is asserted.

    python bench/training_crossover.py --out bench/results/cpu-sparse-training-crossover-DATE.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench_sparse_training import make_steps
from harness import SIZE_CONFIGS, burst_plan, interleaved, machine_info, timed_call

BATCH = 60
BURSTS = 9
SHAPES = [  # (out, in, first layer: no input gradient)
    (4096, 4096, False), (4096, 784, True), (1024, 1024, False), (300, 784, True), (100, 300, False),
]
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def measure(out: int, inp: int, density: float, first: bool, budget_s: float) -> dict:
    steps, _, _ = make_steps(out, "csr", None, density, "cpu", torch.float32, inp=inp, batch=BATCH, input_grad=not first)
    dense, sparse = steps["dense"], steps["sparse"]
    for _ in range(3):  # warm: numba's compile, Adam's state, the allocator
        dense()
        sparse()
    cfg = dataclasses.replace(SIZE_CONFIGS["default"], interleaved_s=budget_s, bursts=BURSTS)
    once = {"dense": timed_call(dense, "cpu"), "sparse": timed_call(sparse, "cpu")}
    bursts, calls = burst_plan(once, cfg)
    result = interleaved({"dense": dense, "sparse": sparse}, "cpu", bursts, calls)
    return {"out": out, "in": inp, "first_layer": first, "density": density,
            "dense_ms": result.seconds["dense"] * 1e3, "sparse_ms": result.seconds["sparse"] * 1e3,
            "speedup": result.ratio("dense", "sparse")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the points as JSON here")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per point")
    args = parser.parse_args()
    points = []
    print(f"batch {BATCH}, {torch.get_num_threads()} threads, fused Adam; sparse step / masked-dense step")
    print("layer".ljust(24) + "".join(f"{d:>8.0%}" for d in DENSITIES))
    for out, inp, first in SHAPES:
        row = []
        for density in DENSITIES:
            points.append(measure(out, inp, density, first, args.budget))
            row.append(points[-1]["speedup"])
        label = f"{out} x {inp}" + (" (first)" if first else "")
        print(label.ljust(24) + "".join(f"{r:>7.2f}x" for r in row), flush=True)
    if args.out:
        info = {"machine": machine_info("cpu"), "batch": BATCH, "optimizer": "Adam(fused=True)", "points": points}
        args.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
