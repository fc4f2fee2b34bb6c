"""A user's own training loop under the lottery search: ``train_fn(model, ctx)``.

The search hands ``train_fn`` the model (reset to this round's start weights, pruned entries
zero) and a :class:`TrainContext`; the loop trains as it always does and calls ``ctx.step()``
once per optimizer step. While it runs, the mask holds without any change to the loop: a
global ``torch.optim`` step hook multiplies every masked weight by its mask after each
optimizer step, whatever the optimizer, weight decay or momentum (masking gradients would not
do: decay and momentum move a weight without one). ``ctx.step()`` applies the mask too, for
optimizers outside ``torch.optim``, and it is how the search counts steps, takes the rewind
snapshot at iteration k and moves the progress bar.

Reproducibility: ``train_fn`` runs with torch's global random generators seeded from
``ctx.seed`` (the search's seed, the same every round, as the paper's loop draws the same data
order every round), inside ``torch.random.fork_rng``, so a ``DataLoader(shuffle=True)``
without its own generator sees the same order in every round, and the caller's random state
is left as it was.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sparse_lth.masks import Mask

__all__ = ["TrainContext", "TrainFn", "run_train_fn", "seeded"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's generators (CPU and every GPU) seeded from ``seed`` inside the block, the caller's
    random state restored after it: what makes a user's initialization and loop reproducible."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _MaskKeeper:
    """Multiplies every masked parameter by its mask: once per call, idempotent and cheap."""

    def __init__(self, model: nn.Module, mask: Mask) -> None:
        params = dict(model.named_parameters())
        self._pairs = [(params[name], alive) for name, alive in mask.items()]

    @torch.no_grad()
    def __call__(self, *_: Any) -> None:
        for i, (weight, alive) in enumerate(self._pairs):
            if alive.device != weight.device or alive.dtype != weight.dtype:
                # train_fn may move the model (model.cuda(), .half()): follow it, once
                alive = alive.to(device=weight.device, dtype=weight.dtype)
                self._pairs[i] = (weight, alive)
            weight.mul_(alive)


@contextlib.contextmanager
def _mask_held(model: nn.Module, mask: Mask) -> Iterator[_MaskKeeper]:
    keeper = _MaskKeeper(model, mask)
    keeper()
    handle = register_optimizer_step_post_hook(keeper)
    try:
        yield keeper
    finally:
        handle.remove()
        keeper()


class TrainContext:
    """What the search tells ``train_fn(model, ctx)``, and the one call it needs: ``ctx.step()``.

    Attributes (read them; the search sets them):

    * ``round``: the round (0 = dense), ``kind``: ``"ticket"``, ``"random_reinit"`` or
      ``"random_mask"``;
    * ``seed``: the search's seed (torch's generators are seeded from it while the loop runs);
    * ``start_step``: the step the weights were rewound to: 0, or k with late rewinding (the
      dense round already trained k steps from theta_0; a loop may skip that many batches or
      advance its learning-rate schedule);
    * ``iterations``: the steps a round is meant to make (``LotteryConfig.iterations``; it sizes
      the progress bar, the loop decides);
    * ``mask``: the round's :class:`~sparse_lth.masks.Mask` (alive = True);
    * ``steps``: the current step number, from ``start_step``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 2)
    >>> mask = Mask({"weight": torch.tensor([[True, False, True, False], [False, True, False, True]])})
    >>> def train_fn(model, ctx):
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ...     for _ in range(3):
    ...         opt.zero_grad()
    ...         model(torch.randn(8, 4)).pow(2).mean().backward()
    ...         opt.step()
    ...         ctx.step()
    ...     return {"loss": 0.5}
    >>> ctx = TrainContext(mask, round=1, kind="ticket", seed=0)
    >>> run_train_fn(train_fn, model, ctx)
    {'loss': 0.5}
    >>> ctx.steps, bool((model.weight[~mask["weight"]] == 0).all())
    (3, True)
    """

    def __init__(self, mask: Mask, *, round: int, kind: str, seed: int, start_step: int = 0,
                 iterations: int | None = None, snapshot_at: int | None = None,
                 progress: Any = None) -> None:
        self.mask, self.round, self.kind, self.seed = mask, round, kind, seed
        self.start_step, self.iterations = start_step, iterations
        self.steps = start_step
        self.history: list[dict[str, float]] = []
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.seconds: float | None = None  # the loop's wall time, once it has run
        self._snapshot_at = snapshot_at
        self._progress = progress
        self._model: nn.Module | None = None
        self._keeper: Callable[[], None] | None = None

    def step(self) -> int:
        """Call once per optimizer step, after it: applies the mask, counts the step, takes the
        rewind snapshot when the step is k, moves the progress bar. Returns the step number."""
        if self._keeper is None or self._model is None:
            raise RuntimeError("ctx.step() is for use inside train_fn, while the search runs it")
        self._keeper()
        self.steps += 1
        if self.steps == self._snapshot_at:
            self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()}
        if self._progress is not None:
            self._progress.update(1)
        return self.steps

    def log(self, **metrics: float) -> None:
        """Record metrics at the current step (say validation loss and accuracy every few
        hundred steps): they are the round's curve in its record. A logged ``val_loss`` also
        gives the round its early-stop step (the paper's: the step of least validation loss)."""
        row = {"step": self.steps, **{name: _number(value, f"ctx.log({name}=...)") for name, value in metrics.items()}}
        self.history.append(row)
        if self._progress is not None:
            self._progress.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)


TrainFn = Callable[[nn.Module, TrainContext], Mapping[str, float]]


def _number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}") from None


def _metrics(result: Any) -> dict[str, float]:
    if not isinstance(result, Mapping) or not result:
        raise ValueError("train_fn must return a non-empty dict of metrics, e.g. {'accuracy': 0.91}; got "
                         f"{type(result).__name__ if not isinstance(result, Mapping) else 'an empty dict'}")
    return {str(name): _number(value, f"train_fn's metric {name!r}") for name, value in result.items()}


def run_train_fn(train_fn: TrainFn, model: nn.Module, ctx: TrainContext) -> dict[str, float]:
    """Run ``train_fn(model, ctx)`` with the mask held after every optimizer step and torch's
    generators seeded from ``ctx.seed``; return its metrics as floats (and time it:
    ``ctx.seconds``). Raises ValueError for a result that is not a dict of numbers."""
    start = time.perf_counter()
    with _mask_held(model, ctx.mask) as keeper, seeded(ctx.seed):
        ctx._model, ctx._keeper = model, keeper
        try:
            result = train_fn(model, ctx)
        finally:
            ctx._model = ctx._keeper = None
    ctx.seconds = time.perf_counter() - start
    return _metrics(result)


def early_stop(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The logged row of least ``val_loss`` (ties: the earliest), or None if none was logged."""
    rows = [r for r in history if "val_loss" in r and not math.isnan(r["val_loss"])]
    return min(rows, key=lambda r: (r["val_loss"], r["step"])) if rows else None
