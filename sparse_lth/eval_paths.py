"""Faster paths for the search's evaluation passes on the CPU: dense linear products through
oneDNN (:func:`onednn_linears`) and pruned convs through the direct sparse kernel
(:func:`sparse_convs`). Both switch a layer's ``forward`` inside a ``with`` block and give it back
after; training steps are untouched.

**Linear layers through oneDNN.** torch sends an fp32 ``nn.Linear`` on the CPU to MKL's sgemm,
which on this project's machine (an AMD EPYC) runs about 1.5x slower than oneDNN: [10000, 784] x
[784, 300] took 74-76 ms against 47.5 ms (bench/RESULTS.md). The search evaluates its network
100 times a round (validation and test every 100 steps) on thousands of rows each, so each pass
sends every plain ``nn.Linear`` through oneDNN's linear on its own dense weight
(``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits): no copy of
the weight, where the oneDNN copies this module first made (``torch.utils.mkldnn.MkldnnLinear``)
cost 3-42 ms a weight and pass. Over 5,000 rows: 784 x 300 24.4 ms against MkldnnLinear's 2.9 +
29.9 ms and MKL's 44.0 ms; 4096 x 4096 1.61 s against 0.04 + 1.71 s and 1.82 s. The outputs agree
with MKL's to fp32 rounding (2.6e-6 absolute there). A sparse-trained layer
(``TrainableSparseLinear``) dense enough that a dense product beats its sparse one
(``TrainableSparseLinear.eval_weight``) goes through its dense copy the same way.

**Pruned convs through the direct sparse kernel.** The search trains a conv net masked-dense,
so its evaluation would run every pruned conv at dense cost. Each plain fp32 CPU ``nn.Conv2d``
at or below :data:`SPARSE_CONV_DENSITY` runs as a :class:`~sparse_lth.nn.conv.SparseConv2d`
built from its weight's nonzeros (the search keeps pruned weights exactly zero). Over 10,000
Fashion-MNIST test images in the search's chunks, 2 cores, every conv but the 1-channel first
one pruned to the density: conv2 1.46x at 12.5 %, 1.69x at 7.8 %, 1.79x at 3 %, 0.83x at 50 %;
conv6 1.15x at 12.5 %, 1.34x at 7.8 %, 1.92x at 3 %, 0.74x at 25 %. Outputs agree with the
dense conv's to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sparse_lth.nn.conv import SparseConv2d
from sparse_lth.nn.trainable import TrainableSparseLinear

#: Rows a pass must have to be switched: evaluation passes are thousands of rows; a short pass
#: keeps torch's own path.
MIN_ROWS = 1024


def _onednn_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _dense_stand_in(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The fp32 CPU (weight, bias) oneDNN should multiply in ``module``'s place: a plain
    ``nn.Linear``'s own, the dense copy a ``TrainableSparseLinear`` evaluates with
    (:meth:`~sparse_lth.nn.TrainableSparseLinear.eval_weight`: kept while its values stay, so the
    validation and test passes of one step share it), or None (subclasses, sparser layers and
    others keep their own forward)."""
    if type(module) is TrainableSparseLinear:
        if module.values.dtype != torch.float32 or module.values.device.type != "cpu":
            return None
        weight = module.eval_weight()
    elif type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
        weight = module.weight
    else:
        return None
    return None if weight is None else (weight.detach(), None if module.bias is None else module.bias.detach())


@contextlib.contextmanager
def onednn_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Inside the block, every plain fp32 CPU ``nn.Linear`` of ``model`` (and every
    ``TrainableSparseLinear`` dense enough) runs through oneDNN on 2-D and higher fp32 inputs;
    yields how many layers were switched. Nothing is switched for fewer than :data:`MIN_ROWS`
    rows, with autograd on, or without oneDNN in this torch build. Meant for ``torch.no_grad``
    evaluation passes.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> x = torch.randn(2048, 64)
    >>> with torch.no_grad():
    ...     expected = net(x)
    ...     with onednn_linears(net, rows=len(x)) as switched:
    ...         out = net(x)
    >>> switched == (2 if _available() else 0)
    True
    >>> torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    True
    >>> "forward" in vars(net[0])  # the layers are themselves again
    False
    """
    if rows < MIN_ROWS or torch.is_grad_enabled() or not _available() or torch.compiler.is_compiling():
        yield 0
        return

    def fast_of(module: nn.Module):
        stand_in = _dense_stand_in(module)
        return None if stand_in is None else functools.partial(_onednn_linear, *stand_in)

    with switched_forwards(model, fast_of, lambda x: x.dim() >= 2 and x.dtype == torch.float32
                           and x.device.type == "cpu") as switched:
        yield switched


#: Densest conv that evaluates sparse: below the measured break-even of conv2 and conv6 (above).
SPARSE_CONV_DENSITY = 0.1


def _sparse_stand_in(module: nn.Module, max_density: float) -> SparseConv2d | None:
    """A sparse twin of a plain fp32 CPU ``nn.Conv2d`` sparse enough (groups 1, zeros padding,
    more than one input channel: a first layer's few products gain nothing), else None."""
    if not SparseConv2d.replaces(module):
        return None
    weight = module.weight
    if module.in_channels < 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if int(torch.count_nonzero(weight)) > max_density * weight.numel():
        return None
    return SparseConv2d.from_conv(module, backend="sparse")


@contextlib.contextmanager
def sparse_convs(model: nn.Module, max_density: float = SPARSE_CONV_DENSITY) -> Iterator[int]:
    """Inside the block, every plain fp32 CPU ``nn.Conv2d`` of ``model`` with at most
    ``max_density`` of its weights nonzero runs the direct sparse convolution on 4-D fp32 CPU
    inputs; yields how many layers were switched. Nothing is switched with autograd on or under
    ``torch.compile``. Meant for ``torch.no_grad`` evaluation passes; the weights must not change
    inside the block (the sparse copies are made on entry).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(torch.rand(16, 8, 3, 3) < 0.05)
    ...     x = torch.randn(2, 8, 10, 10)
    ...     expected = net(x)
    ...     with sparse_convs(net) as switched:
    ...         out = net(x)
    >>> switched, torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    (1, True)
    >>> "forward" in vars(net[0])  # the layers are themselves again
    False
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield 0
        return
    with switched_forwards(model, lambda m: _sparse_stand_in(m, max_density),
                           lambda x: x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu") as switched:
        yield switched


@contextlib.contextmanager
def switched_forwards(model: nn.Module, fast_of: Callable[[nn.Module], Callable | None],
                      takes: Callable[[torch.Tensor], bool]) -> Iterator[int]:
    """Inside the block, each module of ``model`` for which ``fast_of(module)`` gives a callable
    runs it on inputs that ``takes``, and its own forward on others; yields how many modules were
    switched, and gives every one its forward back on leaving. A module whose ``forward`` is
    already an instance attribute (switched by an enclosing block, or by its user) is left alone."""
    switched = []
    try:
        for module in model.modules():
            fast = None if "forward" in vars(module) else fast_of(module)
            if fast is not None:
                plain = module.forward

                def forward(x: torch.Tensor, fast=fast, plain=plain) -> torch.Tensor:
                    return fast(x) if takes(x) else plain(x)

                module.forward = forward  # an instance attribute: nn.Module.__call__ takes it
                switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
