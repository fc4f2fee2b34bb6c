"""The masked train / evaluate loop that the lottery search drives.

Pruned weights stay exactly zero: the mask multiplies the weights after every optimizer step,
so momentum, weight decay and Adam's moments can never revive a pruned weight. (Masking the
gradient alone is not enough: weight decay and momentum move a weight without a gradient.)

One step of that loop is :func:`training_step`, over the pairs :func:`masked_weights` builds;
``train`` runs it, and bench/bench_masked_step.py times the same function (with and without
the mask), so the benchmark measures the library's loop rather than a copy of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth import distributed, optim
from sparse_lth.data import Dataset, Split
from sparse_lth.masks import Mask
from sparse_lth.nn import TrainableSparseLinear
from sparse_lth.eval_paths import onednn_linears, sparse_convs

OPTIMIZERS = ("adam", "sgd")
SPARSE_TRAINING = ("auto", "always", "never")
#: ``sparse_training="auto"``: (at least this many weights, at most this density) pairs; a masked
#: nn.Linear trains sparse when it meets one of them. Measured on 2 CPU cores, batch 60, fp32,
#: one step of the layer (forward, backward, fused Adam), sparse on the numba kernels against
#: masked dense with its mask in the weight's dtype, in a process that keeps freed memory as the
#: search's does (``bench/training_crossover.py``, bench/RESULTS.md, two runs, after the fused
#: backward): 4096 x 4096 1.56-1.57x at 50%, 1.28-1.32x at 60%, 1.09-1.13x at 70%, 0.95-0.98x at
#: 80%; 4096 x 784 (a first layer) 1.20-1.23x at 60%, 1.05-1.16x at 70%; 1024 x 1024 1.25-1.67x
#: at 50%, 1.09-1.45x at 60%, 0.93-1.22x at 70%; 300 x 784 (first) and 100 x 300 not reliably
#: (0.5-0.7x for 100 x 300: fixed costs). Each bound sits one step inside the measured
#: break-even (a round also evaluates, which does not get faster; in whole mlp4096 rounds a
#: layer's 1.03x at 50% had once turned into 0.85x). Smaller layers stay masked dense:
#: LeNet-300-100's fc1 (235K weights) trained sparse at <= 10% made the whole 6-round command
#: 3.5% slower (numba's start-up outweighs a gain on one small layer).
SPARSE_TRAINING_RULE: tuple[tuple[int, float], ...] = ((1 << 21, 0.6), (1 << 20, 0.5))


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100
    sparse_training: str = "never"


@dataclass
class TrainResult:
    """What one training run measured. ``history`` rows: (iteration, val loss, val acc, test acc)."""

    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    snapshot: dict[str, torch.Tensor] | None = None  # weights at ``snapshot_at`` (for rewinding)
    plan: dict[str, str] = field(default_factory=dict)  # weight -> "sparse" | "masked-dense"
    seconds: float = 0.0  # wall time of the steps and evaluations

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


def make_optimizer(params, settings: TrainSettings) -> optim.Adam | optim.SGD:
    """The round's optimizer: torch's updates through :mod:`sparse_lth.optim` (no torch._dynamo
    import: 1.5 s of start-up). Adam is torch's fused implementation (the same update, one
    kernel over all parameters): on one CPU thread a LeNet-300-100 step took 1.45-1.50 ms
    against 1.86-2.21 ms with the default per-parameter loop (bench/numpy_lenet.py's round)."""
    if settings.optimizer == "adam":
        return optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {settings.optimizer!r}")


#: Evaluation chunks: at most this many examples, and few enough that the widest activation of a
#: chunk stays near :data:`EVAL_ACTIVATION_BYTES`. An MLP's products want thousands of rows
#: (LeNet-300-100, 10,000 test images on 2 cores: 34-35 ms in chunks of 2,000-5,000, 42 ms in
#: chunks of 1,000); a conv net's 5,000-image chunk made maps of 1 GB that ran at half speed
#: (conv2 11.7 s against 5.0-5.2 s in chunks of 500-1,000; conv6 21.3 s against 12.9-13.3 s).
EVAL_CHUNK = 5000
EVAL_ACTIVATION_BYTES = 128 << 20


def eval_chunk(model: nn.Module, example: torch.Tensor, cap: int = EVAL_CHUNK) -> int:
    """How many examples like ``example`` (one, batched: [1, ...]) an evaluation pass of ``model``
    takes at once: ``cap``, or fewer where one example's widest activation (measured by a forward
    pass of ``example``) times the chunk would pass :data:`EVAL_ACTIVATION_BYTES`.

    >>> from sparse_lth.models import build_model
    >>> eval_chunk(build_model("lenet300"), torch.zeros(1, 1, 28, 28))
    5000
    >>> eval_chunk(build_model("conv2"), torch.zeros(1, 1, 28, 28))  # 64 maps of 28 x 28: 200 KB
    668
    """
    widest = example[0].numel() * example.element_size()

    def measure(_module, _inputs, output) -> None:
        nonlocal widest
        if isinstance(output, torch.Tensor):
            widest = max(widest, output[0].numel() * output.element_size())

    hooks = [m.register_forward_hook(measure) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(cap, EVAL_ACTIVATION_BYTES // widest))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, chunk: int | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``split``, in chunks of ``chunk``
    examples (default: :func:`eval_chunk`'s).

    With several ranks each evaluates its own share of ``split`` and the sums are added up
    across ranks: every rank returns the whole split's figures."""
    was_training = model.training
    model.eval()
    first, stop = distributed.bounds(len(split))
    if chunk is None:
        chunk = eval_chunk(model, split.x[first:first + 1]) if stop > first else EVAL_CHUNK
    loss, correct = 0.0, 0
    # faster GEMMs, and pruned convs on the direct sparse kernel, on the CPU
    with onednn_linears(model, rows=min(chunk, stop - first)), sparse_convs(model):
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
    :func:`training_step` multiplies after each optimizer step (converted once, not per step).
    A mask that keeps every weight is left out: multiplying by 1 changes nothing (round 0 of a
    search; for 784-4096-4096-10 that multiply took 4.8 ms of a ~90 ms step on 2 cores, for
    LeNet-300-100 26 us of 1.26 ms on one).

    >>> from sparse_lth.models import build_model
    >>> model = build_model("lenet300", (1, 28, 28), 10)
    >>> keep_all = Mask({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()
    ...                  if n.endswith("weight")})
    >>> masked_weights(model, keep_all)
    []
    """
    params = dict(model.named_parameters())
    return [(params[name], alive.to(params[name].dtype)) for name, alive in mask.items() if not bool(alive.all())]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer | optim.Adam | optim.SGD,
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


def sparse_training_plan(model: nn.Module, mask: Mask, mode: str) -> dict[str, str]:
    """Per masked ``nn.Linear`` weight, how a round trains it: ``"sparse"`` (a
    :class:`~sparse_lth.nn.TrainableSparseLinear` over the mask's pattern) or ``"masked-dense"``.
    ``mode`` "always" trains every one sparse, "never" none, "auto" those that meet
    :data:`SPARSE_TRAINING_RULE` (larger layers up to higher densities: 2^20 weights at 50%,
    2^21 at 60%).

    >>> from sparse_lth.models import build_model
    >>> model = build_model("lenet300", (1, 28, 28), 10)
    >>> mask = Mask({n: torch.rand(p.shape) < 0.1 for n, p in model.named_parameters() if n.endswith("weight")})
    >>> sparse_training_plan(model, mask, "auto")  # LeNet's layers are too small to pay
    {'fc1.weight': 'masked-dense', 'fc2.weight': 'masked-dense', 'out.weight': 'masked-dense'}
    >>> sparse_training_plan(model, mask, "always")["fc1.weight"]
    'sparse'
    """
    if mode not in SPARSE_TRAINING:
        raise ValueError(f"sparse_training must be one of {SPARSE_TRAINING}, got {mode!r}")
    plan = {}
    modules = dict(model.named_modules())
    for name, alive in mask.items():
        owner = modules.get(name.rpartition(".")[0])
        if type(owner) is not nn.Linear or not name.endswith("weight"):
            continue
        density = float(alive.sum()) / max(alive.numel(), 1)
        pays = any(alive.numel() >= weights and density <= most for weights, most in SPARSE_TRAINING_RULE)
        plan[name] = "sparse" if mode == "always" or (mode == "auto" and pays) else "masked-dense"
    return plan


def _swap_to_sparse(model: nn.Module, mask: Mask, plan: dict[str, str]) -> dict[str, nn.Linear]:
    """Put a TrainableSparseLinear in place of each layer the plan trains sparse; return the
    dense layers taken out, by module name (their parameters get the trained values back)."""
    taken = {}
    for name, how in plan.items():
        if how != "sparse":
            continue
        module_name = name.rpartition(".")[0]
        dense = model.get_submodule(module_name)
        _set_submodule(model, module_name, TrainableSparseLinear.from_linear(dense, mask=mask[name]))
        taken[module_name] = dense
    return taken


def _swap_back(model: nn.Module, taken: dict[str, nn.Linear]) -> None:
    """Copy each sparse layer's trained weights into the dense layer it replaced (pruned entries
    zero), and put the dense layer back: the model's parameters are the same objects as before."""
    for module_name, dense in taken.items():
        sparse = model.get_submodule(module_name)
        with torch.no_grad():
            dense.weight.copy_(sparse.dense_weight())
            if dense.bias is not None:
                dense.bias.copy_(sparse.bias)
        _set_submodule(model, module_name, dense)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dense_state(model: nn.Module, taken: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The model's state dict as the dense model would have it (copies)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in taken}
    for module_name in taken:
        sparse = model.get_submodule(module_name)
        state[f"{module_name}.weight"] = sparse.dense_weight()
        if sparse.bias is not None:
            state[f"{module_name}.bias"] = sparse.bias.detach().clone()
    return state


def train(model: nn.Module, mask: Mask, data: Dataset, settings: TrainSettings, seed: int,
          start_step: int = 0, snapshot_at: int | None = None, progress=None) -> TrainResult:
    """Train ``model`` in place under ``mask`` from step ``start_step`` to ``settings.iterations``.

    Evaluates validation loss/accuracy and test accuracy every ``eval_every`` steps and at the
    end. The data order depends only on ``seed`` and the step, so training resumed from a
    rewind point k (``start_step=k``) sees the batches an uninterrupted run would have seen.
    With several ranks (torchrun), each trains on its shard of every global batch inside
    DistributedDataParallel: the same mean gradient as one process (see ``distributed``).
    ``snapshot_at=k`` also returns a copy of the weights after step k (for late rewinding).
    ``progress`` is an optional tqdm bar advanced once per step. ``settings.sparse_training``
    trains some layers sparse (:func:`sparse_training_plan`, recorded in ``result.plan``): the
    same updates as masked-dense training up to float rounding, at a cost that falls with the
    density; the model holds its dense layers again when this returns.
    """
    mask.apply(model)
    result = TrainResult(plan=sparse_training_plan(model, mask, settings.sparse_training))
    start = time.perf_counter()
    taken = _swap_to_sparse(model, mask, result.plan)
    try:
        _train_steps(model, mask, data, settings, seed, start_step, snapshot_at, progress, result, taken)
    finally:
        _swap_back(model, taken)
    result.seconds = time.perf_counter() - start
    return result


def _train_steps(model: nn.Module, mask: Mask, data: Dataset, settings: TrainSettings, seed: int,
                 start_step: int, snapshot_at: int | None, progress, result: TrainResult,
                 taken: dict[str, nn.Linear]) -> None:
    dense_trained = Mask({name: alive for name, alive in mask.items()
                          if name.rpartition(".")[0] not in taken})
    masked = masked_weights(model, dense_trained)
    optimizer = make_optimizer(model.parameters(), settings)
    net = distributed.wrap(model)  # the model itself in one process
    batches = _batches(len(data.train), settings.batch_size, torch.Generator().manual_seed(seed))
    for _ in range(start_step):
        next(batches)
    model.train()
    for step in range(start_step + 1, settings.iterations + 1):
        idx = distributed.shard(next(batches))
        # index_select, not x[idx]: the same rows, gathered in 28 us instead of 60 (LeNet's 60 images)
        x, y = data.train.x.index_select(0, idx), data.train.y.index_select(0, idx)
        training_step(net, optimizer, masked, x, y)
        if snapshot_at is not None and step == snapshot_at:
            result.snapshot = _dense_state(model, taken)
        if step % settings.eval_every == 0 or step == settings.iterations:
            val_loss, val_acc = evaluate(model, data.val)
            _, test_acc = evaluate(model, data.test)
            result.history.append((step, val_loss, val_acc, test_acc))
            if progress is not None:
                progress.set_postfix(val_loss=f"{val_loss:.3f}", test_acc=f"{test_acc:.4f}", refresh=False)
        if progress is not None:
            progress.update(1)
