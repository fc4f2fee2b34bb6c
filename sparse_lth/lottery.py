"""Iterative magnitude pruning with rewinding: find a lottery ticket, resumably.

Round 0 trains the dense network from theta_0. Every later round prunes the previous round's
trained weights by magnitude, resets the survivors to the rewind weights (theta_0, or theta_k
with late rewinding) and trains again. Each round lands on disk whole (see ``run_files``); a
rerun of the same config continues after the last complete round and gives the same records.
A run directory has one writer at a time (``run_files.RunLock``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparse_lth import distributed, run_files
from sparse_lth.data import DATASETS, load_dataset
from sparse_lth.masks import LAYER_TYPES, Mask, layer_type, prunable_names
from sparse_lth.models import MODELS, build_model
from sparse_lth.plots import plot_rounds
from sparse_lth.pruning import SCOPES, check_block, prune_by_magnitude, random_mask_like
from sparse_lth.training import OPTIMIZERS, SPARSE_TRAINING, TrainSettings, train
from sparse_lth.user_loop import TrainContext, TrainFn, early_stop, run_train_fn, seeded

CONTROLS = ("random_reinit", "random_mask")
#: The summary's JSON is rewritten after every round; its plot (~0.3 s to draw, and 0.3-0.5 s to
#: import matplotlib the first time) only when the last drawing is this old, and at the end.
PLOT_EVERY_S = 60.0
ModelFn = Callable[[int], torch.nn.Module]
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # model / dataset names go into a folder name
# Fields added after the first release: left out of the digest while at their defaults, so the
# run directories of earlier configs keep their names (and resume).
_LATER_FIELDS = {"prune_types": LAYER_TYPES, "include": (), "exclude": (), "output_layer": "auto", "metric": None,
                 "sparse_training": "never"}
# The paper's per-round rates for conv layers (Frankle & Carbin, Figure 2).
PAPER_CONV_FRACTIONS = {"conv2": 0.1, "conv4": 0.1, "conv6": 0.15}


@dataclass(frozen=True)
class LotteryConfig:
    """Everything that defines a search. Defaults: the paper's LeNet-300-100 setting.

    Adam 1.2e-3, batch 60, 50K iterations, validation every 100 iterations, 20% of the hidden
    weights and 10% of the output weights pruned per round, layer-wise, reset to theta_0.
    ``output_fraction=None`` means half of ``prune_fraction``; ``conv_fraction=None`` means
    the paper's conv rate for the model. ``rewind_iteration=k > 0`` resets to theta_k.
    ``block=(br, bc)`` prunes whole tiles (a block ticket for BSR).

    Which weights are pruned: ``prune_types`` (``"linear"``, ``"conv"``) picks layers by kind,
    ``include`` / ``exclude`` add or remove parameters by name (glob patterns; see
    :func:`~sparse_lth.masks.prunable_names`). ``output_layer`` names the weight pruned at
    ``output_fraction``: ``"auto"`` (the last prunable linear weight), a parameter name, or
    ``"none"`` (no layer gets the output rate).

    ``model`` and ``dataset`` name the built-in network and data, or label your own when
    :func:`find_ticket` gets ``model_fn`` / ``train_fn`` (they name the run directory).
    ``batch_size``, ``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``eval_every`` and
    ``val_size`` are the built-in loop's; with ``train_fn`` your loop decides them, and
    ``iterations`` is the number of steps it makes per round (the progress bar's length).
    ``metric`` is the one of ``train_fn``'s metrics that tables and plots show (default:
    ``"accuracy"`` when it returns one, else its first).

    ``sparse_training`` (built-in loop): ``"never"`` trains every round masked-dense;
    ``"always"`` trains every masked linear layer sparse over its mask's pattern;
    ``"auto"`` those large and sparse enough to be faster that way
    (:func:`~sparse_lth.training.sparse_training_plan`). The same updates up to float
    rounding; each round's record says which layers trained sparse.

    >>> LotteryConfig(rounds=2, iterations=300).prune_fraction
    0.2
    """

    model: str = "lenet300"
    dataset: str = "fashion-mnist"
    rounds: int = 15
    iterations: int = 50_000
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    prune_fraction: float = 0.2
    output_fraction: float | None = None
    conv_fraction: float | None = None
    scope: str = "layerwise"
    block: tuple[int, int] | None = None
    rewind_iteration: int = 0
    eval_every: int = 100
    val_size: int | None = None
    seed: int = 0
    controls: tuple[str, ...] = ("random_reinit",)
    prune_types: tuple[str, ...] = LAYER_TYPES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    output_layer: str = "auto"
    metric: str | None = None
    sparse_training: str = "never"

    def __post_init__(self) -> None:
        def bad(what: str) -> None:
            raise ValueError(f"LotteryConfig: {what}")

        for name in ("model", "dataset"):
            if not isinstance(getattr(self, name), str) or not _LABEL.match(getattr(self, name)):
                bad(f"{name} must be a name of letters, digits and . _ + - (it names the run directory), "
                    f"got {getattr(self, name)!r}")
        if self.rounds < 1:
            bad(f"rounds must be at least 1 (pruning rounds after the dense round), got {self.rounds}")
        for name in ("prune_fraction", "output_fraction", "conv_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                bad(f"{name} must be in [0, 1) (share of surviving weights removed per round), got {value}")
        if self.iterations < 1 or self.batch_size < 1 or self.eval_every < 1:
            bad("iterations, batch_size and eval_every must be positive")
        if not 0 <= self.rewind_iteration < self.iterations:
            bad(f"rewind_iteration must be in [0, iterations={self.iterations}), got {self.rewind_iteration}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.sparse_training not in SPARSE_TRAINING:
            bad(f"sparse_training must be one of {SPARSE_TRAINING}, got {self.sparse_training!r}")
        if self.scope not in SCOPES:
            bad(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not 0 < self.lr < math.inf:
            bad(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            bad(f"weight_decay must be non-negative and finite, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum}")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            bad(f"block must be (rows, cols) of positive ints, got {self.block}")
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            bad(f"unknown controls {sorted(unknown)}; choose from {', '.join(CONTROLS)}")
        for name in ("prune_types", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                bad(f"{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        unknown_types = set(self.prune_types) - set(LAYER_TYPES)
        if unknown_types:
            bad(f"unknown prune_types {sorted(unknown_types)}; choose from {', '.join(LAYER_TYPES)}")
        if not isinstance(self.output_layer, str) or not self.output_layer:
            bad(f"output_layer must be 'auto', 'none' or a parameter name, got {self.output_layer!r}")
        # Normalize so that equal configs hash equally whatever sequence type was passed.
        object.__setattr__(self, "controls", tuple(self.controls))
        if self.block is not None:
            object.__setattr__(self, "block", tuple(int(b) for b in self.block))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LotteryConfig:
        """The config ``to_dict`` gave; ``ValueError`` for keys this version does not know."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown LotteryConfig keys {unknown} (made by another version of sparse_lth?)")
        data = dict(data)
        for name in ("controls", "prune_types", "include", "exclude"):
            if name in data:
                data[name] = tuple(data[name])
        if data.get("block") is not None:
            data["block"] = tuple(data["block"])
        return cls(**data)

    def digest(self) -> str:
        hashed = {k: v for k, v in self.to_dict().items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
        text = json.dumps(hashed, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def run_name(self) -> str:
        """The run directory's name: a rerun of the same config lands in the same folder."""
        return f"{self.model}-{self.dataset}-{self.digest()}"

    def train_settings(self) -> TrainSettings:
        return TrainSettings(self.iterations, self.batch_size, self.optimizer, self.lr,
                             self.momentum, self.weight_decay, self.eval_every, self.sparse_training)

    def prunable(self, model: torch.nn.Module) -> list[str]:
        """The names of the weights this search prunes in ``model``."""
        return prunable_names(model, self.prune_types, self.include, self.exclude)

    def output_weight(self, model: torch.nn.Module) -> str | None:
        """The weight pruned at ``output_fraction``, or None (``output_layer="none"``)."""
        names = self.prunable(model)
        if self.output_layer == "none":
            return None
        if self.output_layer != "auto":
            if self.output_layer not in names:
                raise ValueError(f"output_layer {self.output_layer!r} is not among the pruned weights "
                                 f"({', '.join(names) or 'none'})")
            return self.output_layer
        modules = dict(model.named_modules())
        linear = [n for n in names if layer_type(modules.get(n.rpartition(".")[0] if "." in n else "")) == "linear"]
        return linear[-1] if linear else None

    def layer_fractions(self, model: torch.nn.Module) -> dict[str, float]:
        """Per-layer rates: output layer at half rate, conv layers at the paper's conv rate."""
        names = set(self.prunable(model))
        fractions = {}
        conv = self.conv_fraction if self.conv_fraction is not None else PAPER_CONV_FRACTIONS.get(self.model)
        for name, module in model.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if layer_type(module) == "conv" and conv is not None and weight in names:
                fractions[weight] = conv
        output = self.output_weight(model)
        if output is not None:
            fractions[output] = self.output_fraction if self.output_fraction is not None else self.prune_fraction / 2
        return fractions


@dataclass
class Ticket:
    """The result of a search: the sparsest mask found, the weights survivors reset to, records.

    ``records[r]`` describes round r (0 = dense); ``controls[name][i]`` the control trained on
    round i+1's mask.
    """

    config: LotteryConfig
    run_dir: Path
    mask: Mask
    rewind_state: dict[str, torch.Tensor]
    records: list[dict[str, Any]] = field(default_factory=list)
    controls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def ticket_state(self) -> dict[str, torch.Tensor]:
        """The ticket itself, f(x; m * theta_rewind): the rewind weights with the mask applied."""
        state = {k: v.clone() for k, v in self.rewind_state.items()}
        for name, alive in self.mask.items():
            state[name] = state[name] * alive.to(state[name].dtype)
        return state

    def table(self) -> str:
        """Accuracy and early stopping against weights remaining, ticket beside each control."""
        from sparse_lth.report_table import rounds_table

        return rounds_table(self.records, self.controls, metric=self.config.metric)


def _config_of_run(run_dir: Path) -> LotteryConfig:
    """The config a run directory was made with; ``ValueError`` naming its file if broken."""
    data = run_files.read_config(run_dir)
    try:
        return LotteryConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{run_dir / run_files.CONFIG_FILE} is not a valid run config ({e}); fix it, or "
                         f"delete the run directory {run_dir} to start that search over") from None


def _record(round_index: int, mask: Mask, result, kind: str) -> dict[str, Any]:
    return {
        "round": round_index,
        "kind": kind,
        "weights_remaining": mask.density(),
        "layer_remaining": mask.layer_densities(),
        **result.summary(),
        "training_path": result.plan,  # per masked linear weight: "sparse" or "masked-dense"
        "seconds": result.seconds,  # as a user loop's rounds record it
        "history": [list(row) for row in result.history],
    }


def _user_record(round_index: int, mask: Mask, kind: str, ctx: TrainContext,
                 metrics: dict[str, float]) -> dict[str, Any]:
    """A round trained by a user's loop: its metrics, steps, time, and logged curve."""
    record: dict[str, Any] = {
        "round": round_index,
        "kind": kind,
        "weights_remaining": mask.density(),
        "layer_remaining": mask.layer_densities(),
        "metrics": metrics,
        "steps": ctx.steps - ctx.start_step,
        "seconds": ctx.seconds,
    }
    best = early_stop(ctx.history)
    if best is not None:
        record["early_stop_iteration"] = int(best["step"])
        record["early_stop_metrics"] = best
    record["history"] = ctx.history
    return record


def _check_builtins(config: LotteryConfig, model_fn: ModelFn | None, train_fn: TrainFn | None) -> None:
    """The built-in network and data exist where no model_fn / train_fn replaces them."""
    if model_fn is None and config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}, "
                         "or pass model_fn= (and train_fn=) to search your own network")
    needs_data = model_fn is None or train_fn is None
    if needs_data and config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASETS)}, "
                         "or pass train_fn= to train on your own data with your own loop")
    for name, fn in (("model_fn", model_fn), ("train_fn", train_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {type(fn).__name__}")


def _mask_from_rank0(compute: Callable[[], Mask]) -> Mask:
    """A mask computed on rank 0 alone and sent to every rank: each trains under the same one."""
    return Mask(distributed.broadcast(dict(compute()) if distributed.is_main() else None))


def _check_ranks(config: LotteryConfig, train_fn: TrainFn | None) -> None:
    """What several ranks need: one config, a batch that splits evenly, the built-in loop."""
    distributed.agree(config.digest(), "the search's config (its digest)")
    if distributed.world() > 1 and config.batch_size % distributed.world():
        raise ValueError(f"batch_size {config.batch_size} does not split over {distributed.world()} ranks; "
                         "choose a world size that divides it (the global batch is the protocol)")
    if distributed.world() > 1 and train_fn is not None:
        raise ValueError("a search with train_fn runs in one process: the search does not shard your loop's "
                         "data; launch it without torchrun (or make your loop data-parallel inside train_fn "
                         "and call find_ticket on one process)")


def _check_same_architecture(model: torch.nn.Module, init: dict[str, torch.Tensor], run_dir: Path) -> None:
    """A resumed run's theta_0 must fit the network model_fn builds now."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in init.items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"{run_dir} holds a run of another network (first differences: {diff}); the run "
                         "directory is named from the config, not from model_fn: change the config's model "
                         "name (or out_dir) when you change the network")


def _check_fresh(start: dict[str, torch.Tensor], init: dict[str, torch.Tensor], mask: Mask) -> None:
    """The random-reinit control must start from new weights, not theta_0 again."""
    if all(torch.equal(start[name], init[name]) for name in mask):
        raise ValueError("model_fn returned theta_0 again for another seed, so the random_reinit control "
                         "would not reinitialize: initialize from the seed model_fn gets (or from torch's "
                         "generators, which the search seeds), or drop the control")


class _Search:
    """One search's state: the data, the model, the run directory and its progress bars."""

    def __init__(self, config: LotteryConfig, out_dir: str | Path, data_dir: str | Path | None, progress: bool,
                 model_fn: ModelFn | None = None, train_fn: TrainFn | None = None):
        self.config = config
        self.model_fn, self.train_fn = model_fn, train_fn
        _check_builtins(config, model_fn, train_fn)
        _check_ranks(config, train_fn)
        self.run_dir = Path(out_dir) / config.run_name()
        self.lock: run_files.RunLock | None = None
        # The summary is rewritten after each round (the plot at most every PLOT_EVERY_S on
        # rank 0's clock) and, with the plot, at the end.
        self.plotted_at = time.monotonic()  # of the last drawing; the start counts as one
        self.progress = progress and distributed.is_main()  # one set of bars, rank 0's
        try:
            # Rank 0 is the one writer: the lock comes before anything in the run directory is
            # read, cleaned or written (a live writer's temporaries look like a dead one's).
            with distributed.together("opening the run directory"):
                if distributed.is_main():
                    self._claim()
            self._open(data_dir)
        except BaseException:
            self.close()
            raise

    def _claim(self) -> None:
        """Rank 0: make and lock the run directory, clean and check what a killed run left."""
        self.run_dir = run_files.make_run_dir(self.run_dir.parent, self.run_dir.name)
        self.lock = run_files.lock_run_dir(self.run_dir)
        run_files.refuse_symlinks(self.run_dir)
        run_files.remove_stale_temporaries(self.run_dir)
        run_files.check_run_files(self.run_dir)  # a broken file fails now, not after hours of training
        if (self.run_dir / run_files.CONFIG_FILE).exists() and _config_of_run(self.run_dir) != self.config:
            raise ValueError(f"{self.run_dir} holds a run of another config; remove it or change out_dir")

    def _open(self, data_dir: str | Path | None) -> None:
        config = self.config
        with distributed.together("loading the data and building the model"):
            # The built-in data only where a built-in model or loop needs it: a user's loop brings its own.
            needs_data = self.model_fn is None or self.train_fn is None
            self.data = load_dataset(config.dataset, data_dir, config.val_size, config.seed) if needs_data else None
            self.model = self.fresh_model(config.seed)
            self.settings = config.train_settings()
            if not config.prunable(self.model):
                raise ValueError(f"the model has no weights to prune (prune_types={list(config.prune_types)}, "
                                 f"include={list(config.include)}, exclude={list(config.exclude)})")
            self.fractions = config.layer_fractions(self.model)
            if config.block is not None:  # refuse a tile the machine cannot hold before round 0 trains
                check_block(self.full_mask(), config.block)
        if distributed.world() > 1 and self.data is not None:  # hashing Fashion-MNIST takes 0.2 s: only with ranks
            distributed.agree(self.data.fingerprint(), "the dataset")
        with distributed.together("writing the run's config and theta_0"):
            if distributed.is_main():
                if not (self.run_dir / run_files.CONFIG_FILE).exists():
                    run_files.atomic_write_json(config.to_dict(), self.run_dir / run_files.CONFIG_FILE)
                if not (self.run_dir / run_files.INIT_FILE).exists():
                    run_files.atomic_save_safetensors(self.model.state_dict(), self.run_dir / run_files.INIT_FILE)
        with distributed.together("reading theta_0"):
            self.init_state = run_files.read_init(self.run_dir)
            _check_same_architecture(self.model, self.init_state, self.run_dir)

    def close(self) -> None:
        """Release the run directory for the next writer."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> _Search:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, what: str, write: Callable[[], Any]) -> None:
        """Run ``write`` on rank 0 (the one writer); every rank goes on once it is done (and
        stops if it failed)."""
        with distributed.together(what):
            if distributed.is_main():
                write()

    def fresh_model(self, seed: int) -> torch.nn.Module:
        """A newly initialized network: ``model_fn(seed)`` with torch's generators seeded from
        ``seed`` (so an initialization that draws from them is reproducible), or the built-in."""
        if self.model_fn is None:
            return build_model(self.config.model, self.data.input_shape, self.data.num_classes, seed=seed)
        with seeded(seed):
            model = self.model_fn(seed)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        return model

    def full_mask(self) -> Mask:
        """Every weight this search prunes, alive: round 0's mask."""
        c = self.config
        return Mask.ones_like(self.model, c.prune_types, c.include, c.exclude)

    def train_round(self, round_index: int, mask: Mask, start: dict[str, torch.Tensor],
                    kind: str, start_step: int = 0, snapshot_at: int | None = None
                    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """Train one round from ``start`` under ``mask``; (the snapshot at ``snapshot_at``, record)."""
        self.model.load_state_dict(start)
        desc = f"{kind} round {round_index} ({100 * mask.density():.2f}% left)"
        with tqdm(total=max(self.settings.iterations - start_step, 0), desc=desc, leave=False,
                  disable=not self.progress, unit="it") as bar:
            if self.train_fn is None:
                result = train(self.model, mask, self.data, self.settings, seed=self.config.seed,
                               start_step=start_step, snapshot_at=snapshot_at, progress=bar)
                return result.snapshot, _record(round_index, mask, result, kind)
            ctx = TrainContext(mask, round=round_index, kind=kind, seed=self.config.seed, start_step=start_step,
                               iterations=self.config.iterations, snapshot_at=snapshot_at, progress=bar)
            metrics = run_train_fn(self.train_fn, self.model, ctx)
        if self.config.metric is not None and self.config.metric not in metrics:
            raise ValueError(f"train_fn returned {sorted(metrics)}, not the metric {self.config.metric!r} "
                             "the config reports (LotteryConfig.metric)")
        if snapshot_at is not None and ctx.snapshot is None:
            raise ValueError(f"rewind_iteration={snapshot_at}, but train_fn made only {ctx.steps} steps "
                             "(call ctx.step() once per optimizer step)")
        return ctx.snapshot, _user_record(round_index, mask, kind, ctx, metrics)

    def rewind_state(self) -> dict[str, torch.Tensor]:
        if self.config.rewind_iteration == 0:
            return self.init_state
        return run_files.read_rewind(self.run_dir)

    def next_mask(self, round_index: int) -> Mask:
        """Prune round ``round_index - 1``'s trained weights to get this round's mask."""
        if round_index == 0:
            return self.full_mask()
        mask_tensors, trained, _ = run_files.read_round(self.run_dir, round_index - 1)
        self.model.load_state_dict(trained)
        return prune_by_magnitude(self.model, Mask(mask_tensors), self.config.prune_fraction,
                                  scope=self.config.scope, layer_fractions=self.fractions,
                                  block=self.config.block)

    def run_ticket_rounds(self, bar) -> None:
        k = self.config.rewind_iteration
        done = set(run_files.completed_rounds(self.run_dir))
        for r in range(self.config.rounds + 1):
            if r in done:
                bar.update(1)
                continue
            mask = _mask_from_rank0(lambda: self.next_mask(r))
            if r == 0:
                snapshot, record = self.train_round(0, mask, self.init_state, "ticket", snapshot_at=k or None)
                if k:  # the rewind point must be on disk before round 0 is
                    self.write("writing theta_k", lambda: run_files.atomic_save_safetensors(
                        snapshot, self.run_dir / run_files.REWIND_FILE))
            else:
                _, record = self.train_round(r, mask, self.rewind_state(), "ticket", start_step=k)
            self.write(f"writing round {r}", lambda: run_files.write_round(
                self.run_dir, r, mask, self.model.state_dict(), record))
            bar.update(1)
            self.update_summary()

    def run_control_rounds(self, control: str, bar) -> None:
        base = run_files.control_dir(self.run_dir, control)
        done = set(run_files.completed_rounds(base))
        for r in range(1, self.config.rounds + 1):
            if r in done:
                bar.update(1)
                continue
            ticket_mask = Mask(run_files.read_mask(self.run_dir, r))
            # Each control round has its own seed, derived from the run's seed and the round.
            control_seed = self.config.seed * 1_000_003 + 7919 * r + CONTROLS.index(control) + 1
            if control == "random_reinit":
                mask, start = ticket_mask, self.fresh_model(control_seed).state_dict()
                _check_fresh(start, self.init_state, ticket_mask)
            else:
                mask = _mask_from_rank0(
                    lambda: random_mask_like(ticket_mask, torch.Generator().manual_seed(control_seed)))
                start = self.rewind_state()
            _, record = self.train_round(r, mask, start, control, start_step=self.config.rewind_iteration)
            self.write(f"writing {control} round {r}", lambda: run_files.write_round(
                base, r, mask, self.model.state_dict(), record))
            bar.update(1)
            self.update_summary()

    def records(self) -> tuple[list[dict], dict[str, list[dict]]]:
        controls = {control: run_files.read_records(run_files.control_dir(self.run_dir, control))
                    for control in self.config.controls}
        return run_files.read_records(self.run_dir), controls

    def write_summary(self, plot: bool) -> None:
        ticket, controls = self.records()
        strip = lambda rows: [{k: v for k, v in row.items() if k != "history"} for row in rows]  # noqa: E731
        run_files.atomic_write_json({"ticket": strip(ticket), **{c: strip(rows) for c, rows in controls.items()}},
                                    self.run_dir / run_files.SUMMARY_FILE)
        if plot:
            title = f"{self.config.model} on {self.config.dataset}, {self.config.iterations} iterations/round"
            plot_rounds({"ticket": ticket, **controls}, self.run_dir / run_files.PLOT_FILE, title, self.config.metric)

    def update_summary(self, final: bool = False) -> None:
        """Every rank (a collective): rank 0 writes the summary, with the plot when ``final`` or
        its last drawing is :data:`PLOT_EVERY_S` old."""
        now = time.monotonic()
        plot = final or now - self.plotted_at >= PLOT_EVERY_S
        self.write("writing the summary", lambda: self.write_summary(plot))
        if plot:
            self.plotted_at = now


def find_ticket(config: LotteryConfig, out_dir: str | Path, data_dir: str | Path | None = None,
                progress: bool = True, *, model_fn: ModelFn | None = None,
                train_fn: TrainFn | None = None) -> Ticket:
    """Run (or resume) iterative magnitude pruning and its controls; return the Ticket.

    Results land in ``out_dir / config.run_name()``; calling again with the same config
    continues after the last complete round, and a finished run just loads.

    Your own network and loop: ``model_fn(seed)`` returns a freshly initialized ``nn.Module``
    (theta_0 is the first one; the random-reinit control asks for more), and
    ``train_fn(model, ctx)`` trains it in place with your loop and optimizer, calls
    ``ctx.step()`` once per optimizer step, and returns a dict of metrics (say
    ``{"accuracy": 0.91}``): see :class:`~sparse_lth.user_loop.TrainContext`. The mask holds
    through your loop unchanged. Either may be given alone: ``model_fn`` with the built-in loop
    and dataset, or ``train_fn`` with a built-in network. ``config.model`` / ``config.dataset``
    then label the run; the run directory is named from the config, so change them when you
    change the functions.

    One process writes a run directory at a time: while a search holds it (an OS lock on
    ``run.lock``, dropped when its holder exits or dies), another raises
    :class:`~sparse_lth.run_files.RunDirBusy` naming the holder's pid, host and start time.
    A run directory holding a symbolic link, or a broken file (truncated safetensors, invalid
    JSON, a config of unknown keys), is refused with a ``ValueError`` naming it, before any
    training.

    >>> import tempfile
    >>> config = LotteryConfig(dataset="digits", rounds=1, iterations=200, controls=())
    >>> ticket = find_ticket(config, tempfile.mkdtemp(), progress=False)
    >>> [round(r["weights_remaining"], 3) for r in ticket.records]
    [1.0, 0.802]
    """
    distributed.init()  # under torchrun: join the ranks (a no-op in one process)
    total = config.rounds + 1 + config.rounds * len(config.controls)
    with _Search(config, out_dir, data_dir, progress, model_fn, train_fn) as search:
        with tqdm(total=total, desc="rounds", unit="round", disable=not search.progress) as bar:
            search.run_ticket_rounds(bar)
            for control in config.controls:
                search.run_control_rounds(control, bar)
        search.update_summary(final=True)
        ticket_records, control_records = search.records()
        last = run_files.completed_rounds(search.run_dir)[-1]
        return Ticket(config=config, run_dir=search.run_dir, mask=Mask(run_files.read_mask(search.run_dir, last)),
                      rewind_state=search.rewind_state(), records=ticket_records, controls=control_records)
