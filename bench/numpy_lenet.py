#!/usr/bin/env python
"""The yardstick for the search's own speed: one LeNet-300-100 round of the paper's protocol in
plain numpy, against the same round through ``sparse-lth search``, one thread each.

The round: Glorot-initialized 784-300-100-10, Adam (lr 1.2e-3), batch 60, ``--iterations``
steps (5,000 by default), validation (5,000 held-out training images) and test (10,000)
evaluated every 100 steps, a 20% mask applied after every step. The numpy version is written
out by hand (forward, cross-entropy, backward, Adam) with float32 arrays and one BLAS thread;
the library's round is the whole CLI command (start-up included) for a 1-round search, whose
two trainings are timed by the run's own records. The two alternate (numpy, command, numpy, ...,
numpy), and each command is set against the two numpy rounds beside it, so that a slow spell on a
shared machine weighs on both sides; the median ratio is the figure. Nothing is asserted.

    python bench/numpy_lenet.py                # Fashion-MNIST from /usr/share/datasets, 3 commands
    python bench/numpy_lenet.py --repeats 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread, before numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def glorot(rng: np.random.Generator, fan_out: int, fan_in: int) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), (fan_out, fan_in)).astype(np.float32)


def forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    w1, b1, w2, b2, w3, b3 = params
    h1 = np.maximum(x @ w1.T + b1, 0)
    h2 = np.maximum(h1 @ w2.T + b2, 0)
    return h2 @ w3.T + b3, [x, h1, h2]


def loss_and_probs(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()), p


def evaluate(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits, _ = forward(params, x)
    loss, _ = loss_and_probs(logits, y)
    return loss, float((logits.argmax(1) == y).mean())


def numpy_round(train_x, train_y, val_x, val_y, test_x, test_y, iterations: int, seed: int = 0
                ) -> tuple[float, float]:
    """(seconds, last test accuracy) of one masked round."""
    rng = np.random.default_rng(seed)
    params = [glorot(rng, 300, 784), np.zeros(300, np.float32), glorot(rng, 100, 300),
              np.zeros(100, np.float32), glorot(rng, 10, 100), np.zeros(10, np.float32)]
    masks = {0: rng.random((300, 784)) >= 0.2, 2: rng.random((100, 300)) >= 0.2, 4: rng.random((10, 100)) >= 0.1}
    masks = {i: m.astype(np.float32) for i, m in masks.items()}
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    lr, b1, b2, eps = 1.2e-3, 0.9, 0.999, 1e-8
    order = rng.permutation(len(train_x))
    start = time.perf_counter()
    for step in range(1, iterations + 1):
        at = ((step - 1) * 60) % (len(order) - 60)
        idx = order[at:at + 60]
        x, y = train_x[idx], train_y[idx]
        logits, (a0, h1, h2) = forward(params, x)
        _, p = loss_and_probs(logits, y)
        d3 = p
        d3[np.arange(60), y] -= 1
        d3 /= 60
        grads = [None] * 6
        grads[4], grads[5] = d3.T @ h2, d3.sum(0)
        d2 = (d3 @ params[4]) * (h2 > 0)
        grads[2], grads[3] = d2.T @ h1, d2.sum(0)
        d1 = (d2 @ params[2]) * (h1 > 0)
        grads[0], grads[1] = d1.T @ a0, d1.sum(0)
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step
        for i, g in enumerate(grads):
            m[i] *= b1
            m[i] += (1 - b1) * g
            v[i] *= b2
            v[i] += (1 - b2) * g * g
            params[i] -= lr * (m[i] / c1) / (np.sqrt(v[i] / c2) + eps)
        for i, mask in masks.items():
            params[i] *= mask
        if step % 100 == 0 or step == iterations:
            evaluate(params, val_x, val_y)
            _, test_acc = evaluate(params, test_x, test_y)
    return time.perf_counter() - start, test_acc


def library_round(iterations: int) -> tuple[float, list[float]]:
    """The whole ``sparse-lth search`` command for 1 round (2 trainings) on one thread."""
    with tempfile.TemporaryDirectory() as out:
        exe = Path(sys.executable).with_name("sparse-lth")
        start = time.perf_counter()
        subprocess.run([str(exe), "search", "--model", "lenet300", "--dataset", "fashion-mnist", "--rounds", "1",
                        "--iterations", str(iterations), "--eval-every", "100", "--controls", "", "--threads", "1",
                        "--out", out], check=True, capture_output=True)
        whole = time.perf_counter() - start
        rounds = [json.loads(p.read_text())["seconds"] for p in sorted(Path(out).glob("*/round_*/record.json"))]
    return whole, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3, help="library commands, each between two numpy rounds")
    args = ap.parse_args()
    from sparse_lth.data import load_dataset

    data = load_dataset("fashion-mnist")
    arrays = [t.numpy().reshape(len(t), -1).astype(np.float32) if t.is_floating_point() else t.numpy()
              for split in (data.train, data.val, data.test) for t in (split.x, split.y)]

    def numpy_seconds() -> float:
        seconds, test_acc = numpy_round(*arrays, iterations=args.iterations)
        print(f"numpy round: {seconds:.1f} s ({args.iterations} steps, evaluation every 100; test accuracy "
              f"{100 * test_acc:.2f}%)", flush=True)
        return seconds

    ratios, before = [], numpy_seconds()
    for _ in range(args.repeats):
        whole, rounds = library_round(args.iterations)
        after = numpy_seconds()
        ratios.append(whole / (before + after))
        print(f"sparse-lth search, 1 round (2 trainings): {whole:.1f} s whole command; trainings "
              + " / ".join(f"{r:.1f} s" for r in rounds)
              + f"; {ratios[-1]:.2f}x the two numpy rounds beside it", flush=True)
        before = after
    print(f"median: the whole command takes {statistics.median(ratios):.2f}x two numpy rounds "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} commands)")


if __name__ == "__main__":
    main()
