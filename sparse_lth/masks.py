"""Mask: which weights of a model are alive.

A mask maps a parameter name (as in ``model.named_parameters()``) to a bool tensor of the
parameter's shape. Only the weights of ``nn.Linear`` and ``nn.Conv*`` layers are prunable:
biases and normalization scales are never in a mask, whatever their names say.
A mask is kept explicitly; it is never inferred from ``weight == 0`` (a trained weight can
be exactly zero without being pruned).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the prunable weights of ``model``, in ``named_parameters()`` order.

    >>> from torch import nn
    >>> prunable_names(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    ['0.weight', '2.weight']
    """
    names = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE_LAYERS)
    }
    return [name for name, _ in model.named_parameters() if name in names]


class Mask(Mapping[str, torch.Tensor]):
    """Parameter name -> bool tensor (True = alive).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> mask = Mask.ones_like(model)
    >>> list(mask), mask.density()
    (['0.weight', '2.weight'], 1.0)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"mask[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.bool:
                raise TypeError(f"mask[{name!r}] must be a bool tensor, got {tensor.dtype}")
            self._tensors[name] = tensor

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def ones_like(cls, model: nn.Module) -> Mask:
        """Every prunable weight of ``model`` alive."""
        params = dict(model.named_parameters())
        return cls({name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_names(model)})

    # -- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density():.4f})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or list(self) != list(other):
            return NotImplemented if not isinstance(other, Mask) else False
        return all(torch.equal(self[n], other[n].to(self[n].device)) for n in self)

    # -- accounting ---------------------------------------------------------------------------
    def num_alive(self) -> int:
        return sum(int(t.sum()) for t in self._tensors.values())

    def num_total(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def density(self) -> float:
        """Fraction of prunable weights alive, over all layers (1.0 for an empty mask)."""
        total = self.num_total()
        return self.num_alive() / total if total else 1.0

    def layer_densities(self) -> dict[str, float]:
        """Fraction alive per layer."""
        return {n: (float(t.sum()) / t.numel() if t.numel() else 1.0) for n, t in self._tensors.items()}

    # -- use ----------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if a mask entry is missing from ``model`` or has another shape."""
        params = dict(model.named_parameters())
        for name, tensor in self._tensors.items():
            if name not in params:
                raise ValueError(f"mask has {name!r}, which the model has no parameter of")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"mask[{name!r}] has shape {tuple(tensor.shape)}, "
                    f"parameter has {tuple(params[name].shape)}"
                )

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place and return it."""
        self.check_model(model)
        params = dict(model.named_parameters())
        for name, tensor in self._tensors.items():
            params[name].mul_(tensor.to(params[name].device))
        return model

    def to(self, device: torch.device | str) -> Mask:
        return Mask({n: t.to(device) for n, t in self._tensors.items()})

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the mask as a safetensors file (bool tensors), atomically."""
        from sparse_lth.run_files import atomic_save_safetensors

        atomic_save_safetensors({n: t.contiguous().cpu() for n, t in self._tensors.items()}, path)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        from safetensors.torch import load_file

        return cls(load_file(str(path)))
