"""Iterations per second of the search's training loop on 2 ranks x 1 thread against 1 process x 1 thread.

Each measurement is a fresh process (or a fresh ``torchrun --standalone --nproc_per_node 2``)
that times ``sparse_lth.training.train``, the loop the search runs, for ``--iterations`` steps
at the paper's batch of 60 (each rank trains on 30 of every 60, inside DistributedDataParallel),
on Fashion-MNIST-shaped inputs (28 x 28, 10 classes; the real images when the Debian package is
there, else random ones: the cost does not depend on the pixels). Evaluation is held to 60
examples so the figure is the training rate. One and two ranks alternate ``--pairs`` times; the
ratio is of the medians.

    python bench/distributed_speed.py --model conv6 --iterations 60 --pairs 3
    python bench/distributed_speed.py --model lenet300 --iterations 1500 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def worker(model_name: str, iterations: int) -> None:
    """One rank's timing (run under torchrun, or alone); rank 0 prints its/s as JSON."""
    from sparse_lth import distributed
    from sparse_lth.data import Dataset, Split, load_dataset
    from sparse_lth.masks import Mask
    from sparse_lth.models import build_model
    from sparse_lth.training import TrainSettings, train

    torch.set_num_threads(1)
    distributed.init()
    try:
        train_split = load_dataset("fashion-mnist", val_size=60).train
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        train_split = Split(torch.rand(60_000, 1, 28, 28, generator=g), torch.randint(0, 10, (60_000,), generator=g))
    small = Split(train_split.x[:60], train_split.y[:60])
    data = Dataset("fashion-mnist", train_split, small, small, 10)
    model = build_model(model_name, (1, 28, 28), 10, seed=0)
    settings = TrainSettings(iterations=iterations, eval_every=10**9)
    train(model, Mask.ones_like(model), data, TrainSettings(iterations=3, eval_every=10**9), seed=0)  # warm
    distributed.barrier()
    start = time.perf_counter()
    train(model, Mask.ones_like(model), data, settings, seed=0)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main():
        print(json.dumps({"its_per_s": iterations / seconds, "world": distributed.world()}))
    distributed.shutdown()


def measure(model_name: str, iterations: int, ranks: int) -> float:
    script = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, script, "--worker", "--model", model_name, "--iterations", str(iterations)]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(ranks), script, "--worker", "--model", model_name,
               "--iterations", str(iterations)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["its_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="conv6")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.iterations)
        return
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.pairs):
        for ranks in (1, 2):
            rates[ranks].append(measure(args.model, args.iterations, ranks))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"{args.model}, batch 60, {args.iterations} iterations: 1 process x 1 thread {one:.2f} it/s "
          f"{[round(r, 2) for r in rates[1]]}; 2 ranks x 1 thread {two:.2f} it/s {[round(r, 2) for r in rates[2]]}; "
          f"{two / one:.2f}x (medians of {args.pairs}, alternated)")


if __name__ == "__main__":
    main()
