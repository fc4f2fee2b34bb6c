"""The masked train / evaluate loop that the lottery search drives.

Pruned weights stay exactly zero: the mask multiplies the weights after every optimizer step,
so momentum, weight decay and Adam's moments can never revive a pruned weight. (Masking the
gradient alone is not enough: weight decay and momentum move a weight without a gradient.)

One step of that loop is :func:`training_step`, over the pairs :func:`masked_weights` builds;
``train`` runs it, and bench/bench_masked_step.py times the same function (with and without
the mask), so the benchmark measures the library's loop rather than a copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth import distributed
from sparse_lth.data import Dataset, Split
from sparse_lth.masks import Mask

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100


@dataclass
class TrainResult:
    """What one training run measured. ``history`` rows: (iteration, val loss, val acc, test acc)."""

    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    snapshot: dict[str, torch.Tensor] | None = None  # weights at ``snapshot_at`` (for rewinding)

    @property
    def early_stop(self) -> tuple[int, float, float, float]:
        """The paper's early-stop point: the evaluation with the lowest validation loss."""
        return min(self.history, key=lambda row: (row[1], row[0]))

    def summary(self) -> dict[str, float | int]:
        it, loss, val_acc, test_acc = self.early_stop
        best_acc_row = max(self.history, key=lambda row: (row[2], -row[0]))
        return {
            "early_stop_iteration": it,
            "early_stop_val_loss": loss,
            "early_stop_val_accuracy": val_acc,
            "early_stop_test_accuracy": test_acc,
            "best_val_accuracy": best_acc_row[2],
            "best_val_accuracy_iteration": best_acc_row[0],
            "final_test_accuracy": self.history[-1][3],
        }


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {settings.optimizer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, chunk: int = 5000) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``split``.

    With several ranks each evaluates its own share of ``split`` and the sums are added up
    across ranks: every rank returns the whole split's figures."""
    was_training = model.training
    model.eval()
    first, stop = distributed.bounds(len(split))
    loss, correct = 0.0, 0
    for start in range(first, stop, chunk):
        end = min(start + chunk, stop)
        logits = model(split.x[start:end])
        y = split.y[start:end]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    if distributed.world() > 1:
        loss, correct = distributed.all_sum([loss, correct])
    return loss / len(split), correct / len(split)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batch indices, a fresh permutation every epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def masked_weights(model: nn.Module, mask: Mask) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask in the parameter's dtype) for every masked parameter of ``model``: what
    :func:`training_step` multiplies after each optimizer step (converted once, not per step)."""
    params = dict(model.named_parameters())
    return [(params[name], alive.to(params[name].dtype)) for name, alive in mask.items()]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  masked: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """One masked step: forward, cross-entropy, ``zero_grad``, backward, optimizer step, then
    ``weight *= alive`` for every pair of ``masked`` (:func:`masked_weights`); an empty
    ``masked`` is a plain torch step. Returns the loss of the batch (detached)."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # after the step: the optimizer's own update cannot revive a weight
        for weight, alive in masked:
            weight.mul_(alive)
    return loss.detach()


def train(model: nn.Module, mask: Mask, data: Dataset, settings: TrainSettings, seed: int,
          start_step: int = 0, snapshot_at: int | None = None, progress=None) -> TrainResult:
    """Train ``model`` in place under ``mask`` from step ``start_step`` to ``settings.iterations``.

    Evaluates validation loss/accuracy and test accuracy every ``eval_every`` steps and at the
    end. The data order depends only on ``seed`` and the step, so training resumed from a
    rewind point k (``start_step=k``) sees the batches an uninterrupted run would have seen.
    With several ranks (torchrun), each trains on its shard of every global batch inside
    DistributedDataParallel: the same mean gradient as one process (see ``distributed``).
    ``snapshot_at=k`` also returns a copy of the weights after step k (for late rewinding).
    ``progress`` is an optional tqdm bar advanced once per step.
    """
    mask.apply(model)
    masked = masked_weights(model, mask)
    optimizer = make_optimizer(model.parameters(), settings)
    net = distributed.wrap(model)  # the model itself in one process
    batches = _batches(len(data.train), settings.batch_size, torch.Generator().manual_seed(seed))
    for _ in range(start_step):
        next(batches)
    result = TrainResult()
    model.train()
    for step in range(start_step + 1, settings.iterations + 1):
        idx = distributed.shard(next(batches))
        training_step(net, optimizer, masked, data.train.x[idx], data.train.y[idx])
        if snapshot_at is not None and step == snapshot_at:
            result.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step % settings.eval_every == 0 or step == settings.iterations:
            val_loss, val_acc = evaluate(model, data.val)
            _, test_acc = evaluate(model, data.test)
            result.history.append((step, val_loss, val_acc, test_acc))
            if progress is not None:
                progress.set_postfix(val_loss=f"{val_loss:.3f}", test_acc=f"{test_acc:.4f}", refresh=False)
        if progress is not None:
            progress.update(1)
    return result
