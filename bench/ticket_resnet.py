"""A lottery ticket for your own network and loop: a small ResNet on Fashion-MNIST, measured.

The network, data pipeline and training loop below are plain torch, written as a user would
write them; the search only adds ``ctx.step()`` after each optimizer step. The script prints the
ticket table (accuracy against weights remaining, beside the random-reinit control) and the
search's overhead: the same loop run for a burst of steps under the search's machinery (the
ticket's mask held by the optimizer hook, ``ctx.step()``, the progress bar) and without it (a
context whose ``step()`` only counts), bursts alternated, medians per step.

    python bench/ticket_resnet.py --rounds 5 --iterations 500 --out runs

Needs Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist, or --data-dir).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tqdm.auto import tqdm

from sparse_lth import LotteryConfig, Mask, TrainContext, find_ticket, load_dataset
from sparse_lth.user_loop import run_train_fn


class BasicBlock(nn.Module):
    """torchvision's ResNet block: two 3x3 convs with BatchNorm, a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def resnet8(num_classes: int = 10) -> nn.Module:
    """A ResNet-8 for 28x28 grey images: a stem, three stages of one block (16, 32, 64 channels)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def make_train_fn(data, batch_size: int = 64, lr: float = 2e-3):
    """The user's loop: Adam, shuffled mini-batches, validation loss logged every 100 steps."""
    train_set = TensorDataset(data.train.x, data.train.y)

    @torch.no_grad()
    def evaluate(model, split):
        model.eval()
        logits = torch.cat([model(x) for x in split.x.split(2000)])
        model.train()
        return F.cross_entropy(logits, split.y).item(), (logits.argmax(1) == split.y).float().mean().item()

    def train_fn(model, ctx):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
        model.train()
        while ctx.steps < ctx.iterations:
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                ctx.step()
                if ctx.steps % 100 == 0:
                    ctx.log(val_loss=evaluate(model, data.val)[0])
                if ctx.steps >= ctx.iterations:
                    break
        return {"accuracy": evaluate(model, data.test)[1]}

    return train_fn


class PlainContext:
    """The same loop without the search: step() only counts."""

    def __init__(self, iterations: int) -> None:
        self.steps, self.iterations, self.start_step = 0, iterations, 0

    def step(self) -> int:
        self.steps += 1
        return self.steps

    def log(self, **metrics: float) -> None:
        pass


def overhead(train_fn, mask: Mask, steps: int = 99, pairs: int = 7) -> tuple[float, float]:
    """(plain s/step, under-the-search s/step): the loop's first ``steps`` steps, both ways in
    alternation, medians of ``pairs`` bursts each (99 steps: the evaluation at step 100 left out)."""
    times: dict[str, list[float]] = {"plain": [], "search": []}
    for i in range(pairs):
        for kind in ("plain", "search"):
            torch.manual_seed(i)
            model = resnet8()
            start = time.perf_counter()
            if kind == "plain":
                train_fn(model, PlainContext(steps))
            else:
                with tqdm(total=steps, leave=False) as bar:
                    ctx = TrainContext(mask, round=1, kind="ticket", seed=i, iterations=steps, progress=bar)
                    run_train_fn(train_fn, model, ctx)
            times[kind].append((time.perf_counter() - start) / steps)
    return statistics.median(times["plain"]), statistics.median(times["search"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--rewind", type=int, default=50, help="late rewinding to step k (10%% of a round)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("fashion-mnist", args.data_dir)
    train_fn = make_train_fn(data)
    config = LotteryConfig(model="resnet8", dataset="fashion-mnist", rounds=args.rounds, iterations=args.iterations,
                           scope="global", rewind_iteration=args.rewind, controls=("random_reinit",))
    ticket = find_ticket(config, args.out, model_fn=lambda seed: resnet8(), train_fn=train_fn)
    print(ticket.table())
    rounds = [r for rows in (ticket.records, *ticket.controls.values()) for r in rows]
    print(f"\nsearch: {sum(r['seconds'] for r in rounds):.0f} s of training in {len(rounds)} rounds "
          f"({1e3 * statistics.median(r['seconds'] / r['steps'] for r in rounds):.1f} ms/step, median)")
    plain, search = overhead(train_fn, ticket.mask)
    print(f"overhead, interleaved bursts of 99 steps (median of 7 each): plain loop {1e3 * plain:.1f} ms/step, "
          f"under the search {1e3 * search:.1f} ms/step: {100 * (search / plain - 1):+.1f}%")


if __name__ == "__main__":
    main()
