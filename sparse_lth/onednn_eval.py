"""Evaluation passes with their dense linear products through oneDNN, on the CPU.

torch sends an fp32 ``nn.Linear`` on the CPU to MKL's sgemm, which on this project's machine
(an AMD EPYC) runs about 1.5x slower than oneDNN: [10000, 784] x [784, 300] took 74-76 ms
against 47.5 ms (bench/RESULTS.md). The search evaluates its network 100 times a round
(validation and test every 100 steps) on thousands of rows each, so each pass sends every plain
``nn.Linear`` through oneDNN's linear on its own dense weight (``torch.ops.mkldnn._linear_pointwise``,
the op torch.compile's CPU backend emits): no copy of the weight, where the oneDNN copies this
module first made (``torch.utils.mkldnn.MkldnnLinear``) cost 3-42 ms a weight and pass. Over
5,000 rows: 784 x 300 24.4 ms against MkldnnLinear's 2.9 + 29.9 ms and MKL's 44.0 ms; 4096 x
4096 1.61 s against 0.04 + 1.71 s and 1.82 s. The outputs agree with MKL's to fp32 rounding
(2.6e-6 absolute there). A sparse-trained layer (``TrainableSparseLinear``) dense enough that a
dense product beats its sparse one (``TrainableSparseLinear.eval_weight``) goes through its dense
copy the same way. Training steps are untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import nn

from sparse_lth.nn.trainable import TrainableSparseLinear

#: Rows a pass must have to be switched: evaluation passes are thousands of rows; a short pass
#: keeps torch's own path.
MIN_ROWS = 1024


def _onednn_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _dense_stand_in(module: nn.Module) -> nn.Linear | SimpleNamespace | None:
    """The fp32 CPU weight and bias oneDNN should multiply in ``module``'s place: a plain
    ``nn.Linear`` itself, the dense copy a ``TrainableSparseLinear`` evaluates with
    (:meth:`~sparse_lth.nn.TrainableSparseLinear.eval_weight`: kept while its values stay, so the
    validation and test passes of one step share it), or None (subclasses, sparser layers and
    others keep their own forward)."""
    if type(module) is TrainableSparseLinear:
        if module.values.dtype != torch.float32 or module.values.device.type != "cpu":
            return None
        weight = module.eval_weight()
        return None if weight is None else SimpleNamespace(
            weight=weight, bias=None if module.bias is None else module.bias.detach())
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
        return module
    return None


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
    switched = []
    try:
        for module in model.modules():
            stand_in = None if "forward" in vars(module) else _dense_stand_in(module)
            if stand_in is not None:
                bias = None if stand_in.bias is None else stand_in.bias.detach()
                fast = functools.partial(_onednn_linear, stand_in.weight.detach(), bias)
                plain = module.forward

                def forward(x: torch.Tensor, fast=fast, plain=plain) -> torch.Tensor:
                    ok = x.dim() >= 2 and x.dtype == torch.float32 and x.device.type == "cpu"
                    return fast(x) if ok else plain(x)

                module.forward = forward  # an instance attribute: nn.Module.__call__ takes it
                switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
