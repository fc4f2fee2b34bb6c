"""What each round of a search costs once deployed: bytes and CPU latency, dense against sparse.

One job, measuring. For every completed round of a run directory (the ticket's rounds, not
the controls'), :func:`measure_run` rebuilds the network from the round's trained weights and
measures, on this machine:

* bytes: the dense state dict (its tensors' bytes, fp32 for the built-in models) against the
  sparse checkpoint ``sparse-lth convert RUN_DIR DST --round N`` writes (that file's size,
  header included; written to a temporary folder and deleted);
* latency: one forward pass at each batch size, the dense model (pruned weights zero) against
  the model as a user deploys it for that batch size: ``sparsify(model, mask=<the round's
  mask>, max_density=1.0, example_inputs=x)``, each layer on the path calibration found
  fastest there (dense where sparse does not pay). Under ``torch.inference_mode``, the median
  of ``reps`` interleaved repetitions (each repetition times both models once, in a rotating
  order, so a slow spell of the machine falls on both alike), at torch's CPU thread count
  (``torch.get_num_threads()``: set it beforehand to change it).

The accuracy shown beside them is the round's recorded test accuracy at the early-stop
iteration (``early_stop_test_accuracy``). :func:`~sparse_lth.report_table.costs_table` makes
the table and :func:`~sparse_lth.plots.plot_costs` the figures.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_lth import run_files
from sparse_lth.bench_report import cpu_model
from sparse_lth.checkpoint import convert_checkpoint
from sparse_lth.models import MODELS, build_model
from sparse_lth.nn import sparsify

__all__ = ["RoundCost", "RunCosts", "measure_run"]

DEFAULT_BATCH_SIZES = (1, 64)
DEFAULT_REPS = 5
_MIN_SAMPLE_SECONDS = 0.005  # one timed sample repeats the call until it takes about this long
_MAX_CALLS_PER_SAMPLE = 10_000
_WARMUP_CALLS = 2
_ESTIMATE_CALLS = 3


@dataclass(frozen=True)
class RoundCost:
    """One round deployed: its share of weights left, recorded test accuracy at early stop (a
    fraction; None where the record holds none), bytes dense and sparse, the layers
    ``sparsify`` swapped, seconds per forward pass by batch size, dense and sparse, and the
    largest difference between the two models' outputs on the timed inputs (float rounding
    only: they compute the same function)."""

    round: int
    weights_remaining: float
    test_accuracy: float | None
    dense_bytes: int
    sparse_bytes: int
    sparse_layers: tuple[str, ...]
    dense_seconds: dict[int, float]
    sparse_seconds: dict[int, float]
    max_abs_diff: float

    @property
    def bytes_ratio(self) -> float:
        """dense bytes / sparse bytes: above 1 when the sparse file is smaller."""
        return self.dense_bytes / self.sparse_bytes

    def speedup(self, batch: int) -> float:
        """dense seconds / sparse seconds at ``batch``: above 1 when the sparse model is faster."""
        return self.dense_seconds[batch] / self.sparse_seconds[batch]


@dataclass(frozen=True)
class RunCosts:
    """The costs of every measured round of a run, and what they were measured on;
    ``pruned_weights`` names the weights the search prunes (the masks' entries)."""

    run_dir: str
    model: str
    input_shape: tuple[int, ...]
    pruned_weights: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    reps: int
    threads: int
    machine: str
    torch_version: str
    rounds: list[RoundCost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (batch sizes as string keys, as JSON has them)."""
        data = asdict(self)
        for r in data["rounds"]:
            for key in ("dense_seconds", "sparse_seconds"):
                r[key] = {str(b): s for b, s in r[key].items()}
        return data


def _conv_weights(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for name, t in state.items() if name.startswith("features.") and t.dim() == 4]


def _input_shape(model: str, state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """An input shape the built-in ``model`` with these weights takes, read off the weights:
    the fully connected networks flatten their input (any shape of that size does); Conv-2/4/6
    need channels and a height and width that pool down to what ``fc1`` reads (square when it
    can be, as every built-in dataset is)."""
    if model in ("lenet300", "mlp4096"):
        return (1, state["fc1.weight"].shape[1])
    convs = _conv_weights(state)
    pools = len(convs) // 2
    width = convs[-1].shape[0]
    cells, rest = divmod(state["fc1.weight"].shape[1], width)
    if rest or cells < 1:
        raise ValueError(f"fc1 reads {state['fc1.weight'].shape[1]} features, not a multiple of the last conv "
                         f"layer's {width} channels")
    side = math.isqrt(cells)
    rows, cols = (side, side) if side * side == cells else (1, cells)
    return (convs[0].shape[1], rows * 2 ** pools, cols * 2 ** pools)


def _rebuild(run_dir: Path, model_name: str, state: dict[str, torch.Tensor]) -> tuple[nn.Module, tuple[int, ...]]:
    """The built-in network the run searched, holding ``state``, and an input shape it takes."""
    if model_name not in MODELS:
        raise ValueError(f"{run_dir} was searched with a model of your own ({model_name!r}); report rebuilds "
                         f"the built-in models only ({', '.join(MODELS)}): measure yours with sparsify and "
                         "save_sparse")
    try:
        shape = _input_shape(model_name, state)
        num_classes = state["out.weight"].shape[0]
        model = build_model(model_name, shape, num_classes)
        model.load_state_dict(state)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        problem = " ".join(str(e).split())[:300]
        raise ValueError(f"{run_dir}: its weights do not fit the built-in {model_name!r} ({problem}); "
                         "was it searched with a model_fn of your own?") from None
    return model.eval(), shape


def _seconds_per_call(forward: Callable[[], Any]) -> float:
    """A first estimate, after warming ``forward`` up, of the seconds one call takes."""
    for _ in range(_WARMUP_CALLS):
        forward()
    start = time.perf_counter()
    for _ in range(_ESTIMATE_CALLS):
        forward()
    return (time.perf_counter() - start) / _ESTIMATE_CALLS


def _sample(forward: Callable[[], Any], calls: int) -> float:
    """Seconds per call over ``calls`` calls, after one untimed call: the first call after
    another model or batch size ran pays for cold caches, which would count against whichever
    case makes the fewest calls per sample."""
    forward()
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    return (time.perf_counter() - start) / calls


def _latencies(models: dict[str, nn.Module], inputs: dict[int, torch.Tensor], reps: int,
               tick: Callable[[], None]) -> dict[str, dict[int, float]]:
    """Median seconds per call of every model at every batch size, over ``reps`` interleaved
    repetitions (the order rotates each repetition); ``tick`` after each repetition. Every model
    makes the same number of calls per sample at a batch size, enough for the slowest of them to
    take about _MIN_SAMPLE_SECONDS."""
    cases = [(name, batch) for batch in inputs for name in models]
    forwards = {(name, batch): (lambda m=models[name], x=inputs[batch]: m(x)) for name, batch in cases}
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    with torch.inference_mode():
        estimate = {case: _seconds_per_call(forwards[case]) for case in cases}
        calls = {batch: max(1, min(_MAX_CALLS_PER_SAMPLE, math.ceil(
            _MIN_SAMPLE_SECONDS / max(max(estimate[(name, batch)] for name in models), 1e-9)))) for batch in inputs}
        for rep in range(reps):
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                samples[case].append(_sample(forwards[case], calls[case[1]]))
            tick()
    return {name: {batch: statistics.median(samples[(name, batch)]) for batch in inputs} for name in models}


def _sparse_layers(model: nn.Module) -> tuple[str, ...]:
    """The layers holding their weights sparse (the door checkpoint.save_sparse uses too)."""
    return tuple(name for name, m in model.named_modules() if callable(getattr(m, "sparse_state_dict", None)))


def measure_run(run_dir: str | Path, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, reps: int = DEFAULT_REPS,
                rounds: Sequence[int] | None = None, progress: bool = True) -> RunCosts:
    """Measure bytes and CPU latency of each round of a run, dense against sparse (module doc).

    ``rounds`` picks rounds by number (default: every completed one); ``reps`` bounds the time
    spent (each repetition times every model and batch size once, a few milliseconds each on a
    small network). Progress shows on a tqdm bar unless ``progress=False``. Raises
    ``ValueError`` for a folder that is no run directory, a round that is not there, or a run
    of a model this library cannot rebuild (a ``model_fn`` of your own).

    >>> import tempfile
    >>> from sparse_lth import LotteryConfig, find_ticket
    >>> config = LotteryConfig(dataset="digits", rounds=1, iterations=20, eval_every=10, controls=(),
    ...                        prune_fraction=0.9)
    >>> run = find_ticket(config, tempfile.mkdtemp(), progress=False).run_dir
    >>> costs = measure_run(run, reps=1, progress=False)
    >>> [(r.round, r.sparse_bytes < r.dense_bytes) for r in costs.rounds]
    [(0, False), (1, True)]
    >>> sorted(costs.rounds[1].dense_seconds)
    [1, 64]
    """
    run_dir = Path(run_dir)
    if not run_files.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory of a lottery search (no {run_files.CONFIG_FILE})")
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    batch_sizes = tuple(dict.fromkeys(int(b) for b in batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    records = run_files.read_records(run_dir)
    if not records:
        raise ValueError(f"{run_dir} holds no completed round yet")
    try:
        wanted = [int(r["round"]) for r in records] if rounds is None else \
            [run_files.pick_round(records, round=r) for r in rounds]
    except ValueError as e:
        raise ValueError(f"{run_dir}: {e}") from None
    model_name = run_files.read_config(run_dir).get("model")
    # The architecture, from theta_0, before the progress bar starts: a refusal is one clean line.
    model, shape = _rebuild(run_dir, str(model_name), run_files.read_init(run_dir))
    costs: list[RoundCost] = []
    pruned: tuple[str, ...] = ()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sparse-lth-report-") as tmp, \
            tqdm(total=len(wanted) * reps * len(batch_sizes), desc="measuring", unit="rep", disable=not progress) as bar:
        for r in wanted:
            bar.set_postfix_str(f"round {r}")
            mask, trained, record = run_files.read_round(run_dir, r)
            pruned = tuple(mask)
            try:
                model.load_state_dict(trained)
            except RuntimeError as e:
                raise ValueError(f"{run_files.round_dir(run_dir, r)}: its trained weights do not fit the run's network "
                                 f"({' '.join(str(e).split())[:300]})") from None
            dense = model
            converted = convert_checkpoint(run_dir, Path(tmp) / f"round_{r:02d}.safetensors", round=r)
            seconds: dict[str, dict[int, float]] = {"dense": {}, "sparse": {}}
            diff = 0.0
            for b in batch_sizes:  # each batch size its own calibrated model, as a user would deploy it
                x = torch.randn(b, *shape, generator=generator)
                sparse = sparsify(copy.deepcopy(dense), mask=mask, max_density=1.0, example_inputs=x).eval()
                for name, by_batch in _latencies({"dense": dense, "sparse": sparse}, {b: x}, reps,
                                                 lambda: bar.update(1)).items():
                    seconds[name].update(by_batch)
                with torch.inference_mode():
                    diff = max(diff, float((sparse(x) - dense(x)).abs().max()))
            accuracy = record.get(run_files.ACCURACY_KEY)
            costs.append(RoundCost(
                round=r,
                weights_remaining=float(record.get("weights_remaining", 1.0)),
                test_accuracy=float(accuracy) if isinstance(accuracy, (int, float)) else None,
                dense_bytes=sum(t.numel() * t.element_size() for t in trained.values()),
                sparse_bytes=converted.bytes_after,
                sparse_layers=_sparse_layers(sparse),
                dense_seconds=seconds["dense"],
                sparse_seconds=seconds["sparse"],
                max_abs_diff=diff,
            ))
            Path(converted.dst).unlink()
    return RunCosts(str(run_dir), str(model_name), shape, pruned, batch_sizes, reps, torch.get_num_threads(),
                    cpu_model(), torch.__version__, costs)
