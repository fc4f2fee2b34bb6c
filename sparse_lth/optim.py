"""The search's optimizers: torch's own Adam and SGD updates without torch.optim's classes.

``torch.optim.Adam`` and ``SGD`` call the public update functions ``torch.optim.adam.adam`` and
``torch.optim.sgd.sgd``; the classes around them also import ``torch._dynamo`` on their first
``add_param_group`` and ``step`` (a guard for torch.compile), which took 1.5 s of a 4 s
``sparse-lth search`` start-up here and shows in the first round's time. The search's loop never
compiles its optimizer, so it calls the update functions itself: the same arithmetic, bit for bit
(tests/test_optim.py against the classes), and no state_dict (a round starts its optimizer afresh).

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = Adam([w], lr=0.1)
>>> (w * torch.tensor([1.0, -1.0, 0.0])).sum().backward()
>>> opt.step(); w.detach()
tensor([0.9000, 1.1000, 1.0000])
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd


class _Optimizer:
    """The parameters that take gradients, and ``zero_grad`` as torch.optim has it."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _with_grads(self) -> list[int]:
        """Indices of the parameters with a gradient this step (the others keep their state and
        step count, as in torch.optim)."""
        return [i for i, p in enumerate(self.params) if p.grad is not None]


class Adam(_Optimizer):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay, fused=True)``: torch's fused
    kernel, one call over all parameters (L2 weight decay added to the gradient, as torch's)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # fused Adam counts steps in an fp32 tensor on the parameter's device
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        live = self._with_grads()
        if not live:
            return
        adam([self.params[i] for i in live], [self.params[i].grad for i in live],
             [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [],
             [self.steps[i] for i in live], fused=True, amsgrad=False, beta1=self.betas[0],
             beta2=self.betas[1], lr=self.lr, weight_decay=self.weight_decay, eps=self.eps, maximize=False)


class SGD(_Optimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)``: torch's update (momentum buffers
    made on the first step a parameter has a gradient, as torch's)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        live = self._with_grads()
        if not live:
            return
        buffers = [self.momentum_buffers[i] for i in live]
        sgd([self.params[i] for i in live], [self.params[i].grad for i in live], buffers,
            weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False)
        for i, buffer in zip(live, buffers):  # torch fills the list in place on the first step
            self.momentum_buffers[i] = buffer
