"""The paper's networks by name, with Glorot (Xavier) normal initialization.

* ``lenet300``: LeNet-300-100, fully connected 300-100-out.
* ``mlp4096``: fully connected 4096-4096-out, a wide network whose search pays off in sparse
  training (each hidden layer large enough to train faster sparse than masked-dense).
* ``conv2`` / ``conv4`` / ``conv6``: 2/4/6 3x3 conv layers (64, 64 | 128, 128 | 256, 256, a 2x2
  max-pool after each pair), then fully connected 256-256-out (Frankle & Carbin, Figure 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("lenet300", "mlp4096", "conv2", "conv4", "conv6")
_CONV_WIDTHS = {"conv2": [64], "conv4": [64, 128], "conv6": [64, 128, 256]}


class LeNet300(nn.Module):
    """Two hidden fully connected layers (300 and 100 wide by default: LeNet-300-100)."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.out(torch.relu(self.fc2(x)))


class ConvNet(nn.Module):
    """Conv-2/4/6: pairs of 3x3 convs, each pair followed by a 2x2 max-pool, then 256-256-out."""

    def __init__(self, pair_widths: list[int], input_shape: tuple[int, ...] = (3, 32, 32),
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for width in pair_widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        height, width = (side // 2 ** len(pair_widths) for side in input_shape[1:])
        if height < 1 or width < 1:
            raise ValueError(f"input {input_shape} is too small for {2 * len(pair_widths)} conv layers")
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * height * width, 256)
        self.fc2 = nn.Linear(256, 256)
        self.out = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@torch.no_grad()
def glorot_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Glorot normal weights and zero biases for every Linear and Conv layer (the paper's init)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            std = math.sqrt(2.0 / (fan_in + fan_out))
            module.weight.normal_(0.0, std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
    return model


def build_model(name: str, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                seed: int | None = None) -> nn.Module:
    """A freshly Glorot-initialized network by name; ``seed`` makes the init reproducible.

    >>> model = build_model("lenet300", seed=0)
    >>> sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    266200
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name == "lenet300":
        model: nn.Module = LeNet300(input_shape, num_classes)
    elif name == "mlp4096":
        model = LeNet300(input_shape, num_classes, hidden=(4096, 4096))
    else:
        model = ConvNet(_CONV_WIDTHS[name], input_shape, num_classes)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return glorot_init_(model, generator)
