"""Per-layer calibrated choice of kernel: time each sparse layer's paths inside the model, at the
user's input shape, and keep the fastest.

A density rule cannot know that MKL's product pays a fixed cost per call that a 300 x 784 layer at
batch 1 never earns back, or that scipy's thread pool and torch's OpenMP threads fight over two
cores between the model's other calls. So the choice is measured where it will run: the whole
model is called on ``example_inputs`` with one layer switched to each of its candidate paths in
turn (interleaved, medians), the others kept as they are; the layer keeps the fastest. Layers
are visited in order, each seeing the choices made before it (coordinate descent).

A layer takes part when it has ``backend`` and ``backend_candidates(x)`` (the paths that can run
on its input ``x``): :class:`~sparse_lth.nn.linear.SparseLinear` and its subclasses. Each gets
``calibration``, a :class:`LayerChoice`, and shows it in its repr;
:func:`calibration_table` prints them all.

>>> import torch
>>> from torch import nn
>>> from sparse_lth import sparsify
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
>>> mask = {"0.weight": torch.rand(32, 64) < 0.05, "2.weight": torch.rand(8, 32) < 0.05}  # under 10%: swapped
>>> model = sparsify(model, mask=mask, example_inputs=torch.randn(1, 64))
>>> model[0].calibration.chosen in model[0].calibration.seconds
True
>>> print(calibration_table(model))  # doctest: +ELLIPSIS
layer  shape ...
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LayerChoice", "calibrate", "calibration_table"]


@dataclass
class LayerChoice:
    """One layer's measured paths: median seconds of a whole model call per candidate backend,
    the input shape the layer saw, and the backend kept."""

    input_shape: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    chosen: str = ""

    def speedup(self, backend: str = "dense") -> float:
        """How much faster the model ran with the chosen path than with ``backend`` for this layer."""
        return self.seconds[backend] / self.seconds[self.chosen]

    def __str__(self) -> str:
        return f"calibrated at input {list(self.input_shape)}"


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


#: Seconds one timing sample lasts at least: a model call at batch 1 takes tens of microseconds,
#: the scale of a timer's jitter and of one scheduler hiccup; a burst of calls averages them out.
SAMPLE_S = 2e-3


def _timer(model: nn.Module, inputs: tuple) -> Callable[[int], float]:
    """``sample(calls)``: seconds per call over ``calls`` back-to-back calls of the model."""
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)

    def sample(calls: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            model(*inputs)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls

    return sample


def _layer_inputs(model: nn.Module, layers: dict[str, nn.Module], inputs: tuple) -> dict[str, torch.Tensor]:
    """The input each layer gets in one call of the model (layers the call skips are absent)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
             for name, m in layers.items()]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def calibrate(model: nn.Module, example_inputs: Any, *, reps: int = 9, budget_s: float = 1.0, passes: int = 2,
              margin: float = 0.02, progress: bool = False) -> dict[str, LayerChoice]:
    """Set each calibratable layer's ``backend`` to its fastest path for ``example_inputs``.

    ``example_inputs``: a tensor or a tuple of positional inputs, as ``torch.export`` takes them.
    Every layer starts on ``"dense"`` where it has that path (the model a user would otherwise
    run); then, layer by layer, each candidate path is timed inside the model, ``reps`` times at
    most (3 at least) within about ``budget_s`` seconds, interleaved, a sample being a burst of
    calls of about :data:`SAMPLE_S`. A sparse path is kept only when its median beats dense by
    more than ``margin`` (2 %: within that, timing noise would decide). ``passes`` repeats the
    round over the layers, so each choice is made again beside the others' final paths (a
    kernel's speed depends on its neighbours: thread pools, caches). The choice holds for
    inputs of that shape: calibrate again for another. Runs under ``torch.inference_mode()``.
    Returns name -> :class:`LayerChoice`, each layer's last measurement.
    """
    if reps < 1 or budget_s <= 0 or passes < 1 or margin < 0:
        raise ValueError(f"calibrate: reps and passes must be >= 1, budget_s > 0 and margin >= 0, got reps={reps}, "
                         f"passes={passes}, budget_s={budget_s}, margin={margin}")
    inputs = _as_tuple(example_inputs)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "backend_candidates")}
    choices: dict[str, LayerChoice] = {}
    with torch.inference_mode():
        seen = _layer_inputs(model, layers, inputs)
        candidates = {name: list(layers[name].backend_candidates(x)) for name, x in seen.items()}
        candidates = {name: c for name, c in candidates.items() if len(c) >= 2}
        for name, c in candidates.items():
            if "dense" in c:
                layers[name].backend = "dense"
        sample = _timer(model, inputs)
        sample(1)  # warm-up
        calls = max(1, min(1000, round(SAMPLE_S / max(sample(1), 1e-7))))  # calls per sample
        todo = [name for _ in range(passes) for name in candidates]
        for name in tqdm(todo, desc="calibrating layers", unit="layer", disable=not progress):
            layer, paths = layers[name], candidates[name]
            seconds = _time_paths(layer, paths, sample, calls, reps, budget_s)
            best = min(seconds, key=seconds.__getitem__)
            if "dense" in seconds and seconds[best] > seconds["dense"] * (1 - margin):
                best = "dense"
            layer.backend = best
            layer.calibration = choices[name] = LayerChoice(tuple(seen[name].shape), seconds, best)
    return choices


def _time_paths(layer: nn.Module, paths: list[str], sample: Callable[[int], float], calls: int, reps: int,
                budget_s: float) -> dict[str, float]:
    """Median seconds per model call with ``layer`` on each path (interleaved, rotating order)."""
    times: dict[str, list[float]] = {c: [] for c in paths}
    for c in paths:  # first calls build pools, caches, compiled kernels: untimed
        layer.backend = c
        sample(1)
    start = time.perf_counter()
    for r in range(max(reps, 3)):
        if r >= 3 and time.perf_counter() - start > budget_s:
            break
        for c in paths[r % len(paths):] + paths[:r % len(paths)]:
            layer.backend = c
            times[c].append(sample(calls))
    return {c: statistics.median(t) for c, t in times.items()}


def calibration_table(model: nn.Module) -> str:
    """The calibrated layers of ``model`` as a text table: shape, density, the input seen,
    the model's median time per candidate path (ms), and the path kept."""
    rows = [("layer", "shape", "density", "input", "ms per model call by path", "chosen")]
    for name, m in model.named_modules():
        choice = getattr(m, "calibration", None)
        if not isinstance(choice, LayerChoice):
            continue
        if hasattr(m, "out_features"):
            shape = f"{m.out_features}x{m.in_features}"
        elif hasattr(m, "out_channels"):
            shape = "x".join(map(str, (m.out_channels, m.in_channels, *m.kernel_size)))
        else:
            shape = "-"
        density = f"{m.density():.3f}" if hasattr(m, "density") else "-"
        paths = " ".join(f"{c}={s * 1e3:.3f}" for c, s in choice.seconds.items())
        rows.append((name or "(model)", shape, density, "x".join(map(str, choice.input_shape)), paths,
                     choice.chosen))
    if len(rows) == 1:
        return "no calibrated layers (sparsify(..., example_inputs=...) calibrates them)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
